"""The rollout sampler's decode step on a TPU slice, before and after it kept its KV cache on the mesh,
compiled on this CPU-only host (libtpu, abstract devices; nothing runs, no time is measured).

    ALLOW_MULTIPLE_LIBTPU_LOAD=1 JAX_PLATFORMS=cpu python benchmarks/bench_decode_roofline.py \
        --config configs/grpo_gsm8k_qwen25_3b_bs128_steps100.yaml [--accelerator v6e-8] [--set k=v]...

Compiles the WHOLE sampler program (`sampler._generate`, prefill + decode while-loop) twice: without the
mesh (what `Sampler.sample` passed before: nothing pins the loop state) and with it (what it passes now),
and reads from each compiled HLO the collectives of one decode-loop iteration (the loop whose trip count
XLA does not know) and those outside it (the prefill). The preflight's own `decode_step` / `prefill`
entries (the loop body and the prefill compiled alone) give the HBM bytes; the estimate is the
preflight's (trainer/preflight.py estimate_s: roofline + collectives at the chip's ICI bandwidth).
Prints a markdown table for BENCHMARKS.md.

    ... bench_decode_roofline.py --config ... --breakdown decode_step|prefill|sampler [--top 15]

compiles that one program instead and prints where its HBM bytes go, instruction by instruction, every loop
trip counted (hlo_stats.hbm_traffic; for `sampler`, one iteration of its decode loop), beside XLA's total.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from trainer import hlo_stats, preflight
from trainer.config import load

MIB = 1024**2


def sampler_collectives(program: preflight.Program) -> tuple[dict[str, int], dict[str, int], float]:
    """(one decode-loop iteration, everything else = prefill and set-up, compile seconds)."""
    t0 = time.perf_counter()
    text = program.fn.lower(*program.args).compile().as_text()
    seconds = time.perf_counter() - t0
    loop = hlo_stats.collective_bytes(text, unbounded_loops_only=True)
    total = hlo_stats.collective_bytes(text)  # the loop body counted once
    rest = {k: total.get(k, 0) - loop.get(k, 0) for k in total if total.get(k, 0) - loop.get(k, 0)}
    return loop, rest, seconds


def breakdown(program: preflight.Program, top: int) -> None:
    """The largest HBM movers of one compiled program (one decode-loop iteration for the whole sampler)."""
    t0 = time.perf_counter()
    compiled = program.fn.lower(*program.args, **program.kwargs).compile()
    seconds = time.perf_counter() - t0
    text = compiled.as_text()
    loop_only = program.name == "sampler"
    rows = sorted(
        hlo_stats.hbm_traffic(text, unbounded_loops_only=loop_only), key=lambda r: -r.hbm_bytes * r.count
    )
    total = sum(r.hbm_bytes * r.count for r in rows)
    moved = sum(hlo_stats.collective_bytes(text, unbounded_loops_only=loop_only).values())
    _, xla = preflight._cost(compiled)
    scope = "one decode-loop iteration" if loop_only else "the whole program"
    print(
        f"{program.name} ({scope}, compiled in {seconds:.0f} s): HBM {total / MIB:.1f} MiB counted from the"
        f" compiled text (XLA's cost analysis of the whole program: {xla / MIB:.1f} MiB), collectives"
        f" {moved / MIB:.1f} MiB"
    )
    print("| MiB | x | op | instruction | from |")
    print("|---:|---:|---|---|---|")
    for r in rows[:top]:
        print(f"| {r.hbm_bytes * r.count / MIB:.1f} | {r.count} | {r.op} | {r.name} | {r.source[-60:]} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--accelerator", default="v6e-8")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--breakdown", choices=("decode_step", "prefill", "sampler"))
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    cfg = load(args.config, args.overrides)
    acc = preflight.parse_accelerator(args.accelerator)
    chip = acc.chip
    devices = preflight.tpu_devices(acc)
    progs, facts = preflight.programs_for(cfg, devices)
    by_name = {p.name: p for p in progs}
    if args.breakdown:
        breakdown(by_name[args.breakdown], args.top)
        return
    entries = {}
    for name in ("decode_step", "prefill"):
        r = preflight.compile_program(by_name[name], chip, 0.1)
        entries[name] = r
        print(f"compiled {name} alone in {r.compile_s:.0f} s", file=sys.stderr, flush=True)
    sampler = by_name["sampler"]
    rows = []
    variants = (("before: mesh not passed", None), ("after: state pinned on the mesh", sampler.args[-1]))
    for label, mesh_arg in variants:
        program = dataclasses.replace(sampler, args=sampler.args[:-1] + (mesh_arg,))
        loop, rest, seconds = sampler_collectives(program)
        print(f"compiled the whole sampler ({label}) in {seconds:.0f} s", file=sys.stderr, flush=True)
        rows.append((label, loop, rest))
    step, pre = entries["decode_step"], entries["prefill"]
    tokens = facts["max_new_tokens"]
    print(
        f"| sampler ({args.accelerator}, per chip) | decode step: collectives MiB | HBM MiB | est. ms |"
        f" est. s per {tokens}-token rollout | prefill: collectives MiB | HBM MiB | est. s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, loop, rest in rows:
        moved, moved_pre = sum(loop.values()), sum(rest.values())
        est = preflight.estimate_s(chip, step.flops, step.hbm_bytes, moved)
        est_pre = preflight.estimate_s(chip, pre.flops, pre.hbm_bytes, moved_pre)
        print(
            f"| {label} | {moved / MIB:.1f} | {step.hbm_bytes / MIB:.0f} | {est * 1e3:.2f} |"
            f" {est * tokens + est_pre:.2f} | {moved_pre / MIB:.1f} | {pre.hbm_bytes / MIB:.0f} |"
            f" {est_pre:.3f} |"
        )
    for name, r in entries.items():
        print(
            f"| preflight `{name}` entry (compiled alone) | {r.collective_bytes / MIB:.1f} |"
            f" {r.hbm_bytes / MIB:.0f} | {r.estimated_s * 1e3:.2f} | | | | |"
        )
    for label, loop, _ in rows:
        kinds = ", ".join(f"{k} {v / MIB:.1f}" for k, v in sorted(loop.items()))
        print(f"\n{label}: decode-step collectives by kind (MiB): {kinds or 'none'}")


if __name__ == "__main__":
    main()
