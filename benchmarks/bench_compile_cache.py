"""Fast restart: compile seconds of a first start vs a run resumed after a stop, with JAX's persistent
compilation cache (compile_cache_dir) and without it.

Three trainer processes on configs/tiny_cpu.yaml (shortened):
  1. first start, empty cache: stopped by SIGTERM after step 2 (as a spot preemption does; it checkpoints)
  2. the same run dir relaunched: resumes from the checkpoint, the cache holds step 1's programs
  3. control: the same resume with compile_cache_dir=false (a copy of the checkpoints, so it resumes alike)
Compile seconds are the trainer's own (the `compile` entry of its time ledger: trace, lowering, XLA
compile or cache load), read from its last progress event.

    PYTHONPATH=$PWD python benchmarks/bench_compile_cache.py [--steps 4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from grpoctl_contract.progress import decode

ROOT = Path(__file__).resolve().parents[1]


def run(run_dir: Path, sets: list[str], stop_after: int | None = None) -> dict:
    cmd = [sys.executable, "-m", "trainer", "--config", "configs/tiny_cpu.yaml", "--run-dir", str(run_dir)]
    cmd += [a for s in sets for a in ("--set", s)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    last = None
    assert proc.stdout is not None
    for line in proc.stdout:
        ev = decode(line)
        if ev is None or not ev.ledger:
            continue
        last = ev
        if stop_after is not None and ev.event == "progress" and (ev.step or 0) >= stop_after:
            proc.send_signal(signal.SIGTERM)
            stop_after = None
    code = proc.wait()
    assert last is not None, f"no events (exit {code})"
    return {"exit": code, "compile_s": last.ledger["phase_s"].get("compile", 0.0), "step": last.step,
            "resumed_from": last.ledger["resumed_from"], "elapsed_s": last.elapsed_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-cc-"))
    sets = [f"steps={args.steps}", "warm_start.steps=10", "eval_every_steps=0", "eval_full_sweep=false",
            "checkpoint.every_steps=1", "wandb_mode=disabled"]
    cache = [f"compile_cache_dir={base / 'cache'}"]
    try:
        first = run(base / "runs" / "r", sets + cache, stop_after=2)
        shutil.copytree(base / "runs" / "r", base / "runs-nocache" / "r")
        resumed = run(base / "runs" / "r", sets + cache)
        control = run(base / "runs-nocache" / "r", [*sets, "compile_cache_dir=false"])
    finally:
        shutil.rmtree(base, ignore_errors=True)
    for name, r in (("first start (empty cache)", first), ("resumed, cache", resumed),
                    ("resumed, no cache", control)):
        print(f"{name:28s} exit {r['exit']:3d}  resumed_from {r['resumed_from']}  "
              f"compile {r['compile_s']:7.2f} s  elapsed {r['elapsed_s']:7.2f} s")
    print(f"ratio resumed/first compile: {resumed['compile_s'] / first['compile_s']:.3f}")
    print(f"ratio resumed with/without cache: {resumed['compile_s'] / control['compile_s']:.3f}")


if __name__ == "__main__":
    main()
