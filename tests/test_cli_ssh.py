"""The CLI over real OpenSSH servers on 127.0.0.1: one worker, two workers, a server that dies mid-watch.

Each server gets its own HOME (sshd SetEnv), so `remote_dir: ~/work` is a separate checkout per worker
even though every "host" is this machine. The stand-in trainer comes from a `file://` bare repo.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from standin import git
from typer.testing import CliRunner

from orchestrator.cli import app

SECRET = "sk-ssh-planted-9f8e7d6c5b4a"


def _server(root: Path, name: str, client_key: Path | None = None):
    from grpoctl_testing.sshd import LoopbackSshd

    home = root / f"home-{name}"
    home.mkdir()
    server = LoopbackSshd(root / f"sshd-{name}", client_key=client_key, session_env={"HOME": str(home)})
    return server.start(), home


def _target(*servers, **extra) -> dict:
    from conftest import ssh_target_fields

    return ssh_target_fields(*servers, python=sys.executable, connect_timeout_s=3.0, **extra)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, standin_repo):
    from conftest import _require_sshd  # skips locally without sshd, fails in CI

    _require_sshd()
    url, _ = standin_repo
    root = tmp_path_factory.mktemp("cli_ssh")
    one, home_one = _server(root, "one")
    w0, home_w0 = _server(root, "w0")
    w1, home_w1 = _server(root, "w1", client_key=w0.client_key)
    flaky, home_flaky = _server(root, "flaky")
    work = root / "clone"
    subprocess.run(["git", "clone", "-q", url, str(work)], check=True)
    (work / ".env").write_text(f"STANDIN_SECRET={SECRET}\n")
    config = root / "grpoctl.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "repo": {"url": url, "branch": "main", "remote_dir": "~/work"},
                "targets": {"one": _target(one), "two": _target(w0, w1), "flaky": _target(flaky)},
                "default_target": "one",
            }
        )
    )
    yield {
        "work": work,
        "config": str(config),
        "state": root / "state",
        "flaky": flaky,
        "home": {"one": home_one, "w0": home_w0, "w1": home_w1, "flaky": home_flaky},
    }
    for s in (one, w0, w1, flaky):
        s.stop()


def _invoker(lab, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.chdir(lab["work"])
    monkeypatch.setenv("GRPOCTL_STATE_DIR", str(lab["state"]))
    runner = CliRunner()

    def invoke(*args: str, code: int | None = 0):
        result = runner.invoke(app, ["--config-file", lab["config"], *args])
        if code is not None:
            assert result.exit_code == code, (args, result.stdout, result.stderr, result.exception)
        assert SECRET not in result.output  # no command ever prints the secret
        return result

    return invoke


@pytest.fixture
def cli(lab, monkeypatch: pytest.MonkeyPatch):
    return _invoker(lab, monkeypatch)


@pytest.fixture(scope="module")
def runs(lab) -> dict[str, str]:
    """On target `one`: two runs that succeed, one whose job exits 3, one whose job is SIGKILLed. Made once;
    each test below checks one behaviour of them."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        cli = _invoker(lab, monkeypatch)
        cli("sync")
        sweep = ("-e", "EVAL_FULL_SWEEP=1", "--wait", "--interval", "0.2")
        ok, ok_b = (cli("run", f"configs/{name}.yaml", *sweep).stdout for name in ("ok", "ok_b"))
        failed = cli("run", "configs/fail3.yaml", "--wait", "--interval", "0.3", code=1)
        # SIGKILL the whole job: no trap runs, no exit file.
        doomed = cli("run", "configs/slow.yaml").stdout.strip()
        pid = json.loads(cli("status", doomed, "--json").stdout)["workers"][0]["pid"]
        os.killpg(pid, signal.SIGKILL)
        _wait_until_gone(pid)
    return {
        "ok": ok.split()[0],
        "ok_b": ok_b.split()[0],
        "failed": failed.stdout.split()[0],
        "failed_error": failed.stderr.strip().splitlines()[-1],
        "doomed": doomed,
    }


def _wait_until_gone(pid: int) -> None:
    """Until `pid` is no longer a live process (gone, or a zombie no one has reaped yet)."""
    for _ in range(1000):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return
        if state == "Z":
            return
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} still alive after SIGKILL")


def _ps_args() -> str:
    return subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True, check=True).stdout


def test_sync_and_env_push_keep_the_secret_off_the_wire_of_words(cli, lab):
    head = git(lab["work"], "rev-parse", "HEAD")
    assert f"HEAD {head[:12]}" in cli("sync").stdout
    assert (lab["home"]["one"] / "work" / "trainer" / "__main__.py").is_file()
    pushed = cli("env", "push").stdout
    assert f"STANDIN_SECRET_len={len(SECRET)}" in pushed
    remote_env = lab["home"]["one"] / "work" / ".env"
    assert stat.S_IMODE(remote_env.stat().st_mode) == 0o600
    # While a job that loaded the secret runs, no process shows it in its arguments.
    run_id = cli("run", "configs/slow.yaml").stdout.strip()
    try:
        time.sleep(0.5)
        assert "configs/slow.yaml" in _ps_args()
        assert SECRET not in _ps_args()
    finally:
        cli("stop", run_id)
    log = next((lab["home"]["one"] / "work" / "logs").glob("nohup_slow_2*.log")).read_text()
    assert SECRET not in log


def test_a_job_that_exits_0_succeeds(runs, cli):
    for run_id in (runs["ok"], runs["ok_b"]):
        assert json.loads(cli("status", run_id, "--json").stdout)["state"] == "SUCCEEDED"


def test_a_job_that_exits_3_fails_the_run_naming_the_code(runs, cli):
    assert "exit code 3" in runs["failed_error"]
    record = json.loads(cli("status", runs["failed"], "--json").stdout)
    assert record["state"] == "FAILED" and record["workers"][0]["exit_code"] == 3


def test_a_sigkilled_job_reads_lost_never_running(runs, cli):
    assert json.loads(cli("status", runs["doomed"], "--json").stdout)["state"] == "LOST"


def test_status_table_shows_every_state(runs, cli):
    table = cli("status").stdout
    assert "FAILED(3)" in table and "LOST" in table and "SUCCEEDED" in table


def test_logs_show_the_jobs_output(runs, cli):
    assert "failing on purpose with 3" in cli("logs", runs["failed"]).stdout


def test_fetch_copies_runs_to_the_laptop(runs, cli, lab):
    fetched = cli("fetch", runs["ok"], runs["ok_b"]).stdout
    assert f"{runs['ok']} -> runs/{runs['ok']}/" in fetched
    assert (lab["work"] / "runs" / runs["ok_b"] / "wandb-summary.json").is_file()


def test_compare_two_runs_with_a_plot(runs, cli, tmp_path: Path):
    png = tmp_path / "c.png"
    compared = cli("compare", runs["ok"], runs["ok_b"], "--plot", str(png)).stdout
    assert "McNemar exact test on 200 paired questions" in compared
    assert png.is_file()


def test_two_workers_fan_out_per_worker_logs_and_fail_fast(cli, lab):
    synced = cli("--target", "two", "sync").stdout
    assert "w0 127.0.0.1" in synced and "w1 127.0.0.1" in synced
    for w in ("w0", "w1"):
        assert (lab["home"][w] / "work" / "configs" / "ok.yaml").is_file()
    good = cli("--target", "two", "run", "configs/ok.yaml", "--wait", "--interval", "0.3").stdout.split()[0]
    workers = json.loads(cli("status", good, "--json").stdout)["workers"]
    assert [w["state"] for w in workers] == ["SUCCEEDED", "SUCCEEDED"]
    assert (lab["home"]["w0"] / "work" / "runs" / good / "summary.json").is_file()
    assert not (lab["home"]["w1"] / "work" / "runs" / good / "summary.json").exists()  # process 0 only
    # Worker 1 fails at step 3 of 600: worker 0 is stopped at once (its 143 below, not a finished 0),
    # the error names w1 and its code.
    result = cli("--target", "two", "run", "configs/fail_w1.yaml", "--wait", "--interval", "0.3", code=1)
    error = result.stderr.strip().splitlines()[-1]
    assert "w1" in error and "exit code 3" in error and "stopped w0" in error
    run_id = result.stdout.split()[0]
    record = json.loads(cli("status", run_id, "--json").stdout)
    assert record["state"] == "FAILED"
    assert [(w["state"], w["exit_code"]) for w in record["workers"]] == [("FAILED", 143), ("FAILED", 3)]
    assert "worker 1 gives up" in cli("logs", run_id, "--worker", "1").stdout
    assert "gives up" not in cli("logs", run_id, "--worker", "0").stdout
    assert "workers 0..1" in cli("logs", run_id, "--worker", "2", code=2).stderr


def test_status_watch_survives_sshd_killed_and_restarted(cli, lab, monkeypatch: pytest.MonkeyPatch):
    from orchestrator.errors import InfraError
    from orchestrator.transport.ssh import SshTransport

    cli("--target", "flaky", "sync")
    run_id = cli("--target", "flaky", "run", "configs/watch.yaml").stdout.strip()
    outcome: dict = {}
    polled, failed = threading.Event(), threading.Event()
    real_open = SshTransport._open_channel

    def spied_open(self):  # type: ignore[no-untyped-def]
        try:
            channel = real_open(self)
        except InfraError:
            failed.set()  # the transport's own connect retries are spent: the watch sees the outage
            raise
        polled.set()
        return channel

    monkeypatch.setattr(SshTransport, "_open_channel", spied_open)

    def watch() -> None:
        outcome["result"] = cli("status", run_id, "--watch", "--interval", "0.3", code=None)

    watcher = threading.Thread(target=watch)
    watcher.start()
    assert polled.wait(30)  # the watch reached the worker once
    lab["flaky"].stop()  # kills the server and its live connections
    assert failed.wait(30)  # a poll failed after all its connect attempts: now it must be retried
    lab["flaky"].start()  # same port, same host key
    watcher.join(timeout=60)
    assert not watcher.is_alive()
    result = outcome["result"]
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert "unreachable (will retry)" in result.stderr  # it did see the outage
    assert json.loads(cli("status", run_id, "--json").stdout)["state"] == "SUCCEEDED"
