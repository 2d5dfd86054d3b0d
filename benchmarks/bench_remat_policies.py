"""Peak HBM and roofline seconds of the update step under each remat policy, compiled for a TPU slice here.

    ALLOW_MULTIPLE_LIBTPU_LOAD=1 JAX_PLATFORMS=cpu python benchmarks/bench_remat_policies.py \
        [--config configs/grpo_gsm8k_qwen25_3b_bs128_steps100.yaml] [--accelerator v6e-8] \
        [--policies nothing_saveable save_attention ...] [--compile-cache DIR] [--set key=value]...

One libtpu compile of `update_step` per policy (train.remat=true, train.remat_policy=P), exactly as the
preflight compiles it (worst-case T, every micro-batch); with --compile-cache a policy compiled before is
read back. Prints one markdown row per policy: per-chip peak (args + temp + out - alias) against the
usable HBM less 10% headroom, and the preflight's estimate (flops, HBM bytes, collectives: every loop trip
counted) -- the fastest policy that fits is the one the shipped configs should name.
"""

from __future__ import annotations

import argparse
import os
import sys
import typing
from pathlib import Path

GIB = 1024**3


def main() -> int:
    from trainer import config as C

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/grpo_gsm8k_qwen25_3b_bs128_steps100.yaml")
    parser.add_argument("--accelerator", default="v6e-8")
    parser.add_argument("--policies", nargs="+", default=list(typing.get_args(C.RematPolicy)))
    parser.add_argument("--compile-cache", type=Path, default=None)
    parser.add_argument("--headroom", type=float, default=0.10)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from trainer import preflight

    capacity = preflight.parse_accelerator(args.accelerator).chip.usable_bytes * (1 - args.headroom)
    print(f"update_step of {args.config} on {args.accelerator}, per chip, capacity {capacity / GIB:.2f}\n")
    print("| remat_policy | peak GiB | temp GiB | fits | TFLOP | HBM GB | collectives GB | est. s |"
          " compile s |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for policy in args.policies:
        sets = [*args.overrides, "train.remat=true", f"train.remat_policy={policy}"]
        cfg = C.load(args.config, sets)
        try:
            result = preflight.run(cfg, args.accelerator, args.headroom, only=("update_step",),
                                   cache=args.compile_cache)
        except Exception as err:  # e.g. host offload refused by the compiler: say so, go on
            print(f"| {policy} | failed: {type(err).__name__}: {str(err).splitlines()[0][:80]} |||||||")
            continue
        (f,) = result["functions"]
        print(
            f"| {policy} | {f['peak_bytes'] / GIB:.2f} | {f['temp_bytes'] / GIB:.2f}"
            f" | {'yes' if f['fits'] else 'NO'}"
            f" | {f['flops'] / 1e12:.1f} | {f['hbm_bytes'] / 1e9:.0f} | {f['collective_bytes'] / 1e9:.1f}"
            f" | {f['estimated_s']:.2f} | {f['compile_s']:.0f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
