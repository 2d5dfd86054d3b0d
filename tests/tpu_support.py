"""Shared pieces of the tpu-target tests: the fake API with sshd workers, a laptop project, the CLI.

The test modules load this as a plugin (`pytest_plugins`) for the `fake` and `project` fixtures after
they have imported it, too late for assertion rewriting: PYTEST_DONT_REWRITE (its asserts carry messages).
"""

from __future__ import annotations

import getpass
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from standin import StandinRepo, make_standin_repo
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.cloud import api as cloud
from orchestrator.retry import Backoff
from orchestrator.targets import tpu as tpu_target
from orchestrator.targets.tpu import TpuTarget
from orchestrator.testing.fake_tpu import FakeTpuApi, Script, sshd_workers

SECRET = "s3cr3t-wandb-value-0123456789"


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeTpuApi]:
    """The fake TPU API whose nodes' workers are loopback sshd servers, one per test module."""
    from orchestrator.testing.sshd import SSHD, sshd_available

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
    # read retries back off for milliseconds, not seconds (the same code path, a shorter policy)
    monkeypatch.setattr(cloud, "READ_RETRY", Backoff(attempts=6, first_s=0.01, max_s=0.05))
    monkeypatch.setattr(tpu_target, "CONFLICT_RETRY", Backoff(attempts=6, first_s=0.01, max_s=0.05))
    # The fake's workers are loopback sshd servers on a port each, named in their network endpoints: test
    # wiring set on the target class (as the rehearsal's fake_tpu_cli does), not a grpoctl.yaml key.
    monkeypatch.setattr(TpuTarget, "ssh_port_from_endpoint", True)
    # Nodes grpoctl creates start the idle watchdog: it asks the fake, never Google, for a token.
    monkeypatch.setattr(TpuTarget, "autodelete_metadata_base", fake.endpoint)
    repo = make_standin_repo(tmp_path, steps=4, step_s=0.05, checkpoint_dir=str(tmp_path / "bucket"))
    monkeypatch.chdir(repo.work)
    (repo.work / ".env").write_text(f"WANDB_API_KEY={SECRET}\n")
    return Project(tmp_path, repo, fake)


class Project:
    def __init__(self, root: Path, repo: StandinRepo, fake: FakeTpuApi) -> None:
        self.root, self.repo, self.fake = root, repo, fake
        self.key = root / "keys" / "grpoctl_ed25519"

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
        result = CliRunner().invoke(app, ["--config-file", config, *args])
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
