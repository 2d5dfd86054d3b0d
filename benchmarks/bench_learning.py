"""Does GRPO learn? Runs the trainer and pairs its start and end sweeps question by question.

    python benchmarks/bench_learning.py [--config configs/tiny_cpu.yaml] [--set k=v ...] [--label L]
        [--out-dir DIR]

Each run is `python -m trainer --config C --run-dir D --set eval_full_sweep=true ...` in a fresh process
(timed from the outside: wall seconds include start-up and compilation). It reads D/eval_full_start.jsonl
(the policy right before GRPO step 1) and D/eval_full.jsonl (after the last step) and prints one table row:
start -> end greedy accuracy, the discordant pairs, the exact McNemar p-value, the frozen-start-policy
baseline reward beside the trained policy's, the same as an exact McNemar over the sampled completions of
the last 3 baseline steps (policy and frozen start policy sample the same prompts with the same keys, so
each completion is a pair: the sampled pass rate, start -> end), and the mean step time. On a shared
machine compare step times across rows of one sitting; BENCHMARKS.md records the command and figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.compare import mcnemar_exact_p, paired_test  # noqa: E402
from orchestrator.learning import sampled_test  # noqa: E402


def _correctness(path: Path) -> dict[str, bool]:
    return {row["id"]: bool(row["correct"]) for row in map(json.loads, path.read_text().splitlines())}


def _sampled(path: Path) -> dict[str, tuple[int, int]]:
    """Question id -> (right, samples) of the sweep's sampled pass (eval_full_sampled), {} without one."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["id"]: (r["sampled_correct"], r["samples"]) for r in rows if "samples" in r}


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if isinstance(r.get(key), int | float)]
    return sum(values) / len(values) if values else None


def _children_cpu_s() -> float:
    """User + system CPU seconds of finished child processes: on a shared machine a steadier measure of
    the work than wall time (on 2 idle cores, wall is roughly CPU / 2 to CPU / 1)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(config: str, overrides: list[str], run_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "trainer", "--config", config, "--run-dir", str(run_dir), "--set",
           "eval_full_sweep=true", "--set", "eval_full_at_start=true", "--set", "wandb_mode=disabled"]
    for item in overrides:
        cmd += ["--set", item]
    t0, cpu0 = time.perf_counter(), _children_cpu_s()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    wall, cpu = time.perf_counter() - t0, _children_cpu_s() - cpu0
    if proc.returncode:
        raise SystemExit(f"trainer failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    start = _correctness(run_dir / "eval_full_start.jsonl")
    end = _correctness(run_dir / "eval_full.jsonl")
    paired = paired_test(start, end)
    sweeps = (_sampled(run_dir / name) for name in ("eval_full_start.jsonl", "eval_full.jsonl"))
    sampled = sampled_test("run", *sweeps)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if m.get("step", 0) > 0]
    with_base = [m for m in steps if "train/baseline/reward/total/mean" in m]
    # The sampled pass rate, start -> end: at the last 3 baseline steps the policy and the frozen start
    # policy sampled the same prompts with the same keys; each sample is a pair (exact McNemar).
    last = with_base[-3:]
    policy_only = sum(int(m.get("train/baseline/pairs/policy_only", 0)) for m in last)
    frozen_only = sum(int(m.get("train/baseline/pairs/frozen_only", 0)) for m in last)
    return {
        "pairs": sum(int(m.get("train/baseline/pairs/n", 0)) for m in last),
        "policy_only": policy_only, "frozen_only": frozen_only,
        "pairs_p": mcnemar_exact_p(frozen_only, policy_only),
        "sampled": sampled,
        "n": paired.n, "start": paired.accuracy_a, "end": paired.accuracy_b, "lost": paired.only_a,
        "gained": paired.only_b, "p": paired.p_value, "wall_s": wall, "cpu_s": cpu,
        "step_s": _mean(steps[1:], "time/train/step_s"),  # step 1 includes compilation
        "reward_first": _mean(steps[:5], "train/reward/func/reward_correct/mean"),
        "reward_last": _mean(steps[-5:], "train/reward/func/reward_correct/mean"),
        "policy_at_baseline_steps": _mean(with_base[-3:], "train/reward/func/reward_correct/mean"),
        "frozen_at_baseline_steps": _mean(with_base[-3:], "train/baseline/reward/func/reward_correct/mean"),
    }


def _f(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _sampled_cells(t: object) -> str:
    if t is None:
        return "- | -"
    return (f"{t.start:.3f} -> {t.end:.3f} ({t.samples}/question) | {t.up} / {t.down}, "
            f"{t.p_value:.2g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append", help="trainer config (repeatable)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="override for every run")
    ap.add_argument("--label", default="")
    ap.add_argument("--out-dir", default=None, help="keep run folders here (default: a temp folder)")
    args = ap.parse_args()
    configs = args.config or ["configs/tiny_cpu.yaml"]
    out = Path(args.out_dir or tempfile.mkdtemp(prefix="bench-learning-"))
    print("| config | label | questions | start acc | end acc | lost / gained | McNemar p | "
          "correct reward: first 5 -> last 5 steps | policy vs frozen start (last 3 baseline steps) | "
          "sampled pairs: frozen only / policy only, p | sampled sweep start -> end | questions up / down, "
          "paired t p | step s | wall s | CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for i, config in enumerate(configs):
        r = run_once(config, args.overrides, out / f"run{i}")
        print(f"| `{config}` | {args.label} | {r['n']} | {_f(r['start'])} | {_f(r['end'])} | "
              f"{r['lost']} / {r['gained']} | {r['p']:.2g} | {_f(r['reward_first'])} -> "
              f"{_f(r['reward_last'])} | {_f(r['policy_at_baseline_steps'])} vs "
              f"{_f(r['frozen_at_baseline_steps'])} | {r['frozen_only']} / {r['policy_only']} of "
              f"{r['pairs']}, {r['pairs_p']:.2g} | {_sampled_cells(r['sampled'])} | {_f(r['step_s'], 2)} | "
              f"{r['wall_s']:.0f} | "
              f"{r['cpu_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
