"""A stand-in trainer repo for the orchestrator tests: fast, scriptable by its YAML config.

`make_standin_repo(root)` builds a git repo whose `trainer/__main__.py` follows the trainer contract of
docs/ARCHITECTURE.md (progress JSON lines, run-dir files, exit codes, `.env` loading) in milliseconds,
pushes it to a bare repo and returns the bare repo's `file://` URL.
"""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest

STANDIN_TRAINER = textwrap.dedent(
    '''
    """Stand-in trainer: behaves like `python -m trainer` as the orchestrator sees it, in milliseconds."""
    import argparse, json, os, random, sys, time
    from pathlib import Path

    import yaml

    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    try:
        cfg = yaml.safe_load(open(args.config)) or {}
    except FileNotFoundError:
        print(f"config {args.config} not found", file=sys.stderr)
        sys.exit(2)
    for kv in args.set:
        k, _, v = kv.partition("=")
        cfg[k] = yaml.safe_load(v)
    if os.path.exists(".env"):  # never override the environment; never print values
        for line in open(".env"):
            k, sep, v = line.strip().partition("=")
            if sep and not k.startswith("#"):
                os.environ.setdefault(k, v)
    worker = int(os.environ.get("GRPOCTL_WORKER", "0"))
    cfg["eval_full_sweep"] = os.environ.get("EVAL_FULL_SWEEP") == "1" or cfg.get("eval_full_sweep", False)
    cfg["print_time_breakdown"] = os.environ.get("PRINT_TRAIN_TIME_BREAKDOWN") == "1"
    cfg["secret_len"] = len(os.environ.get("STANDIN_SECRET", ""))
    run = Path(args.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    if worker == 0:
        (run / "config.json").write_text(json.dumps(cfg))
    steps, sleep_s = int(cfg.get("steps", 3)), float(cfg.get("sleep_s", 0.02))
    start = time.time()
    for step in range(1, steps + 1):
        time.sleep(sleep_s)
        metrics = {"train/reward/total/mean": 0.5 + step / steps, "loss": 1.0 / step}
        if worker == 0:
            with open(run / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\\n")
        print(json.dumps({"event": "progress", "step": step, "total": steps,
                          "elapsed_s": round(time.time() - start, 3), "metrics": metrics}), flush=True)
        if cfg.get("fail_on_worker") == worker and step >= int(cfg.get("fail_at_step", 1)):
            print(f"worker {worker} gives up", file=sys.stderr, flush=True)
            sys.exit(int(cfg.get("fail_code", 3)))
    if cfg.get("print_env_value"):  # a misbehaving job: the logs command must redact this
        print("leaked:", os.environ.get(cfg["print_env_value"], ""), flush=True)
    code = int(cfg.get("exit_code", 0))
    if code:
        print(f"failing on purpose with {code}", file=sys.stderr, flush=True)
        sys.exit(code)
    if worker == 0:
        accuracy = float(cfg.get("accuracy", 0.5))
        rng = random.Random(int(cfg.get("seed", 0)))
        n = int(cfg.get("questions", 200))
        correct = [rng.random() < accuracy for _ in range(n)]
        if cfg["eval_full_sweep"]:
            with open(run / "eval_full.jsonl", "w") as f:
                for i, c in enumerate(correct):
                    f.write(json.dumps({"id": f"q{i}", "answer": "1", "prediction": "1" if c else "0",
                                        "correct": c}) + "\\n")
        summary = {
            "eval_full/accuracy": sum(correct) / n,
            "eval/reward/func/reward_correct/mean": accuracy,
            "eval/reward/total/mean": 1 + accuracy,
            "time/train/step_avg_last10_s": sleep_s,
            "time/eval_full/step_s": 0.01,
            "run_id": run.name, "steps": steps, "secret_len": cfg["secret_len"],
        }
        (run / "summary.json").write_text(json.dumps(summary))
        if cfg.get("wandb_summary"):
            files = run / "wandb" / "run-20260101_000000-abcd1234" / "files"
            files.mkdir(parents=True)
            (files / "wandb-summary.json").write_text(json.dumps({"_wandb": {"runtime": 1}, "wandb_only": 7}))
    print(json.dumps({"event": "done", "step": steps, "total": steps, "summary": str(run / "summary.json")}),
          flush=True)
    '''
).lstrip()

CONFIGS = {
    "ok.yaml": "steps: 3\nsleep_s: 0.02\naccuracy: 0.6\nseed: 1\n",
    "ok_b.yaml": "steps: 3\nsleep_s: 0.02\naccuracy: 0.62\nseed: 2\nwandb_summary: true\n",
    "fail3.yaml": "steps: 2\nsleep_s: 0.02\nexit_code: 3\n",
    "slow.yaml": "steps: 600\nsleep_s: 0.1\n",
    "watch.yaml": "steps: 30\nsleep_s: 0.1\n",
    "fail_w1.yaml": "steps: 600\nsleep_s: 0.05\nfail_on_worker: 1\nfail_at_step: 3\nfail_code: 3\n",
    "leaky.yaml": "steps: 1\nsleep_s: 0.01\nprint_env_value: STANDIN_SECRET\n",
    "tiny_cpu.yaml": "steps: 4\nsleep_s: 0.02\naccuracy: 0.55\nseed: 3\nquestions: 300\n",
    "tiny_cpu_pallas.yaml": "steps: 4\nsleep_s: 0.02\naccuracy: 0.55\nseed: 3\nquestions: 300\n",
}


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(cwd), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def make_standin_repo(root: Path) -> tuple[str, Path]:
    """-> (file:// URL of a bare repo holding branch main, path of a work clone with origin set)."""
    work, bare = root / "work", root / "origin.git"
    (work / "trainer").mkdir(parents=True)
    (work / "configs").mkdir()
    (work / "trainer" / "__init__.py").write_text("")
    (work / "trainer" / "__main__.py").write_text(STANDIN_TRAINER)
    for name, text in CONFIGS.items():
        (work / "configs" / name).write_text(text)
    (work / ".gitignore").write_text(".env\nruns/\nlogs/\n")
    git(root, "init", "-q", "--bare", "-b", "main", str(bare))
    git(work, "init", "-q", "-b", "main")
    git(work, "-c", "user.email=t@example.com", "-c", "user.name=t", "add", "-A")
    git(work, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-q", "-m", "stand-in trainer")
    url = f"file://{bare}"
    git(work, "remote", "add", "origin", url)
    git(work, "push", "-q", "origin", "main")
    return url, work


@pytest.fixture(scope="session")
def standin_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """One stand-in repo for the whole session: (file:// URL of the bare origin, work clone)."""
    return make_standin_repo(tmp_path_factory.mktemp("standin"))
