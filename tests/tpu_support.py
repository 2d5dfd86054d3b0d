"""Shared pieces of the tpu-target tests: the fake API with sshd workers, a laptop project, the CLI.

The test modules load this as a plugin (`pytest_plugins`) for the `fake` and `project` fixtures after
they have imported it, too late for assertion rewriting: PYTEST_DONT_REWRITE (its asserts carry messages).
"""

from __future__ import annotations

import getpass
import os
import random
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from standin import StandinRepo, make_standin_repo
from typer.testing import CliRunner

from grpoctl_testing.fake_tpu import FakeTpuApi, Script, sshd_workers
from grpoctl_testing.fake_tpu_cli import fake_vm_wiring
from orchestrator.cli import app
from orchestrator.targets.tpu_wiring import TpuWiring

SECRET = "s3cr3t-wandb-value-0123456789"


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeTpuApi]:
    """The fake TPU API whose nodes' workers are loopback sshd servers, one per test module."""
    from grpoctl_testing.sshd import SSHD, sshd_available

    if not sshd_available():
        if os.environ.get("CI"):
            pytest.fail(f"{SSHD} is missing but CI is set: the tpu tests must run in CI", pytrace=False)
        pytest.skip(f"{SSHD} not installed")
    with FakeTpuApi(sshd_workers(tmp_path_factory.mktemp("vms"))) as f:
        yield f


@pytest.fixture()
def project(tmp_path: Path, fake: FakeTpuApi, monkeypatch: pytest.MonkeyPatch) -> Project:
    """A laptop checkout of the stand-in repo (made the cwd) with a .env, over a reset fake API."""
    fake.script = Script(create_s=0.2, wait_for_resources_s=0.3)
    repo = make_standin_repo(tmp_path, steps=4, step_s=0.05, checkpoint_dir=str(tmp_path / "bucket"))
    monkeypatch.chdir(repo.work)
    (repo.work / ".env").write_text(f"WANDB_API_KEY={SECRET}\n")
    # Nodes grpoctl creates start the idle watchdog: it asks the fake, never Google, for a token. Reads and
    # metadata updates back off for milliseconds, not seconds (the same code path, a shorter policy).
    wiring = fake_vm_wiring(metadata_base=fake.endpoint, quick_retries=True)
    return Project(tmp_path, repo, fake, wiring=wiring)


class Project:
    def __init__(
        self, root: Path, repo: StandinRepo, fake: FakeTpuApi, wiring: TpuWiring | None = None
    ) -> None:
        self.root, self.repo, self.fake = root, repo, fake
        self.key = root / "keys" / "grpoctl_ed25519"
        # What the fake's VMs are like (each worker's sshd on its endpoint's port): handed to every
        # target this project builds, by the CLI (click's `obj`) or directly (TpuTarget(wiring=...)).
        self.wiring = wiring if wiring is not None else fake_vm_wiring()

    def config(self, **tpu: object) -> str:
        target = {
            "kind": "tpu",
            "project": "proj",
            "zone": "us-east1-d",
            "name": "grpo-test",
            "api_endpoint": self.fake.endpoint,
            "user": getpass.getuser(),
            "ssh_key": str(self.key),
            "python": sys.executable,
            "poll_s": 0.05,
            "auth_retry_s": 15,
            "connect_timeout_s": 5,
            **tpu,
        }
        cfg = {
            "repo": {"url": self.repo.url, "branch": "main", "remote_dir": "~/grpoctl-work"},
            "targets": {"tpu": target},
            "default_target": "tpu",
        }
        path = self.root / "grpoctl.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return str(path)

    def cli(self, config: str, *args: str, code: int = 0):  # type: ignore[no-untyped-def]
        result = CliRunner().invoke(app, ["--config-file", config, *args], obj=self.wiring)
        out = result.stdout + result.stderr
        assert result.exit_code == code, f"{args}: exit {result.exit_code}\n{out}\n{result.exception!r}"
        assert SECRET not in out
        return result

    def node(self, name: str = "grpo-test"):  # type: ignore[no-untyped-def]
        return self.fake.nodes.get(f"projects/proj/locations/us-east1-d/nodes/{name}")


def outcome(stdout: str) -> tuple[str, str]:
    """(run id, state) from the last stdout line of `run --wait` / `recover`: `RUN STATE  accuracy a -> b`."""
    run_id, state = stdout.strip().splitlines()[-1].split()[:2]
    return run_id, state


def one_line_error(result) -> str:  # type: ignore[no-untyped-def]
    lines = [x for x in result.stderr.splitlines() if x.startswith("grpoctl: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def long_run(project: Project) -> None:
    """A 40-step stand-in (2 s) whose checkpoints go to a "bucket" that outlives the VMs."""
    repo = make_standin_repo(
        project.root / "long", steps=40, step_s=0.05, checkpoint_dir=str(project.root / "bucket")
    )
    os.chdir(repo.work)
    (repo.work / ".env").write_text(f"WANDB_API_KEY={SECRET}\n")
    project.repo = repo


def preempt_at_step(project: Project, bucket: Path, node: str, step: int) -> list[int]:
    """In the background: once the run has checkpointed `step`, the spot VM is taken back."""
    preempted_at: list[int] = []

    def watch() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done = list(bucket.glob("*/step"))
            if done and int(done[0].read_text() or 0) >= step:
                preempted_at.append(int(done[0].read_text()))
                project.fake.preempt(node)
                return
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()
    return preempted_at


# ------------------------------------------------------------------------------------------------- soak

MACHINE_EVENTS = ("preempt", "RESTARTING", "REIMAGING", "REPAIRING")


def checkpointed_step(bucket: Path) -> int:
    found = list(bucket.glob("*/step"))
    try:
        return int(found[0].read_text() or 0) if found else 0
    except (OSError, ValueError):  # being replaced right now
        return 0


def inject_randomly(project: Project, node: str, count: int, seed: int) -> tuple[list[str], threading.Event]:
    """In the background: `count` preemptions and restarts at random moments of one run, each once the run
    has checkpointed a step past the previous hit and that hit has been recovered (every hit lands on a
    running job, never on one not yet noticed or a relaunch under way: two hits would make one recovery).
    Returns the list it fills (`event@step`) and an event set when it is done."""
    from orchestrator.runs import RunStore

    rng = random.Random(seed)
    bucket = project.root / "bucket"

    def recovered() -> int:  # relaunches so far of the run, once it is RUNNING again (-1 while not)
        runs = [r for r in RunStore().list(limit=3) if r.state == "RUNNING" and all(w.pid for w in r.workers)]
        return len(runs[0].recoveries) if runs else -1

    hits: list[str] = []
    done = threading.Event()

    def run() -> None:
        last, relaunches = 0, 0
        deadline = time.monotonic() + 600
        while len(hits) < count and time.monotonic() < deadline:
            time.sleep(rng.uniform(0.1, 0.8))
            step = checkpointed_step(bucket)
            # the previous hit has been recovered (one recovery per hit) and the job moved on since
            if step <= last or project.fake.node_state(node) != "READY" or recovered() < relaunches:
                continue
            relaunches = recovered() + 1
            event = rng.choice(MACHINE_EVENTS)
            if event == "preempt":
                project.fake.preempt(node)
            else:
                project.fake.restart(node, event, down_s=rng.uniform(0.2, 1.0))
            hits.append(f"{event}@{step}")
            last = step
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return hits, done


def soak(project: Project, *, node: str, steps: int, hits: int, seed: int) -> dict[str, object]:
    """One `run --recover` hit `hits` times at random moments; then a `down` during a second run's recovery
    wait. Returns the figures the checks need (the caller asserts)."""
    import json
    import subprocess

    repo = make_standin_repo(
        project.root / "soak", steps=steps, step_s=0.05, checkpoint_dir=str(project.root / "bucket")
    )
    os.chdir(repo.work)
    (repo.work / ".env").write_text(f"WANDB_API_KEY={SECRET}\n")
    project.repo = repo
    cfg = project.config(name=node)
    for args in (["up"], ["sync"], ["env", "push"]):
        project.cli(cfg, *args)
    injected, done = inject_randomly(project, node, hits, seed)
    started = time.monotonic()
    ran = project.cli(cfg, "run", repo.config, "--recover", "--interval", "0.1", "--retry-wait", "0.2")
    wall_s = time.monotonic() - started
    run_id, state = outcome(ran.stdout)
    done.wait(5)
    record = json.loads(project.cli(cfg, "status", run_id, "--json").stdout)
    project.cli(cfg, "fetch", run_id)
    rows = [json.loads(x) for x in (Path("runs") / run_id / "metrics.jsonl").read_text().splitlines()]
    creates_before_down = len(project.fake.creates())
    # A second run, then `down` while it is recovered: nothing may be created after the delete.
    waiter = subprocess.Popen(
        [sys.executable, "-m", "grpoctl_testing.fake_tpu_cli", "--config-file", cfg, "run", repo.config,
         "--recover", "--interval", "0.1", "--set", f"steps={steps * 10}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        for _ in range(1200):
            if len(list((project.root / "bucket").glob("*/step"))) >= 2:
                break
            time.sleep(0.05)
        project.fake.preempt(node)  # the waiter starts recovering...
        for _ in range(600):
            if len(project.fake.creates()) > creates_before_down:
                break
            time.sleep(0.02)
        project.cli(cfg, "down", "--yes")  # ...and is told to stop while its new node is created
        creates_at_down = len(project.fake.creates())
        _, waiter_err = waiter.communicate(timeout=120)
    finally:
        waiter.kill()
    time.sleep(0.5)
    return {
        "run_id": run_id,
        "state": state,
        "injected": injected,
        "recoveries": record["recoveries"],
        "steps": [r["step"] for r in rows],
        "wall_s": wall_s,
        "waiter_code": waiter.returncode,
        "waiter_err": waiter_err,
        "created_after_down": len(project.fake.creates()) - creates_at_down,
        "nodes_left": sorted(n for n in project.fake.nodes if n.endswith(f"/nodes/{node}")),
    }
