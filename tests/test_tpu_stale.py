"""Clearing stale TPU users: fake device files held open by sleeping processes, on a real transport."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cloud.stale import StaleReport, clear_stale_tpu_users, parse_report
from orchestrator.errors import UsageError
from orchestrator.transport.local import LocalTransport
from orchestrator.transport.ssh import SshTransport

# A holder that ignores SIGTERM: only the KILL after the grace period ends it.
STUBBORN = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ok', flush=True); time.sleep(300)"
)
POLITE = "import time; print('ok', flush=True); time.sleep(300)"


def _hold(device: Path, code: str) -> subprocess.Popen[bytes]:
    """A process with `device` open (as the TPU runtime would), in its own session like a nohup job."""
    fh = device.open("rb")
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=fh, stdout=subprocess.PIPE, start_new_session=True
    )
    fh.close()
    assert proc.stdout is not None and proc.stdout.readline() == b"ok\n"  # signal handler installed
    return proc


@pytest.fixture()
def worker(tmp_path: Path) -> dict[str, Path]:
    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "accel0").touch()
    (dev / "vfio").mkdir()
    (dev / "vfio" / "0").touch()
    remote = tmp_path / "work"
    (remote / "logs").mkdir(parents=True)
    lock = tmp_path / "libtpu_lockfile"
    lock.touch()
    return {"dev": dev, "remote": remote, "lock": lock}


@pytest.fixture(params=["local", "ssh"])
def transport(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """The recipe runs the same through a local shell and through a loopback sshd."""
    if request.param == "local":
        yield LocalTransport("w0 localhost")
        return
    server = request.getfixturevalue("sshd")
    t = SshTransport(
        server.host,
        server.port,
        user=server.user,
        key_file=server.client_key,
        host_key_sha256=[server.host_key_sha256],
        name="w0 sshd",
    )
    yield t
    t.close()


@pytest.fixture()
def clear(worker, transport):  # type: ignore[no-untyped-def]
    return lambda **kw: _clear(worker, transport, **kw)


def _clear(worker: dict[str, Path], transport, **kw):  # type: ignore[no-untyped-def]
    dev = worker["dev"]
    return clear_stale_tpu_users(
        [transport],
        remote_dir=str(worker["remote"]),
        device_patterns=(f"{dev}/vfio/*", f"{dev}/accel*"),
        lockfile=str(worker["lock"]),
        grace_s=0.5,
        **kw,
    )


def test_stale_holders_get_term_then_kill_and_lock_goes_last(worker, clear) -> None:
    polite = _hold(worker["dev"] / "accel0", POLITE)
    stubborn = _hold(worker["dev"] / "vfio" / "0", STUBBORN)
    (report,) = clear()
    assert sorted(report.killed) == sorted([polite.pid, stubborn.pid])
    assert report.force_killed == [stubborn.pid]  # TERM was ignored: KILL after the grace period
    assert polite.wait(5) == -15 and stubborn.wait(5) == -9
    assert not worker["lock"].exists()


def test_nothing_holding_just_removes_the_lock(worker, clear) -> None:
    (report,) = clear()
    assert report.killed == [] and not worker["lock"].exists()


def test_a_running_grpoctl_run_is_refused_unless_forced(worker, clear) -> None:
    job = _hold(worker["dev"] / "accel0", POLITE)
    pid_file = worker["remote"] / "logs" / "nohup_tiny_20260101_000000.pid"
    pid_file.write_text(f"{job.pid}\n")
    try:
        with pytest.raises(UsageError, match=f"held by pid {job.pid} of a grpoctl run still RUNNING "
                                             rf"\({pid_file}\); stop it first or pass --force$"):
            clear()
        assert job.poll() is None and worker["lock"].exists()  # nothing touched
        (report,) = clear(force=True)
        assert report.killed == [job.pid] and job.wait(5) == -15
    finally:
        job.kill()
    # a finished run (exit file present) does not protect a leftover holder
    leftover = _hold(worker["dev"] / "accel0", POLITE)
    pid_file.write_text(f"{leftover.pid}\n")
    pid_file.with_suffix(".exit").write_text("0\n")
    (report,) = clear()
    assert report.killed == [leftover.pid]


def test_report_names_the_worker_and_both_kinds_of_kill() -> None:
    out = "killed 12\nkilled 14\nsigkill 14\nkilled x\n busy 9 f\ncleared\n"
    assert parse_report("w1 10.0.0.2:22", out) == StaleReport("w1 10.0.0.2:22", [12, 14], [14])
    assert parse_report("w0", "clear\n") == StaleReport("w0", [], [])
