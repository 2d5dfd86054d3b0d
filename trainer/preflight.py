"""python -m trainer.preflight --config CONFIG [--accelerator v6e-8] [--set key=value]... [--headroom 0.10]
                             [--json] [--suggest]

Compiles the run's real programs for a TPU slice on THIS host (no TPU, no weights, no tokenizer, no network):
libtpu's compiler targets the abstract devices of the accelerator's topology, and each program's
`memory_analysis()` says what one chip must hold. Programs (trainer/programs.py builds their inputs with
the shardings the run uses):

  optimizer_init  the sharded optimizer-state init
  sampler         the rollout sampler (batch_size x n rows, prompt bucket + max new tokens, KV cache)
  update_step     the GRPO update at the WORST-CASE length (prompt bucket + max new tokens, rounded up to
                  train.seq_bucket), every micro-batch, optimizer included, and the lockstep parity's
                  shadow provider when train.shadow_policy_loss_impl is set (its memory counts too)
  eval            the periodic eval (the sampler's program at the eval batch; skipped when eval is off)
  eval_full       the full greedy sweep (eval_full_batch_size rows; a run may switch it on by env flag)
  prefill         the rollout sampler's prefill alone (the prompt bucket, the first sampled token)
  decode_step     ONE step of the rollout sampler's decode loop (the loop body itself, compiled alone:
                  no loop around it, so XLA's cost analysis counts its HBM bytes once, as they happen)

Per chip: peak = arguments + temp + outputs - aliased (XLA's own check compares temp alone with HBM, so a
program whose arguments and temp exceed HBM can still compile). A program fits when peak <= usable HBM x
(1 - headroom). The time column is a roofline ESTIMATE from XLA's cost analysis and the chip's published
peak flops and HBM bandwidth: loop bodies (layers, micro-batches, decode steps) are counted once by XLA,
so it is a lower bound of one pass, not a step time.

Every program also reports the bytes its collectives move per chip, by kind, read from the compiled HLO
(trainer/hlo_stats.py, loop trip counts included), and the estimate adds them at the chip's published
inter-chip (ICI) bandwidth. For the sampler that makes decode_step's estimate the time of one generated
token: x max new tokens (plus prefill) is the estimated rollout, the "decode" line of the report.

Exit codes: 0 everything fits; 2 something does not fit (one line naming the program, T and GiB) or the
config is bad; 4 the preflight cannot run on this host (no libtpu: Linux x86_64 only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from grpoctl_contract.progress import PREFLIGHT_COMPILED
from trainer.hlo_stats import collective_bytes, hbm_traffic

GIB = 1024**3
EXIT_DOES_NOT_FIT = 2
EXIT_HOST = 4


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip facts: HBM XLA may use, peak bf16 flops, HBM bandwidth (published figures)."""

    kind: str
    usable_bytes: int
    peak_flops: float
    hbm_bytes_per_s: float
    ici_bytes_per_s: float  # one chip's published inter-chip bandwidth (all links)


# Usable HBM: v6e's 31.25 GiB is what XLA reports on the chip (32 GiB less its reservation); the others
# assume the same 1/128 reservation of their published HBM.
CHIPS = {
    # ICI: Google's per-chip figures, 3584 / 1600 / 4800 / 2400 Gbit/s.
    "v6e": Chip("v6e", int(31.25 * GIB), 918e12, 1.64e12, 448e9),
    "v5e": Chip("v5e", int(15.875 * GIB), 197e12, 0.819e12, 200e9),
    "v5p": Chip("v5p", int(94.25 * GIB), 459e12, 2.765e12, 600e9),
    "v4": Chip("v4", int(31.75 * GIB), 275e12, 1.2e12, 300e9),
}
_ALIASES = {"v5litepod": "v5e", "v6e": "v6e", "v5e": "v5e", "v5p": "v5p", "v4": "v4"}
# v6e/v5e slices name chips; v5p/v4 name TensorCores (2 per chip).
_CORES_PER_CHIP = {"v6e": 1, "v5e": 1, "v5p": 2, "v4": 2}
_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}


class PreflightError(Exception):
    """One line for the user; `code` is the exit status (2 input, 4 host)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str
    chip: Chip
    topology: str  # jax's topology name, e.g. "v6e:2x4"
    chips_per_host: tuple[int, int, int]
    num_chips: int


def parse_accelerator(name: str) -> Accelerator:
    """'v6e-8', 'v5litepod-16', 'v5p-8', 'v4-8', ... -> the topology jax's tables know."""
    m = re.fullmatch(r"(v6e|v5e|v5litepod|v5p|v4)-(\d+)", name.strip())
    if not m:
        raise PreflightError(
            f"preflight: unknown accelerator {name!r} (expected e.g. v6e-8, v5litepod-16, v5p-8, v4-8)",
            EXIT_DOES_NOT_FIT,
        )
    kind = _ALIASES[m.group(1)]
    count = int(m.group(2))
    cores = _CORES_PER_CHIP[kind]
    chips = count // cores
    bad = PreflightError(f"preflight: no {kind} slice has {count} {'cores' if cores > 1 else 'chips'}", 2)
    if count % cores:
        raise bad
    if kind in ("v6e", "v5e"):
        if chips not in _2D:
            raise bad
        x, y = _2D[chips]
        # One host holds up to 8 chips (v6e-8 is 2x4 on one host); bigger slices have 4 chips per host.
        per_host = (x, y, 1) if chips <= 8 else (2, 2, 1)
        return Accelerator(name, CHIPS[kind], f"{kind}:{x}x{y}", per_host, chips)
    # 3-D tori (v5p, v4): 4 chips per host, 2x2x1 per host.
    shapes = {1: (1, 1, 1), 4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4)}
    if chips not in shapes:
        raise bad
    x, y, z = shapes[chips]
    per_host = (1, 1, 1) if chips == 1 else (2, 2, 1)
    return Accelerator(name, CHIPS[kind], f"{kind}:{x}x{y}x{z}", per_host, chips)


@dataclasses.dataclass
class FunctionReport:
    name: str
    seq_len: int
    peak_bytes: int
    capacity_bytes: int
    fits: bool
    mosaic_kernels: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    generated_code_bytes: int
    compile_s: float
    flops: float
    bytes_accessed: float
    estimated_s: float
    hbm_bytes: float = 0.0  # = bytes_accessed (XLA's cost analysis): HBM traffic per chip, loop bodies once
    collective_bytes: int = 0  # sum of `collectives`
    collectives: dict[str, int] = dataclasses.field(default_factory=dict)  # {kind: bytes per chip}
    # HBM bytes read off the compiled text instead, every loop trip counted (hlo_stats.hbm_traffic), and
    # the same estimate from them: XLA's figure counts loop bodies (the layer scan) once.
    hbm_bytes_counted: int = 0
    estimated_s_counted: float = 0.0


@dataclasses.dataclass
class Program:
    """A jitted trainer function with its abstract arguments."""

    name: str
    fn: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    seq_len: int


# ---------------------------------------------------------------------------------------------------------
# Host and topology.


def tpu_devices(acc: Accelerator) -> list[Any]:
    """The abstract devices of the accelerator's topology (libtpu's compiler, no TPU needed)."""
    try:
        from jax.experimental import topologies
    except ImportError as err:  # pragma: no cover - jax is a trainer dependency
        raise PreflightError(f"preflight: cannot run on this host: {err}", EXIT_HOST) from None
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise PreflightError(
            "preflight: cannot run on this host: libtpu is not installed (pip install 'jax[tpu]';"
            " Linux x86_64 only)", EXIT_HOST,
        ) from None
    try:
        topo = topologies.get_topology_desc(
            platform="tpu", topology_name=acc.topology, chips_per_host_bounds=acc.chips_per_host
        )
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        message = f"preflight: cannot build the {acc.name} topology here: {first}"
        raise PreflightError(message, EXIT_HOST) from None
    # v4/v5p chips hold two TensorCores and the topology lists one device per core; JAX on such a slice
    # runs in megacore mode, one device per chip with the chip's whole HBM, so keep one device per chip
    # (mesh building refuses core-level devices there anyway).
    return [d for d in topo.devices if getattr(d, "core_on_chip", 0) == 0]


# ---------------------------------------------------------------------------------------------------------
# The programs of a run.


def programs_for(cfg: Any, devices: Sequence[Any]) -> tuple[list[Program], dict[str, Any]]:
    """The trainer's jitted functions with abstract inputs for `devices`, and facts for the report."""
    from trainer import programs as P
    from trainer import train
    from trainer.optim import optimizer_for
    from trainer.sampler import _generate

    mesh = P.make_mesh(cfg.mesh_shape, devices)
    num_micro = P.num_micro_batches(cfg, mesh)
    if cfg.model_init == "pretrained":
        model_cfg, source = P.pretrained_model_config(cfg.model_path)
    else:
        from trainer.tokenizer import TINY, load_tokenizer

        # The tiny tokenizer is built offline from the repo; only its size matters here.
        vocab = len(load_tokenizer(cfg.tokenizer_path or TINY))
        model_cfg, source = P.tiny_model_config(cfg, vocab), "tiny_model"
    params = P.abstract_params(model_cfg, mesh, P.DTYPES[cfg.param_dtype])
    optimizer = optimizer_for(cfg.optimizer)
    opt_state = P.abstract_optimizer_state(optimizer, params, mesh)
    ref_params = params if cfg.train.beta > 0 else None
    seq_len = P.worst_case_seq_len(cfg)
    rollout = P.rollout_settings(cfg)
    sweep = P.sweep_settings(cfg)
    width = P.prompt_width(rollout)
    out = [
        Program("optimizer_init", P.optimizer_init(optimizer, params, mesh), (params,), {}, 0),
        Program(
            "sampler", _generate,
            P.abstract_sampler_args(
                model_cfg, mesh, params, P.sampler_rows(cfg.rollout.batch_size, cfg.rollout.n, mesh), rollout
            ),
            {}, width + rollout.max_new_tokens,
        ),
        Program(
            "update_step", train.update_step,
            (params, opt_state, ref_params, P.abstract_batch(cfg, mesh, seq_len), P.abstract_lr(mesh)),
            dict(
                model_cfg=model_cfg, loss_cfg=train.loss_config(cfg), num_micro=num_micro, optimizer=optimizer
            ),
            seq_len,
        ),
    ]
    if cfg.eval_every_steps:
        rows = P.sampler_rows(cfg.rollout.batch_size, cfg.rollout.n, mesh)
        out.append(Program(
            "eval", _generate, P.abstract_sampler_args(model_cfg, mesh, params, rows, rollout), {},
            width + rollout.max_new_tokens,
        ))
    rows = P.sampler_rows(cfg.eval_full_batch_size, 1, mesh)
    out.append(Program(
        "eval_full", _generate, P.abstract_sampler_args(model_cfg, mesh, params, rows, sweep), {},
        width + sweep.max_new_tokens,
    ))
    prefill_args, decode_args = P.abstract_decode_args(
        model_cfg, mesh, params, P.sampler_rows(cfg.rollout.batch_size, cfg.rollout.n, mesh), rollout
    )
    out.append(Program("prefill", P.prefill_program, prefill_args, {}, width))
    out.append(Program("decode_step", P.decode_step_program, decode_args, {}, width + rollout.max_new_tokens))
    facts = {
        "model": source, "mesh": dict(mesh.shape), "num_micro": num_micro,
        "max_new_tokens": rollout.max_new_tokens,
        # update_step is compiled with the lockstep parity's shadow provider in it when the config has one
        "policy_loss_impl": cfg.train.policy_loss_impl,
        "shadow_policy_loss_impl": cfg.train.shadow_policy_loss_impl,
    }
    return out, facts


def mosaic_kernels(hlo_text: str) -> int:
    """Mosaic (Pallas TPU) kernels in a compiled program: its tpu_custom_call custom calls."""
    return len(re.findall(r'custom_call_target="tpu_custom_call"', hlo_text))


def _cost(compiled: Any) -> tuple[float, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    cost = cost or {}
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


_OOM = re.compile(r"Ran out of memory.*?required for HLO temporaries \(([\d.]+)([KMGT]?)\)", re.S)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": GIB, "T": 1024**4}


def _argument_bytes_per_chip(args: Sequence[Any]) -> int:
    """Bytes of the abstract arguments one chip holds (its shards), for when XLA gives no analysis."""
    total = 0
    for leaf in jax_leaves(args):
        sharding = getattr(leaf, "sharding", None)
        if sharding is None or not hasattr(leaf, "shape"):
            continue
        shard = sharding.shard_shape(leaf.shape)
        total += int(math.prod(shard)) * leaf.dtype.itemsize
    return total


def jax_leaves(tree: Any) -> list[Any]:
    import jax

    return jax.tree.leaves(tree)


def compile_program(p: Program, chip: Chip, headroom: float) -> FunctionReport:
    """Compiles one program and reads its per-chip memory and cost analysis.

    XLA refuses a program whose temporaries alone exceed HBM (RESOURCE_EXHAUSTED): that is reported as
    not fitting, with XLA's temp figure plus the arguments' shards (outputs unknown, counted as 0)."""
    capacity = int(chip.usable_bytes * (1.0 - headroom))
    t0 = time.perf_counter()
    try:
        compiled = p.fn.lower(*p.args, **p.kwargs).compile()
    except Exception as err:
        oom = _OOM.search(str(err))
        if oom is None:
            raise
        temp = int(float(oom.group(1)) * _UNITS[oom.group(2)])
        args = _argument_bytes_per_chip(p.args)
        return FunctionReport(
            name=p.name, seq_len=p.seq_len, peak_bytes=args + temp, capacity_bytes=capacity, fits=False,
            mosaic_kernels=0, argument_bytes=args, output_bytes=0, alias_bytes=0, temp_bytes=temp,
            generated_code_bytes=0, compile_s=round(time.perf_counter() - t0, 2), flops=0.0,
            bytes_accessed=0.0, estimated_s=0.0,
        )
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    args, out = int(m.argument_size_in_bytes), int(m.output_size_in_bytes)
    alias, temp = int(m.alias_size_in_bytes), int(m.temp_size_in_bytes)
    peak = args + temp + out - alias
    flops, nbytes = _cost(compiled)
    text = compiled.as_text()
    collectives = collective_bytes(text)
    moved = sum(collectives.values())
    counted = sum(r.hbm_bytes * r.count for r in hbm_traffic(text))
    return FunctionReport(
        name=p.name, seq_len=p.seq_len, peak_bytes=peak, capacity_bytes=capacity, fits=peak <= capacity,
        mosaic_kernels=mosaic_kernels(text), argument_bytes=args, output_bytes=out,
        alias_bytes=alias, temp_bytes=temp, generated_code_bytes=int(m.generated_code_size_in_bytes),
        compile_s=round(seconds, 2), flops=flops, bytes_accessed=nbytes,
        estimated_s=estimate_s(chip, flops, nbytes, moved), hbm_bytes=nbytes, collective_bytes=moved,
        collectives=collectives, hbm_bytes_counted=counted,
        estimated_s_counted=estimate_s(chip, flops, counted, moved),
    )


def estimate_s(chip: Chip, flops: float, hbm_bytes: float, collective_bytes: float) -> float:
    """Roofline ESTIMATE: the slower of compute and HBM traffic, plus the collectives at the chip's ICI
    bandwidth (added, not overlapped: decode's collectives sit between the matmuls that need them)."""
    compute = max(flops / chip.peak_flops, hbm_bytes / chip.hbm_bytes_per_s)
    return compute + collective_bytes / chip.ici_bytes_per_s


def decode_estimate(functions: Sequence[dict[str, Any]], max_new_tokens: int) -> dict[str, float] | None:
    """The estimated rollout: prefill + decode_step x max new tokens (each token is one loop step; the
    first comes from the prefill, so this counts one step more than runs)."""
    by_name = {f["name"]: f for f in functions}
    if "decode_step" not in by_name:
        return None
    step = by_name["decode_step"]["estimated_s"]
    prefill = by_name.get("prefill", {}).get("estimated_s", 0.0)
    step_counted = by_name["decode_step"].get("estimated_s_counted", 0.0)
    prefill_counted = by_name.get("prefill", {}).get("estimated_s_counted", 0.0)
    return {
        "decode_step_s": step, "tokens": max_new_tokens, "decode_s": step * max_new_tokens,
        "prefill_s": prefill, "rollout_s": prefill + step * max_new_tokens,
        "rollout_s_counted": prefill_counted + step_counted * max_new_tokens,
    }


def run(
    cfg: Any, accelerator: str, headroom: float = 0.10,
    on_report: Callable[[FunctionReport], None] | None = None, only: Sequence[str] = (),
) -> dict[str, Any]:
    """The preflight of `cfg` on `accelerator`: the --json object (see the module docstring)."""
    import jax

    from trainer.config import config_hash

    acc = parse_accelerator(accelerator)
    devices = tpu_devices(acc)
    progs, facts = programs_for(cfg, devices)
    reports = []
    for p in progs:
        if only and p.name not in only:
            continue
        r = compile_program(p, acc.chip, headroom)
        reports.append(r)
        if on_report is not None:
            on_report(r)
    reason = None
    for r in reports:
        if not r.fits:
            reason = (
                f"preflight: {r.name} does not fit a {acc.name} chip at T={r.seq_len}:"
                f" {r.peak_bytes / GIB:.1f} GiB needed, {r.capacity_bytes / GIB:.1f} GiB usable"
                f" with {headroom:.0%} headroom"
            )
            break
    functions = [dataclasses.asdict(r) for r in reports]
    return {
        "fits": reason is None,
        "accelerator": acc.name,
        "topology": acc.topology,
        "num_devices": len(devices),
        "headroom": headroom,
        "usable_bytes": acc.chip.usable_bytes,
        "jax_version": jax.__version__,
        "config_hash": config_hash(cfg),
        "reason": reason,
        **facts,
        "decode_estimate": decode_estimate(functions, facts["max_new_tokens"]),
        "functions": functions,
    }


# ---------------------------------------------------------------------------------------------------------
# Report.


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def render(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (
        f"preflight {result['accelerator']} ({result['topology']}, {result['num_devices']} chips, mesh"
        f" {result['mesh']}), per chip, GiB; usable {_gib(result['usable_bytes'])} less"
        f" {result['headroom']:.0%} headroom; jax {result['jax_version']}"
    )
    table = Table(title=title)
    cols = ["function", "T", "args", "out", "alias", "temp", "code", "peak", "capacity", "fits",
            "compile s", "Mosaic", "GFLOP", "GB accessed", "collectives MiB", "est. s (roofline)"]
    for c in cols:
        table.add_column(c, justify="left" if c in ("function", "fits") else "right")
    for f in result["functions"]:
        table.add_row(
            f["name"], str(f["seq_len"] or "-"), _gib(f["argument_bytes"]), _gib(f["output_bytes"]),
            _gib(f["alias_bytes"]), _gib(f["temp_bytes"]), _gib(f["generated_code_bytes"]),
            _gib(f["peak_bytes"]), _gib(f["capacity_bytes"]), "yes" if f["fits"] else "NO",
            f"{f['compile_s']:.1f}", str(f["mosaic_kernels"]), f"{f['flops'] / 1e9:.1f}",
            f"{f['bytes_accessed'] / 1e9:.2f}", f"{f['collective_bytes'] / 1024**2:.1f}",
            f"{f['estimated_s']:.4f}",
        )
    console = Console(width=max(Console().width, 180))  # a wide table: never truncate the figures
    console.print(table)
    shadow = result.get("shadow_policy_loss_impl", "none")
    if shadow != "none":
        console.print(
            f"update_step includes the lockstep parity: the {shadow} provider beside"
            f" {result.get('policy_loss_impl')} on every micro-batch (train.shadow_policy_loss_impl)."
        )
    console.print(
        "est. s is a roofline ESTIMATE (max of flops / peak flops, bytes / HBM bandwidth) with every loop"
        " body counted once, plus collectives at the chip's ICI bandwidth: a lower bound of one pass, not a"
        " step time."
    )
    d = result.get("decode_estimate")
    if d:
        console.print(
            f"decode (ESTIMATE): {d['decode_step_s'] * 1e3:.2f} ms per decode step x {d['tokens']} tokens"
            f" = {d['decode_s']:.2f} s, + prefill {d['prefill_s']:.3f} s = {d['rollout_s']:.2f} s per rollout"
            f" ({d['rollout_s_counted']:.2f} s by the compiled text's HBM bytes, every loop trip counted)"
        )


def suggest(cfg: Any, accelerator: str, headroom: float) -> dict[str, Any]:
    """The largest micro_batch_size_per_device whose update step fits (halving from the whole batch)."""
    from trainer import programs as P
    from trainer import sharding
    from trainer.config import ConfigError, replace

    acc = parse_accelerator(accelerator)
    devices = tpu_devices(acc)
    mesh = P.make_mesh(cfg.mesh_shape, devices)
    per_device = cfg.rollout.batch_size * cfg.rollout.n // sharding.batch_divisor(mesh)
    tried = []
    while per_device >= 1:
        trial = replace(cfg, f"train.micro_batch_size_per_device={per_device}")
        try:
            progs, _ = programs_for(trial, devices)
        except ConfigError:  # a size that does not divide the batch
            per_device //= 2
            continue
        (update,) = [p for p in progs if p.name == "update_step"]
        r = compile_program(update, acc.chip, headroom)
        tried.append({"micro_batch_size_per_device": per_device, **dataclasses.asdict(r)})
        if r.fits:
            return {"micro_batch_size_per_device": per_device, "tried": tried}
        per_device //= 2
    return {"micro_batch_size_per_device": None, "tried": tried}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        print(f"usage error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m trainer.preflight", description=__doc__.split("\n\n")[1])
    parser.add_argument("--config", required=True, help="YAML config file (configs/*.yaml)")
    parser.add_argument("--accelerator", default=None,
                        help="TPU slice, e.g. v6e-8 (default: v6e-8)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, as for python -m trainer")
    parser.add_argument("--headroom", type=float, default=0.10, help="fraction of usable HBM kept free")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--suggest", action="store_true",
                        help="also find the largest micro_batch_size_per_device whose update step fits")
    parser.add_argument("--only", action="append", default=[], metavar="FUNCTION",
                        help="compile only these functions (repeatable; for benchmarks)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.headroom < 1.0:
        parser.error(f"--headroom must be in [0, 1), got {args.headroom}")

    from trainer.config import ConfigError, load

    try:
        cfg = load(args.config, args.overrides)
    except ConfigError as err:
        print(str(err), file=sys.stderr, flush=True)
        return 2
    accelerator = args.accelerator or "v6e-8"
    # The preflight never needs a real device: keep jax's own backend on the CPU (a TPU VM's chips may be
    # busy with a run), and let several preflights load libtpu at once (its lock file is per process).
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        parse_accelerator(accelerator)
        def printer(r: FunctionReport) -> None:  # progress on stderr (a 3B compile takes minutes)
            print(f"{PREFLIGHT_COMPILED}{r.name} in {r.compile_s:.1f} s: peak {r.peak_bytes / GIB:.2f} GiB"
                  f" of {r.capacity_bytes / GIB:.2f}", file=sys.stderr, flush=True)

        result = run(cfg, accelerator, args.headroom, on_report=printer, only=args.only)
        if args.suggest:
            result["suggest"] = suggest(cfg, accelerator, args.headroom)
    except PreflightError as err:
        print(str(err), file=sys.stderr, flush=True)
        return err.code
    except ConfigError as err:
        print(str(err), file=sys.stderr, flush=True)
        return 2
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        render(result)
    if not result["fits"]:
        print(result["reason"], file=sys.stderr, flush=True)
        return EXIT_DOES_NOT_FIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
