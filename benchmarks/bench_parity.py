"""What lockstep parity costs per GRPO step: the same run with and without train.shadow_policy_loss_impl.

    python benchmarks/bench_parity.py [--config configs/tiny_cpu_pallas.yaml] [--shadow jax] [--steps 8]
        [--set k=v ...]

Builds the trainer twice in this process (trainer.train.setup), shadow off and shadow on, and runs the same
GRPO steps with each (rollout, rewards, update; no eval, no checkpoint, no W&B). The shadow never changes the
update, so both runs sample the same tokens and do the same work apart from the shadow: the ratio of their
step times is the shadow's cost. Step 1 (compilation) is left out; the figures are medians over the other
steps of the update phase and of the whole step, in wall seconds and in this process's CPU seconds (on a
shared machine CPU seconds are the steadier measure). The two variants alternate step by step, so a load
change on the machine hits both alike. BENCHMARKS.md records the command and the figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUIET = ("eval_every_steps=0", "eval_full_sweep=false", "wandb_mode=disabled", "checkpoint.every_steps=0",
         "baseline_every_steps=0", "warm_start.steps=0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny_cpu_pallas.yaml"))
    parser.add_argument("--shadow", default="jax", choices=["jax", "chunked", "pallas"])
    parser.add_argument("--steps", type=int, default=8, help="GRPO steps per variant, the first not timed")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    from trainer import config as C
    from trainer.train import StepTimer, setup, train_step

    variants = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench-parity-"))
    for name, shadow in (("off", "none"), ("on", args.shadow)):
        cfg = C.load(args.config, [*QUIET, *args.overrides, f"train.shadow_policy_loss_impl={shadow}"], {})
        trainer, state, _ = setup(cfg, tmp / name)
        variants[name] = {"t": trainer, "state": state, "update": [], "step": [], "cpu": [], "parity": []}
    for step in range(1, args.steps + 1):
        for v in variants.values():
            timer, wall0, cpu0 = StepTimer(), time.perf_counter(), time.process_time()
            v["state"], metrics = train_step(v["t"], v["state"], step, timer)
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            if step > 1:  # step 1 compiles
                v["update"].append(timer.times["update"])
                v["step"].append(wall)
                v["cpu"].append(cpu)
            v["parity"].append(metrics.get("train/parity/grad_rel_diff"))

    keys = ("update", "step", "cpu")
    med = {name: {k: statistics.median(v[k]) for k in keys} for name, v in variants.items()}
    cfg = variants["on"]["t"].cfg
    print(f"config {args.config}: policy_loss_impl {cfg.train.policy_loss_impl}, shadow {args.shadow}, "
          f"{cfg.rollout.batch_size} x {cfg.rollout.n} rows per step, {args.steps - 1} timed steps each")
    print("| shadow | update s (median) | whole step s | whole step CPU s |")
    print("|---|---|---|---|")
    for name in ("off", "on"):
        m = med[name]
        print(f"| {name} | {m['update']:.3f} | {m['step']:.3f} | {m['cpu']:.3f} |")
    on, off = med["on"], med["off"]
    print(f"| on / off | {on['update'] / off['update']:.2f}x | {on['step'] / off['step']:.2f}x "
          f"| {on['cpu'] / off['cpu']:.2f}x |")
    worst = max(x for x in variants["on"]["parity"] if x is not None)
    print(f"max train/parity/grad_rel_diff over the steps: {worst:.2e}")


if __name__ == "__main__":
    main()
