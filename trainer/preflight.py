"""python -m trainer.preflight --config CONFIG [--accelerator v6e-8] [--set key=value]... [--headroom 0.10]
                             [--json] [--suggest] [--compile-cache DIR]

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
  decode_step     ONE step of the rollout sampler's decode loop (the loop body itself, compiled alone)
  behaviour_logprobs  the old policy's log-probs (only when train.ppo_epochs > 1)

Per chip: peak = arguments + temp + outputs - aliased (XLA's own check compares temp alone with HBM, so a
program whose arguments and temp exceed HBM can still compile). A program fits when peak <= usable HBM x
(1 - headroom).

Time: every entry carries `flops`, `hbm_bytes`, `collective_bytes` per chip, read off the compiled text
with every loop trip counted (the layer scan, the micro-batch loop; trainer/hlo_stats.py: matmul flops,
a Pallas kernel's CostEstimate, HBM bytes per instruction, collectives by kind), and one roofline ESTIMATE

    estimated_s = max(flops / peak FLOP/s, hbm_bytes / HBM bandwidth) + collective_bytes / ICI bandwidth

with the chip's published figures (grpoctl_contract/accelerators.py). XLA's own cost analysis counts each
loop body once; it is kept beside (`xla_flops`, `bytes_accessed`, `xla_estimated_s`). A loop whose trip
count depends on data (the sampler's decode loop) is counted once, and its one iteration is reported
apart (`data_loop`). `decode_estimate` is prefill + decode_step x max new tokens; `grpo_step` is one whole
GRPO step (rollout + log-prob passes + update + amortised eval, see `grpo_step`), device work only: no
host time, rewards, Python or dispatch.

`--compile-cache DIR` keeps each compiled program's analysis and HLO keyed by its lowered module, so an
unchanged program (a 3B update step takes many minutes) is read back instead of compiled again.

Exit codes (grpoctl_contract/preflight.py, with the report's schema): 0 everything fits; 2 something does
not fit (one line naming the program, T and GiB) or the config is bad; 4 the preflight cannot run on this
host (no libtpu: Linux x86_64 only).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from grpoctl_contract import preflight_table
from grpoctl_contract.accelerators import GIB, AcceleratorError, Chip, Slice, parse_slice
from grpoctl_contract.preflight import (
    DEFAULT_ACCELERATOR,
    DEFAULT_HEADROOM,
    EXIT_DOES_NOT_FIT,
    EXIT_FITS,
    EXIT_UNAVAILABLE,
    FunctionReport,
    Report,
)
from grpoctl_contract.progress import PREFLIGHT_COMPILED
from trainer.hlo_stats import collective_bytes, hbm_traffic, matmul_flops


class PreflightError(Exception):
    """One line for the user; `code` is the exit status (EXIT_DOES_NOT_FIT input, EXIT_UNAVAILABLE host)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def parse_accelerator(name: str) -> Slice:
    """'v6e-8', 'v5litepod-16', 'v5p-8', 'v4-8', ... -> the slice and the topology jax's tables know
    (grpoctl_contract/accelerators.py: the laptop reads the same table)."""
    try:
        return parse_slice(name)
    except AcceleratorError as err:
        raise PreflightError(f"preflight: {err}", EXIT_DOES_NOT_FIT) from None


@dataclasses.dataclass
class Program:
    """A jitted trainer function with its abstract arguments."""

    name: str
    fn: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    seq_len: int
    # The program this one is by construction (same function, arguments and settings): its report is
    # that program's, not compiled again. The periodic eval samples exactly like a rollout (a 3B
    # compile of it took 108 s of a 331 s preflight).
    same_as: str | None = None


# ---------------------------------------------------------------------------------------------------------
# Host and topology.


def tpu_devices(acc: Slice) -> list[Any]:
    """The abstract devices of the accelerator's topology (libtpu's compiler, no TPU needed)."""
    try:
        from jax.experimental import topologies
    except ImportError as err:  # pragma: no cover - jax is a trainer dependency
        raise PreflightError(f"preflight: cannot run on this host: {err}", EXIT_UNAVAILABLE) from None
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise PreflightError(
            "preflight: cannot run on this host: libtpu is not installed (pip install 'jax[tpu]';"
            " Linux x86_64 only)", EXIT_UNAVAILABLE,
        ) from None
    try:
        topo = topologies.get_topology_desc(
            platform="tpu", topology_name=acc.topology, chips_per_host_bounds=acc.chips_per_host
        )
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        message = f"preflight: cannot build the {acc.name} topology here: {first}"
        raise PreflightError(message, EXIT_UNAVAILABLE) from None
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
    if cfg.train.ppo_epochs > 1:  # the sampling policy's log-probs, once per step before the epochs
        out.append(Program(
            "behaviour_logprobs", train.behaviour_logprobs, (params, P.abstract_batch(cfg, mesh, seq_len)),
            dict(model_cfg=model_cfg, loss_cfg=train.loss_config(cfg), num_micro=num_micro), seq_len,
        ))
    if cfg.eval_every_steps:
        rows = P.sampler_rows(cfg.rollout.batch_size, cfg.rollout.n, mesh)
        out.append(Program(
            "eval", _generate, P.abstract_sampler_args(model_cfg, mesh, params, rows, rollout), {},
            width + rollout.max_new_tokens, same_as="sampler",
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
        "max_new_tokens": rollout.max_new_tokens, "sweep_max_new_tokens": sweep.max_new_tokens,
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


def _cache_key(lowered_text: str, chip: Chip, topology: str) -> str:
    """The compiled program is a function of the lowered module, the target topology and the compiler."""
    import importlib.metadata as md

    import jax

    try:
        libtpu = md.version("libtpu")
    except md.PackageNotFoundError:
        libtpu = "?"
    digest = hashlib.sha256()
    for part in (lowered_text, chip.kind, topology, jax.__version__, libtpu):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:32]


@dataclasses.dataclass(frozen=True)
class Compiled:
    """What the preflight reads off one compiled program (cached as JSON + the gzipped HLO text)."""

    memory: dict[str, int]  # argument / output / alias / temp / generated_code bytes per chip
    flops: float  # XLA's cost analysis (loop bodies once)
    bytes_accessed: float
    text: str  # the compiled HLO module
    compile_s: float


def _compile(p: Program, topology: str, chip: Chip, cache: Path | None) -> Compiled:
    """Compiles `p` (or reads it from `cache`, keyed by its lowered module: a 3B update step takes many
    minutes to compile and an unchanged program need not be compiled twice)."""
    t0 = time.perf_counter()
    lowered = p.fn.lower(*p.args, **p.kwargs)
    key = _cache_key(lowered.as_text(), chip, topology) if cache is not None else ""
    if cache is not None and (cache / f"{key}.json").is_file() and (cache / f"{key}.hlo.gz").is_file():
        try:
            meta = json.loads((cache / f"{key}.json").read_text())
            text = gzip.decompress((cache / f"{key}.hlo.gz").read_bytes()).decode()
            return Compiled(meta["memory"], meta["flops"], meta["bytes_accessed"], text, meta["compile_s"])
        except (OSError, ValueError, KeyError):
            pass  # a torn entry: compile again
    compiled = lowered.compile()
    seconds = round(time.perf_counter() - t0, 2)
    m = compiled.memory_analysis()
    memory = {
        k: int(getattr(m, f"{k}_size_in_bytes"))
        for k in ("argument", "output", "alias", "temp", "generated_code")
    }
    flops, nbytes = _cost(compiled)
    out = Compiled(memory, flops, nbytes, compiled.as_text(), seconds)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        meta = dict(name=p.name, memory=memory, flops=flops, bytes_accessed=nbytes, compile_s=seconds)
        entries = ((".hlo.gz", gzip.compress(out.text.encode())), (".json", json.dumps(meta).encode()))
        for suffix, data in entries:  # the JSON last: it marks the entry complete
            tmp = cache / f"{key}{suffix}.{os.getpid()}.tmp"
            tmp.write_bytes(data)
            tmp.replace(cache / f"{key}{suffix}")  # atomic: a preflight beside this one never reads half
    return out


def compile_program(
    p: Program, chip: Chip, headroom: float, topology: str = "", cache: Path | None = None
) -> FunctionReport:
    """Compiles one program and reads its per-chip memory and cost analysis.

    XLA refuses a program whose temporaries alone exceed HBM (RESOURCE_EXHAUSTED): that is reported as
    not fitting, with XLA's temp figure plus the arguments' shards (outputs unknown, counted as 0)."""
    capacity = int(chip.usable_bytes * (1.0 - headroom))
    t0 = time.perf_counter()
    try:
        c = _compile(p, topology, chip, cache)
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
    m = c.memory
    args, out, alias, temp = m["argument"], m["output"], m["alias"], m["temp"]
    peak = args + temp + out - alias
    text = c.text
    collectives = collective_bytes(text)
    moved = sum(collectives.values())
    flops = matmul_flops(text)
    counted = sum(r.hbm_bytes * r.count for r in hbm_traffic(text))
    loop = {
        "flops": matmul_flops(text, unbounded_loops_only=True),
        "hbm_bytes": float(sum(r.hbm_bytes * r.count for r in hbm_traffic(text, unbounded_loops_only=True))),
        "collective_bytes": float(sum(collective_bytes(text, unbounded_loops_only=True).values())),
    }
    return FunctionReport(
        name=p.name, seq_len=p.seq_len, peak_bytes=peak, capacity_bytes=capacity, fits=peak <= capacity,
        mosaic_kernels=mosaic_kernels(text), argument_bytes=args, output_bytes=out,
        alias_bytes=alias, temp_bytes=temp, generated_code_bytes=m["generated_code"],
        compile_s=c.compile_s, flops=flops, bytes_accessed=c.bytes_accessed,
        estimated_s=estimate_s(chip, flops, counted, moved), hbm_bytes=counted, collective_bytes=moved,
        collectives=collectives, xla_flops=c.flops,
        xla_estimated_s=estimate_s(chip, c.flops, c.bytes_accessed, moved),
        data_loop=loop if any(loop.values()) else None,
    )


def estimate_s(chip: Chip, flops: float, hbm_bytes: float, collective_bytes: float) -> float:
    """Roofline ESTIMATE: the slower of compute and HBM traffic, plus the collectives at the chip's ICI
    bandwidth (added, not overlapped: decode's collectives sit between the matmuls that need them); the
    formula and constants live in grpoctl_contract/accelerators.py."""
    return chip.estimate_s(flops, hbm_bytes, collective_bytes)


def decode_estimate(functions: Sequence[dict[str, Any]], max_new_tokens: int) -> dict[str, float] | None:
    """The estimated rollout: prefill + decode_step x max new tokens (each token is one loop step; the
    first comes from the prefill, so this counts one step more than runs)."""
    by_name = {f["name"]: f for f in functions}
    if "decode_step" not in by_name:
        return None
    step = by_name["decode_step"]["estimated_s"]
    prefill = by_name.get("prefill", {}).get("estimated_s", 0.0)
    return {
        "decode_step_s": step, "tokens": max_new_tokens, "decode_s": step * max_new_tokens,
        "prefill_s": prefill, "rollout_s": prefill + step * max_new_tokens,
    }


_SUMS = ("flops", "hbm_bytes", "collective_bytes")


def _looped(chip: Chip, f: dict[str, Any], trips: int, times: float = 1.0) -> dict[str, float]:
    """A whole sampler program run `times` times with `trips` decode-loop iterations each: what lies outside
    the data-dependent loop once, plus `trips` iterations, each piece through the roofline formula."""
    loop = f.get("data_loop") or dict.fromkeys(_SUMS, 0.0)
    outside = {k: f[k] - loop[k] for k in _SUMS}
    seconds = estimate_s(chip, *(outside[k] for k in _SUMS))
    seconds += trips * estimate_s(chip, *(loop[k] for k in _SUMS))
    out = {k: times * (outside[k] + trips * loop[k]) for k in _SUMS}
    return {**out, "estimated_s": times * seconds}


def _once(f: dict[str, Any], times: float) -> dict[str, float]:
    return {**{k: times * f[k] for k in _SUMS}, "estimated_s": times * f["estimated_s"]}


def grpo_step(chip: Chip, functions: Sequence[dict[str, Any]], plan: dict[str, Any]) -> dict[str, Any] | None:
    """One whole GRPO step of the config, per chip, device work only (see `step_plan`):

      rollout   the sampler program: prefill + max_new_tokens decode steps (every row runs to the end)
      logprob   the behaviour log-prob pass (ppo_epochs > 1; at beta > 0 the reference pass is inside the
                update step's program and counted there)
      update    the update step (every micro-batch and layer) x ppo_epochs, at the worst-case length
      eval      the periodic eval, the frozen-policy baseline and the full sweeps, amortised per step

    Each part applies the one roofline formula to each program (and to each decode iteration) it runs,
    since programs run one after another; `estimated_s` is the sum of the parts, and flops / hbm_bytes /
    collective_bytes the sums of theirs. None when a program it needs was not compiled (--only)."""
    by_name = {f["name"]: f for f in functions}
    needed = {"sampler", "update_step"} | ({"eval"} if plan["evals_per_step"] else set())
    needed |= {"eval_full"} if plan["sweep_batches_per_step"] else set()
    needed |= {"behaviour_logprobs"} if plan["ppo_epochs"] > 1 else set()
    if not needed <= set(by_name):
        return None
    zero = {**dict.fromkeys(_SUMS, 0.0), "estimated_s": 0.0}
    parts = {
        "rollout": _looped(chip, by_name["sampler"], plan["max_new_tokens"]),
        "logprob": _once(by_name["behaviour_logprobs"], 1.0) if plan["ppo_epochs"] > 1 else zero,
        "update": _once(by_name["update_step"], plan["ppo_epochs"]),
    }
    evals = [zero]
    if plan["evals_per_step"]:
        evals.append(_looped(chip, by_name["eval"], plan["max_new_tokens"], plan["evals_per_step"]))
    if plan["baselines_per_step"]:  # the frozen start policy's rollout: the sampler program again
        evals.append(_looped(chip, by_name["sampler"], plan["max_new_tokens"], plan["baselines_per_step"]))
    if plan["sweep_batches_per_step"]:
        evals.append(_looped(chip, by_name["eval_full"], plan["sweep_max_new_tokens"],
                             plan["sweep_batches_per_step"]))
    parts["eval"] = {k: sum(e[k] for e in evals) for k in zero}
    out: dict[str, Any] = {k: sum(p[k] for p in parts.values()) for k in _SUMS}
    out["estimated_s"] = sum(p["estimated_s"] for p in parts.values())
    out.update({f"{name}_s": p["estimated_s"] for name, p in parts.items()})
    out["parts"] = parts
    out["plan"] = dict(plan)
    return out


def step_plan(cfg: Any, max_new_tokens: int, sweep_max_new_tokens: int) -> dict[str, Any]:
    """How often each program runs per GRPO step of `cfg` (eval and sweeps amortised over the run)."""
    from trainer.progress import batches, eval_steps

    steps = max(cfg.steps, 1)
    evals = len(eval_steps(1, cfg.steps, cfg.eval_every_steps)) if cfg.eval_every_steps else 0
    sweeps = (1 + int(cfg.eval_full_at_start)) if cfg.eval_full_sweep else 0
    # The sweep's question count: eval_full_limit, else the split's (GSM8K test: 1319 questions).
    questions = cfg.eval_full_limit or (1319 if cfg.data.source == "gsm8k" else cfg.eval_full_batch_size)
    return {
        "steps": cfg.steps,
        "max_new_tokens": max_new_tokens,
        "ppo_epochs": cfg.train.ppo_epochs,
        "evals_per_step": evals * cfg.eval_batches_per_process / steps,
        "baselines_per_step": (1.0 / cfg.baseline_every_steps) if cfg.baseline_every_steps else 0.0,
        "sweep_batches_per_step": sweeps * batches(questions, cfg.eval_full_batch_size) / steps,
        "sweep_max_new_tokens": sweep_max_new_tokens,
    }


def run(
    cfg: Any, accelerator: str, headroom: float = DEFAULT_HEADROOM,
    on_report: Callable[[FunctionReport], None] | None = None, only: Sequence[str] = (),
    cache: Path | None = None,
) -> dict[str, Any]:
    """The preflight of `cfg` on `accelerator`: the --json object (see the module docstring)."""
    import jax

    from trainer.config import config_hash

    acc = parse_accelerator(accelerator)
    devices = tpu_devices(acc)
    progs, facts = programs_for(cfg, devices)
    reports: list[FunctionReport] = []
    for p in progs:
        if only and p.name not in only:
            continue
        shared = next((r for r in reports if r.name == p.same_as), None)
        if shared is not None:  # the same program: its figures, nothing compiled
            r = dataclasses.replace(shared, name=p.name, compile_s=0.0)
        else:
            r = compile_program(p, acc.chip, headroom, acc.topology, cache)
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
    functions = [r.to_json() for r in reports]
    plan = step_plan(cfg, facts["max_new_tokens"], facts["sweep_max_new_tokens"])
    return Report(
        fits=reason is None,
        accelerator=acc.name,
        topology=acc.topology,
        num_devices=len(devices),
        headroom=headroom,
        usable_bytes=acc.chip.usable_bytes,
        jax_version=jax.__version__,
        config_hash=config_hash(cfg),
        reason=reason,
        functions=tuple(reports),
        extra={
            **facts,
            "decode_estimate": decode_estimate(functions, facts["max_new_tokens"]),
            "grpo_step": grpo_step(acc.chip, functions, plan),
        },
    ).to_json()


# ---------------------------------------------------------------------------------------------------------
# Report.


def render(result: dict[str, Any]) -> None:
    """The report for people: the same table and notes `grpoctl preflight` prints (one renderer)."""
    print("\n".join(preflight_table.render(Report.from_json(result))), flush=True)


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
        tried.append({"micro_batch_size_per_device": per_device, **r.to_json()})
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
                        help=f"TPU slice, e.g. v6e-8 (default: {DEFAULT_ACCELERATOR})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, as for python -m trainer")
    parser.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM,
                        help="fraction of usable HBM kept free")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--suggest", action="store_true",
                        help="also find the largest micro_batch_size_per_device whose update step fits")
    parser.add_argument("--compile-cache", type=Path, default=None, metavar="DIR",
                        help="keep each compiled program's analysis and HLO here, keyed by its lowered"
                        " module; an unchanged program is read back instead of compiled again")
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
        return EXIT_DOES_NOT_FIT
    accelerator = args.accelerator or DEFAULT_ACCELERATOR
    # The preflight never needs a real device: keep jax's own backend on the CPU (a TPU VM's chips may be
    # busy with a run), and let several preflights load libtpu at once (its lock file is per process).
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        parse_accelerator(accelerator)
        def printer(r: FunctionReport) -> None:  # progress on stderr (a 3B compile takes minutes)
            print(f"{PREFLIGHT_COMPILED}{r.name} in {r.compile_s:.1f} s: peak {r.peak_bytes / GIB:.2f} GiB"
                  f" of {r.capacity_bytes / GIB:.2f}", file=sys.stderr, flush=True)

        result = run(
            cfg, accelerator, args.headroom, on_report=printer, only=args.only, cache=args.compile_cache
        )
        if args.suggest:
            result["suggest"] = suggest(cfg, accelerator, args.headroom)
    except PreflightError as err:
        print(str(err), file=sys.stderr, flush=True)
        return err.code
    except ConfigError as err:
        print(str(err), file=sys.stderr, flush=True)
        return EXIT_DOES_NOT_FIT
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        render(result)
    if not result["fits"]:
        print(result["reason"], file=sys.stderr, flush=True)
        return EXIT_DOES_NOT_FIT
    return EXIT_FITS


if __name__ == "__main__":
    sys.exit(main())
