"""The stand-in trainer: a throwaway git repo whose `python -m trainer` plays the real one in milliseconds.

It keeps the trainer contract of docs/ARCHITECTURE.md as the orchestrator sees it: `--config C --run-dir D
[--set k=v]`, progress and done lines, the run-dir files, exit codes, `.env` read without overriding the
environment, the seed's env flags, and resume (a checkpoint file holds the last finished step, so a
relaunch with the same run dir, or the same `checkpoint_dir` outside a VM's disk, carries on from there).
The repo carries a copy of `grpoctl_contract` made from this checkout when the repo is built (as the real
trainer's checkout does): the stand-in encodes its lines and reads `.env` with the real contract code.

Its YAML config scripts misbehaviour: `exit_code`, `fail_on_worker`/`fail_at_step`/`fail_code`,
`print_env_value` (leaks a value the logs must redact), `wandb_summary`, `accuracy`/`seed`/`questions`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path

import grpoctl_contract

STANDIN_TRAINER = textwrap.dedent(
    '''
    """Stand-in trainer (tests only): behaves like `python -m trainer` as the orchestrator sees it."""
    import argparse, json, os, random, sys, time
    from pathlib import Path

    import yaml

    from grpoctl_contract import envfile, rundir
    from grpoctl_contract.envflags import ENV_FLAGS
    from grpoctl_contract.progress import Event, encode

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
    for key, value in envfile.read(".env").items():  # never override the environment; never print values
        os.environ.setdefault(key, value)
    for flag, key in ENV_FLAGS.items():
        cfg[key] = os.environ.get(flag) == "1" or bool(cfg.get(key, False))
    worker = int(os.environ.get("GRPOCTL_WORKER", "0"))
    secret_len = len(os.environ.get("STANDIN_SECRET", ""))
    wandb_key_len = len(os.environ.get("WANDB_API_KEY", ""))
    run = Path(args.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    # What this worker's job saw (every worker, unlike the run files): tests check each VM got the secrets.
    seen = {"secret_len": secret_len, "wandb_key_len": wandb_key_len}
    (run / f"worker{worker}.json").write_text(json.dumps(seen))
    ckpt = Path(cfg["checkpoint_dir"]) / run.name if cfg.get("checkpoint_dir") else run / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    step_file = ckpt / "step"
    first = int(step_file.read_text()) if step_file.exists() else 0
    with open(ckpt / "starts", "a") as fh:
        fh.write(f"{first}\\n")
    # The history lives beside the checkpoints (as the trainer keeps it in each checkpoint): a relaunch on
    # a fresh disk restores metrics.jsonl up to the step it resumes from, then appends.
    history = ckpt / rundir.METRICS
    if worker == 0:
        kept = history.read_text().splitlines() if history.exists() else []
        kept = "".join(line + "\\n" for line in kept if line.strip() and json.loads(line)["step"] <= first)
        history.write_text(kept)
        (run / rundir.METRICS).write_text(kept)
    if worker == 0:
        (run / rundir.CONFIG).write_text(json.dumps(cfg))
    steps, step_s = int(cfg.get("steps", 3)), float(cfg.get("step_s", 0.02))
    t0 = time.time()
    for step in range(first + 1, steps + 1):
        time.sleep(step_s)
        metrics = {"train/reward/total/mean": 0.5 + step / steps, "loss": 1.0 / step}
        if worker == 0:
            for path in (run / rundir.METRICS, history):
                with open(path, "a") as f:
                    f.write(json.dumps({"step": step, **metrics}) + "\\n")
        tmp = step_file.with_suffix(f".tmp{worker}")  # workers may share checkpoint_dir: one temp each
        tmp.write_text(str(step))
        tmp.replace(step_file)
        # the time ledger of the contract: all of the stand-in's time is "train"
        ledger = {"t0": round(t0, 3), "phase_s": {"train": round(time.time() - t0, 3)}, "resumed_from": first}
        event = Event("progress", "train", step=step, total=steps, elapsed_s=round(time.time() - t0, 3),
                      metrics=metrics, ledger=ledger)
        print(encode(event), flush=True)
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
            with open(run / rundir.EVAL_FULL_ROWS, "w") as f:
                for i, c in enumerate(correct):
                    f.write(json.dumps({"id": f"q{i}", "answer": "1", "prediction": "1" if c else "0",
                                        "correct": c}) + "\\n")
        summary = {
            "eval_full/accuracy": sum(correct) / n,
            "eval/reward/func/reward_correct/mean": accuracy,
            "eval/reward/total/mean": 1 + accuracy,
            "time/train/step_avg_last10_s": step_s,
            "time/eval_full/step_s": 0.01,
            "run_id": run.name, "steps": steps, "resumed_from": first, "secret_len": secret_len,
            "wandb_key_len": wandb_key_len,
        }
        (run / rundir.SUMMARY).write_text(json.dumps(summary))
        if cfg.get("wandb_summary"):
            files = run / "wandb" / "run-20260101_000000-abcd1234" / "files"
            files.mkdir(parents=True)
            (files / rundir.WANDB_SUMMARY).write_text(json.dumps({"_wandb": {"runtime": 1}, "wandb_only": 7}))
    print(encode(Event("done", "done", step=steps, total=steps, summary=str(run / rundir.SUMMARY))),
          flush=True)
    '''
).lstrip()

CONFIGS = {
    "ok.yaml": "steps: 3\nstep_s: 0.02\naccuracy: 0.6\nseed: 1\n",
    "ok_b.yaml": "steps: 3\nstep_s: 0.02\naccuracy: 0.62\nseed: 2\nwandb_summary: true\n",
    "fail3.yaml": "steps: 2\nstep_s: 0.02\nexit_code: 3\n",
    "slow.yaml": "steps: 600\nstep_s: 0.1\n",
    "watch.yaml": "steps: 30\nstep_s: 0.1\n",
    "fail_w1.yaml": "steps: 600\nstep_s: 0.05\nfail_on_worker: 1\nfail_at_step: 3\nfail_code: 3\n",
    "leaky.yaml": "steps: 1\nstep_s: 0.01\nprint_env_value: STANDIN_SECRET\n",
    "tiny_cpu.yaml": "steps: 4\nstep_s: 0.02\naccuracy: 0.55\nseed: 3\nquestions: 300\n",
    "tiny_cpu_pallas.yaml": "steps: 4\nstep_s: 0.02\naccuracy: 0.55\nseed: 3\nquestions: 300\n",
}


@dataclass(frozen=True)
class StandinRepo:
    url: str  # file:// URL of the bare repository workers clone
    work: Path  # a local clone with origin set (the "laptop" checkout)
    config: str = "configs/standin.yaml"  # the config made from make_standin_repo's arguments


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(cwd), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def make_standin_repo(
    root: Path,
    *,
    steps: int = 10,
    step_s: float = 0.1,
    checkpoint_dir: str | None = None,
    branch: str = "main",
) -> StandinRepo:
    """A bare repo at `root/origin.git` with the stand-in trainer, CONFIGS and `configs/standin.yaml`
    (`steps`, `step_s`, `checkpoint_dir`), and its clone at `root/work`."""
    work, bare = root / "work", root / "origin.git"
    (work / "trainer").mkdir(parents=True)
    (work / "configs").mkdir()
    (work / "trainer" / "__init__.py").write_text("")
    (work / "trainer" / "__main__.py").write_text(STANDIN_TRAINER)
    contract = Path(grpoctl_contract.__file__).parent
    shutil.copytree(contract, work / "grpoctl_contract", ignore=shutil.ignore_patterns("__pycache__"))
    standin = {"steps": steps, "step_s": step_s, "checkpoint_dir": checkpoint_dir}
    for name, text in {**CONFIGS, "standin.yaml": json.dumps(standin) + "\n"}.items():  # JSON is YAML
        (work / "configs" / name).write_text(text)
    (work / ".gitignore").write_text(".env\nruns/\nlogs/\n")  # secrets and fetched results stay local
    git(root, "init", "-q", "--bare", "-b", branch, str(bare))
    git(work, "init", "-q", "-b", branch)
    git(work, "-c", "user.email=t@example.com", "-c", "user.name=t", "add", "-A")
    git(work, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-q", "-m", "stand-in trainer")
    git(work, "remote", "add", "origin", bare.as_uri())
    git(work, "push", "-q", "origin", branch)
    return StandinRepo(bare.as_uri(), work)
