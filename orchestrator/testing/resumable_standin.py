"""A stand-in trainer in a throwaway git repo, for orchestration tests that need a job but not JAX.

It follows the trainer contract of docs/ARCHITECTURE.md: `python -m trainer --config C --run-dir D`,
one JSON progress line per step, a `done` line, `summary.json` / `metrics.jsonl` in the run dir, `.env`
read without overriding the environment, and resume: a checkpoint file holds the last finished step,
so a relaunch with the same run dir (or the same `checkpoint_dir`, e.g. a "bucket" outside a VM's
disk) carries on from there instead of step 0.

    repo = make_standin_repo(tmp_path, steps=20, step_s=0.2)
    # repo.url is a file:// URL of a bare repo; repo.config is the config path inside the checkout
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

TRAINER_MAIN = r'''
"""Stand-in trainer (tests only): counts steps, checkpoints each one, resumes from the last."""
import argparse, json, os, sys, time
from pathlib import Path


def load_dotenv(path=".env"):
    if os.path.exists(path):
        for line in open(path):
            key, sep, value = line.strip().partition("=")
            if sep and key and not key.startswith("#"):
                os.environ.setdefault(key, value)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--set", action="append", default=[])
    a = p.parse_args()
    load_dotenv()
    cfg = json.load(open(a.config))
    for kv in a.set:
        k, _, v = kv.partition("=")
        cfg[k] = json.loads(v)
    run_dir = Path(a.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = Path(cfg.get("checkpoint_dir") or run_dir / "checkpoints")
    if cfg.get("checkpoint_dir"):
        ckpt = ckpt / run_dir.name
    ckpt.mkdir(parents=True, exist_ok=True)
    step_file = ckpt / "step"
    start = int(step_file.read_text()) if step_file.exists() else 0
    with open(ckpt / "starts", "a") as fh:
        fh.write(f"{start}\n")
    total, t0 = int(cfg["steps"]), time.time()
    (run_dir / "config.json").write_text(json.dumps(cfg))
    for step in range(start + 1, total + 1):
        time.sleep(float(cfg.get("step_s", 0.1)))
        reward = step / total
        with open(run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps({"step": step, "train/reward/total/mean": reward}) + "\n")
        tmp = step_file.with_suffix(".tmp")
        tmp.write_text(str(step))
        tmp.replace(step_file)
        line = {"event": "progress", "step": step, "total": total, "elapsed_s": round(time.time() - t0, 3),
                "metrics": {"train/reward/total/mean": reward, "loss": 1.0 / step}}
        print(json.dumps(line), flush=True)
    summary = {
        "run_id": run_dir.name, "steps": total, "resumed_from": start,
        "wandb_key_len": len(os.environ.get("WANDB_API_KEY", "")),
        "eval/reward/total/mean": 0.5, "eval/reward/func/reward_correct/mean": 0.25,
        "time/train/step_avg_last10_s": float(cfg.get("step_s", 0.1)),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    print(json.dumps({"event": "done", "step": total, "total": total,
                      "summary": str(run_dir / "summary.json")}), flush=True)
    sys.exit(int(cfg.get("exit_code", 0)))


if __name__ == "__main__":
    main()
'''


@dataclass(frozen=True)
class StandinRepo:
    url: str  # file:// URL of the bare repository workers clone
    work: Path  # a local clone (the "laptop" checkout)
    config: str  # the config path inside the checkout


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def make_standin_repo(
    root: Path,
    *,
    steps: int = 10,
    step_s: float = 0.1,
    checkpoint_dir: str | None = None,
    branch: str = "main",
) -> StandinRepo:
    """A bare repo at `root/origin.git` with the stand-in trainer and `configs/standin.yaml`."""
    bare, work = root / "origin.git", root / "laptop"
    work.mkdir(parents=True)
    (work / "trainer").mkdir()
    (work / "trainer" / "__init__.py").write_text("")
    (work / "trainer" / "__main__.py").write_text(TRAINER_MAIN)
    (work / "configs").mkdir()
    cfg = {"steps": steps, "step_s": step_s, "checkpoint_dir": checkpoint_dir}
    (work / "configs" / "standin.yaml").write_text(json.dumps(cfg) + "\n")  # JSON is YAML
    (work / ".gitignore").write_text(".env\nruns/\n")  # secrets and fetched results stay local
    _git(root, "init", "-q", "--bare", "-b", branch, str(bare))
    _git(work, "init", "-q", "-b", branch)
    _git(work, "-c", "user.name=t", "-c", "user.email=t@t", "add", ".")
    _git(work, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "stand-in trainer")
    _git(work, "remote", "add", "origin", bare.as_uri())
    _git(work, "push", "-q", "origin", branch)
    return StandinRepo(bare.as_uri(), work, "configs/standin.yaml")
