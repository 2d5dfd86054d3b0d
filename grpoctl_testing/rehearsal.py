"""Dress rehearsal of the seed TPU SOP on this machine: `make rehearsal`.

(`python -m grpoctl_testing.rehearsal --help` for its options.)

The path a real run takes, with nothing stubbed between the laptop side and the trainer:

- the fake Cloud TPU API (fake_tpu.py), talked to by the real google-cloud-tpu client with anonymous
  credentials, whose node is a 2-host slice (v4-16) of loopback-sshd workers, each with its own fresh HOME
  ("disk") per incarnation; the fake plays the real service's defaults (`Script.realistic()`): transient
  500/503/429 on ~5% of reads (`--read-error-rate`), host keys published after READY (all three types),
  deletes that take time, lists in pages, enums as integers;
- a `tpu` target named `v6e` in a grpoctl.yaml written to a temporary folder, so the seed SOP file
  `sops/grpo_gsm8k_pallas_vs_jax.yaml` is replayed as it is, with tiny-model `--set` overrides;
- `sync` clones a bare copy of this checkout's HEAD and bootstraps the workers for real: `python -m venv`
  and `pip install -e '.[trainer]'` from the package registry (the `tpu` extra, libtpu, is dropped: the
  workers are CPU hosts; the replay runs through `grpoctl_testing.fake_tpu_cli`, which says so);
- both runs are the real trainer as two JAX processes (one per worker, jax.distributed over loopback);
- in the middle of the second run the spot VM is preempted through the fake API; `--recover` recreates it,
  re-syncs, re-bootstraps and relaunches the same run id, which resumes from its checkpoint in a local
  folder standing in for a gs:// bucket (`checkpoint.dir`);
- fetch, compare, down and the SOP report, to which a "Rehearsal" section is appended.

Exit 0 when the report shows what it must (see `check`); 1 otherwise, naming what is missing.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from grpoctl_testing.fake_tpu import FakeTpuApi, Script, sshd_workers
from orchestrator.ledger import run_ledger
from orchestrator.runs import RunRecord

ROOT = Path(__file__).resolve().parents[1]  # grpoctl_testing/ sits at the checkout's root
SOP = "sops/grpo_gsm8k_pallas_vs_jax.yaml"
NODE = "grpo-gsm8k-rehearsal"
ACCELERATOR = "v4-16"  # two hosts in the fake (and on GCP): the smallest multi-host slice
SUMMARY_KEYS = (
    "eval_full/accuracy",
    "eval/reward/func/reward_correct/mean",
    "eval/reward/total/mean",
    "time/train/step_avg_last10_s",
    "time/eval_full/step_s",
)


def tiny_overrides(steps: int, bucket: str) -> dict[str, str]:
    """The seed SOP's 3B configs shrunk to a CPU-sized run; everything else (optimizer, loss, mesh, the
    eval schedule's shape) stays as the real configs say."""
    return {
        "model_init": "random",
        "tokenizer_path": "tiny",
        "param_dtype": "float32",
        "compute_dtype": "float32",
        "steps": str(steps),
        "rollout.batch_size": "4",  # prompts per step over both processes
        "rollout.n": "4",
        "rollout.global_length": "128",
        "rollout.max_length_sample": "16",
        "train.seq_bucket": "128",
        # 2 per device: 16 sequences a step split over the preflight's 8 chips and the rehearsal's 2 CPUs
        "train.micro_batch_size_per_device": "2",
        "optimizer.lr": "1.0e-4",
        "data.source": "builtin",
        "data.difficulty": "1",
        "wandb_mode": "offline",
        "wandb_project": "grpoctl-rehearsal",
        "eval_every_steps": "2",
        "eval_full_limit": "16",
        "eval_full_batch_size": "8",
        "checkpoint.every_steps": "1",
        "checkpoint.dir": bucket,
    }


def _git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@dataclass
class Preempter:
    """Preempts the node once the named run has a finished checkpoint of `at_step` in the bucket."""

    fake: FakeTpuApi
    state_file: Path
    bucket: Path
    run_name: str
    at_step: int
    injected: list[dict[str, Any]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def _run_id(self) -> str | None:
        try:
            steps = json.loads(self.state_file.read_text()).get("steps", {})
        except (OSError, ValueError):
            return None
        return (steps.get(f"run:{self.run_name}") or {}).get("run_id")

    def watch(self) -> None:
        while not self.stop.wait(0.2):
            run_id = self._run_id()
            if not run_id:
                continue
            folder = self.bucket / run_id
            # orbax writes a step under a temporary name and renames it to the bare number when complete
            done = [int(p.name) for p in folder.glob("*") if p.name.isdigit()] if folder.is_dir() else []
            if done and max(done) >= self.at_step:
                self.fake.preempt(NODE)
                self.injected.append({"run_id": run_id, "checkpointed_step": max(done), "at": time.time()})
                print(
                    f"rehearsal: preempted {NODE} through the fake API ({self.run_name} run {run_id} "
                    f"had checkpointed step {max(done)})",
                    flush=True,
                )
                return

    def start(self) -> Preempter:
        threading.Thread(target=self.watch, daemon=True, name="preempter").start()
        return self


def write_config(work: Path, fake: FakeTpuApi, origin: Path, worker_python: str | None) -> Path:
    target: dict[str, Any] = {
        "kind": "tpu",
        "project": "rehearsal-project",
        "zone": "us-east1-d",
        "name": NODE,
        "accelerator_type": ACCELERATOR,
        "runtime_version": "tpu-ubuntu2204-base",
        "spot": True,
        "api_endpoint": fake.endpoint,  # plain HTTP: the client uses anonymous credentials for it
        "autodelete_after_idle_s": 0,  # no idle watchdog: its token would come from Google's metadata server
        "user": getpass.getuser(),
        "ssh_key": str(work / "keys" / "grpoctl_ed25519"),
        "poll_s": 0.5,
        "auth_retry_s": 30,
    }
    if worker_python:
        target["python"] = worker_python
    cfg = {
        "repo": {"url": f"file://{origin}", "branch": "rehearsal", "remote_dir": "~/grpoctl-work"},
        "targets": {"v6e": target},  # the SOP's target name: this definition wins over the SOP's inline one
        "default_target": "v6e",
    }
    path = work / "grpoctl.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def bootstrap_lines(vms: Path) -> list[str]:
    """What each VM's bootstrap log says about its venv and install (recreated VMs bootstrap again)."""
    out = []
    for log in sorted(vms.glob("*/home/grpoctl-work/logs/bootstrap.log")):
        tag = log.parts[len(vms.parts)]
        text = [ln.strip() for ln in log.read_text(errors="replace").splitlines()]
        picked = [ln for ln in text if ln.startswith(("bootstrap ", "venv ", "Successfully installed"))]
        downloaded = [ln.split()[1] for ln in text if ln.startswith("Downloading ")]
        cached = [ln for ln in text if ln.startswith("Using cached")]
        picked.append(
            f"{len(downloaded)} file(s) downloaded from the registry"
            + (f" (e.g. {downloaded[0]})" if downloaded else "")
            + (f", {len(cached)} taken from the pip cache the fake VMs share" if cached else "")
        )
        out += [f"`{tag}`: {ln[:300]}" for ln in picked]
    return out


def bootstrap_problems(vms: Path) -> list[str]:
    """Every fake VM must have created its venv and installed the trainer (jax among it) with pip."""
    logs = sorted(vms.glob("*/home/grpoctl-work/logs/bootstrap.log"))
    if len(logs) < 4:  # 2 workers, twice (the recovery recreates the VMs)
        return [f"{len(logs)} bootstrap log(s) on the fake VMs, expected 4"]
    problems = []
    for log in logs:
        text = log.read_text(errors="replace")
        if "venv created:" not in text or not any(
            ln.startswith("Successfully installed") and " jax-" in ln for ln in text.splitlines()
        ):
            problems.append(f"{log.parts[len(vms.parts)]}: no venv created + trainer installed in {log.name}")
    return problems


def compile_seconds(state: dict[str, Any]) -> tuple[float | None, float | None]:
    """(compile s of the SOP's first start: the jax run, an empty compile cache; compile s of the pallas
    run's resumed attempt on the recreated VM), from the trainers' ledgers. The pallas run's own first
    attempt is no yardstick: the jax run filled the cache for it, and the preemption cut its ledger short."""
    steps = state.get("steps", {})

    def compile_of(name: str) -> float | None:
        rec = (steps.get(f"run:{name}") or {}).get("record") or {}
        if name == "pallas" and not rec.get("recoveries"):
            return None
        return ((((rec.get("last_progress") or {}).get("ledger") or {}).get("phase_s")) or {}).get("compile")

    return compile_of("jax"), compile_of("pallas")


def check(state: dict[str, Any], injected: list[dict[str, Any]]) -> list[str]:
    """What the rehearsal must show; returns the failures."""
    problems = []
    steps = state.get("steps", {})
    for sid, st in steps.items():
        if st.get("status") != "done":
            problems.append(f"step {sid}: {st.get('status')} {st.get('error') or ''}".strip())
    for name in ("jax", "pallas"):
        rec = (steps.get(f"run:{name}") or {}).get("record") or {}
        if rec.get("state") != "SUCCEEDED":
            problems.append(f"run {name}: {rec.get('state')}")
        if len(rec.get("workers", [])) != 2:
            problems.append(f"run {name}: {len(rec.get('workers', []))} worker(s), expected 2")
        summary = state.get("summaries", {}).get(name, {})
        missing = [k for k in SUMMARY_KEYS if summary.get(k) is None]
        if missing:
            problems.append(f"run {name}: summary lacks {missing}")
    for name in ("jax", "pallas"):
        line = state.get("preflight", {}).get(name, "")
        if state.get("preflight_fits", {}).get(name) is not True:
            problems.append(f"run {name}: preflight did not pass before `up`: {line or 'not run'}")
    pallas = (steps.get("run:pallas") or {}).get("record") or {}
    if len(pallas.get("recoveries", [])) != 1:
        problems.append(f"pallas run: {len(pallas.get('recoveries', []))} recoveries, expected 1")
    if not injected:
        problems.append("no preemption was injected")
    elif injected[0]["run_id"] != pallas.get("run_id"):
        problems.append("the preempted run id differs from the pallas run's")
    if not state.get("verdict"):
        problems.append("no run-vs-run verdict")
    if pallas:  # the ledger of the preempted run: what the preemption cost, and the compile cache's effect
        led = run_ledger(RunRecord.from_json(pallas), now=time.time())
        for category in ("lost_progress", "recovery"):
            seconds = led.seconds[category]
            if not seconds > 0:
                problems.append(f"pallas run: ledger {category} is {seconds:.1f} s, expected > 0")
        first, resumed = compile_seconds(state)
        if first is None or resumed is None or not resumed < first:
            problems.append(f"resumed pallas compile {resumed} s not below the first start's (jax) {first} s")
    return problems


def api_summary(fake: FakeTpuApi) -> str:
    """What the fake's realistic defaults did to grpoctl's API calls (all of which it survived if the
    rehearsal passed)."""
    sc = fake.script
    codes = sorted({c for _, c in fake.injected})
    return (
        f"the fake API's realistic defaults: {len(fake.injected)} transient read error(s) "
        f"({', '.join(map(str, codes)) or 'none'}) injected over {len(fake.requests)} API requests (rate "
        f"{sc.read_error_rate:.0%}), host keys published {sc.host_keys_delay_s:g} s after READY "
        f"({', '.join(sc.host_key_types)}), deletes taking {sc.delete_s:g} s, lists in pages of "
        f"{sc.page_size}, enums as integers: {sc.enum_ints}"
    )


def resumed_step(vms: Path) -> int | None:
    """The step the relaunched trainer resumed from, as its log says (the trainer's checkpoint phase)."""
    said = re.compile(r"resumed from the checkpoint of step (\d+)")
    for log in sorted(vms.glob("*/home/grpoctl-work/logs/nohup_*.log")):
        found = said.search(log.read_text(errors="replace"))
        if found:
            return int(found.group(1))
    return None


def rehearsal_section(
    *,
    wall_s: float,
    head: str,
    dirty: bool,
    injected: list[dict[str, Any]],
    state: dict[str, Any],
    vms: Path,
    problems: list[str],
    load: tuple[float, float, float],
    worker_python: str | None,
    api: str = "",
) -> list[str]:
    pallas = (state.get("steps", {}).get("run:pallas") or {}).get("record") or {}
    lines = ["", "## Rehearsal", ""]
    lines.append(
        f"- `make rehearsal` wall time: **{wall_s:.0f} s** (load average at the end "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} CPU(s))"
    )
    lines.append(
        f"- code: HEAD `{head[:12]}`" + (" (uncommitted changes were NOT rehearsed)" if dirty else "")
    )
    lines.append(
        f"- fake Cloud TPU API: node `{NODE}`, {ACCELERATOR} = 2 workers (loopback sshd, fresh HOME "
        "per VM incarnation); real google-cloud-tpu client, anonymous credentials"
    )
    if api:
        lines.append(f"- {api}")
    if worker_python:
        lines.append(f"- bootstrap skipped: workers use `{worker_python}` (the target's `python`)")
    else:
        lines.append(
            "- bootstrap: `python -m venv` + `pip install -e '.[trainer]'` from the registry on each "
            "fake VM; the `tpu` extra (libtpu) is dropped by `grpoctl_testing.fake_tpu_cli` "
            "(CPU workers)"
        )
        lines += [f"  - {ln}" for ln in bootstrap_lines(vms)]
    # Preflight (before `up`) and the start accuracy come from the SOP machinery and the trainer when they
    # report them; the rehearsal quotes whatever this version says rather than judging it.
    preflight = state.get("preflight", {})  # run name -> the SOP's preflight line (compiled before `up`)
    lines += [f"- preflight `{name}`: {line}" for name, line in preflight.items()] or [
        "- preflight: **not run**"
    ]
    for name in ("jax", "pallas"):
        summary = state.get("summaries", {}).get(name, {})
        start = [k for k in summary if "accuracy" in k and "start" in k]
        if start:
            end = summary.get("eval_full/accuracy")
            lines.append(f"- `{name}` accuracy start -> end: {summary[start[0]]} -> {end} (`{start[0]}`)")
    for name in ("jax", "pallas"):
        rec = (state.get("steps", {}).get(f"run:{name}") or {}).get("record") or {}
        lines.append(
            f"- run `{name}` `{rec.get('run_id')}`: {rec.get('state')} on "
            f"{len(rec.get('workers', []))} worker(s) (two JAX processes, jax.distributed over loopback)"
        )
    for inj in injected:
        lines.append(
            f"- preemption injected through the fake API after the `{inj['run_id']}` run had "
            f"checkpointed step {inj['checkpointed_step']}"
        )
    for r in pallas.get("recoveries", []):
        lines.append(
            f"- recovery: {r.get('kind')} ({r.get('reason')}), same run id `{pallas.get('run_id')}`, "
            f"last GRPO step a poll had seen before it {r.get('step')}, relaunched with log `{r.get('log')}`"
        )
    step = resumed_step(vms)
    if step is not None:
        lines.append(f"- the relaunched trainer resumed from its checkpoint of step {step}")
    for name in ("jax", "pallas"):  # the ledger table above has every category; these are the headlines
        rec = (state.get("steps", {}).get(f"run:{name}") or {}).get("record") or {}
        if rec:
            led = run_ledger(RunRecord.from_json(rec), now=time.time())
            s = led.seconds
            lines.append(
                f"- ledger `{name}`: {led.wall_s:.0f} s wall, goodput {led.goodput or 0:.0%}, compile "
                f"{s['compile']:.1f} s, lost_progress {s['lost_progress']:.1f} s, "
                f"recovery {s['recovery']:.1f} s"
            )
    first, resumed = compile_seconds(state)
    if first and resumed is not None:
        lines.append(
            f"- compile seconds, the SOP's first start (jax, empty cache) -> the pallas run resumed on the "
            f"recreated VM (compile cache beside checkpoint.dir): {first:.1f} -> {resumed:.1f} s, "
            f"ratio **{resumed / first:.2f}**"
        )
    lines.append("- result: " + ("**PASSED**" if not problems else "**FAILED**: " + "; ".join(problems)))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m grpoctl_testing.rehearsal",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="runs/rehearsal", help="report folder (default runs/rehearsal)")
    parser.add_argument("--steps", type=int, default=6, help="GRPO steps per run (default 6)")
    parser.add_argument(
        "--preempt-at-step",
        type=int,
        default=3,
        help="preempt the pallas run once it has checkpointed this step (default 3)",
    )
    parser.add_argument(
        "--worker-python",
        default=None,
        help="an interpreter with the trainer installed for the workers: skips the bootstrap",
    )
    parser.add_argument(
        "--read-error-rate",
        type=float,
        default=0.05,
        help="share of the fake API's reads that answer a transient 500/503/429 (default 0.05)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (VMs' disks, bucket)")
    args = parser.parse_args(argv)

    began = time.monotonic()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    head = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    if dirty:
        print(
            f"rehearsal: warning: uncommitted changes are not rehearsed (workers get HEAD {head[:12]})",
            flush=True,
        )
    work = Path(tempfile.mkdtemp(prefix="grpoctl-rehearsal-"))
    print(f"rehearsal: working in {work}", flush=True)
    origin, laptop, bucket, vms = work / "origin.git", work / "laptop", work / "bucket", work / "vms"
    _git("clone", "--quiet", "--bare", str(ROOT), str(origin))
    _git("branch", "--force", "rehearsal", head, cwd=origin)
    _git("clone", "--quiet", "--branch", "rehearsal", str(origin), str(laptop))
    env_file = laptop / ".env"
    fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # 0600 from the first byte
    os.write(fd, b"WANDB_API_KEY=rehearsal-offline-not-a-real-key\n")  # wandb runs offline here
    os.close(fd)
    bucket.mkdir()

    # One pip cache for every fake VM: the recovery's second bootstrap does not download the same wheels
    # again (a real VM's cache would be lost with its disk; the registry is still asked for every package).
    session_env = {"PIP_CACHE_DIR": str(work / "pip-cache"), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    script = Script.realistic(create_s=2.0, wait_for_resources_s=1.0, read_error_rate=args.read_error_rate)
    fake = FakeTpuApi(sshd_workers(vms, session_env), script).start()
    report = out / "report.md"
    for stale in (report, report.with_suffix(".state.json")):
        stale.unlink(missing_ok=True)
    preempter = Preempter(fake, report.with_suffix(".state.json"), bucket, "pallas", args.preempt_at_step)
    preempter.start()
    code = 1
    try:
        config = write_config(work, fake, origin, args.worker_python)
        sets = [
            a
            for k, v in tiny_overrides(args.steps, f"file://{bucket}").items()
            for a in ("--set", f"{k}={v}")
        ]
        cmd = [
            sys.executable,
            "-m",
            "grpoctl_testing.fake_tpu_cli",  # grpoctl, with each worker's sshd port and no libtpu
            "--config-file",
            str(config),
            "sop",
            "replay",
            str(laptop / SOP),
            "--fresh",
            "--recover",
            "--report",
            str(report),
            *sets,
        ]
        env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
        env["GRPOCTL_STATE_DIR"] = str(work / "state")  # the run store of this rehearsal only
        print(
            "rehearsal: grpoctl --config-file GRPOCTL.YAML sop replay " + SOP + " --fresh --recover "
            f"--report {report} --set ... ({len(sets) // 2} tiny-model overrides)",
            flush=True,
        )
        with (out / "rehearsal.log").open("w") as log:
            proc = subprocess.Popen(
                cmd, cwd=laptop, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
            code = proc.wait()
    finally:
        preempter.stop.set()
        fake.stop()
    wall = time.monotonic() - began
    state_path = report.with_suffix(".state.json")
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    problems = check(state, preempter.injected) if state else ["no SOP state written"]
    if code != 0:
        problems.insert(0, f"sop replay exited {code}")
    if not args.worker_python:
        problems += bootstrap_problems(vms)
    for log in sorted(vms.glob("*/home/grpoctl-work/logs/bootstrap.log")):
        shutil.copy(log, out / f"bootstrap-{log.parts[len(vms.parts)]}.log")
    section = rehearsal_section(
        wall_s=wall,
        head=head,
        dirty=dirty,
        injected=preempter.injected,
        state=state,
        vms=vms,
        problems=problems,
        load=os.getloadavg(),
        worker_python=args.worker_python,
        api=api_summary(fake),
    )
    with report.open("a") as f:
        f.write("\n".join(section) + "\n")
    print("\n".join(section), flush=True)
    print(f"rehearsal: report {report}", flush=True)
    if args.keep or problems:
        print(f"rehearsal: kept {work}", flush=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
