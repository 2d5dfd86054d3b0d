"""The Transport contract, once, for every transport: LocalTransport (bash subprocesses) and SshTransport
(a real OpenSSH server on 127.0.0.1). Both reach this machine's files, so each case checks the same
effects; what only one transport does stays in test_transport_local.py / test_transport_ssh.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ps_args

from orchestrator.transport.base import Transport
from orchestrator.transport.local import LocalTransport
from orchestrator.transport.shell import TIMEOUT_EXIT_CODE


@pytest.fixture(scope="module")
def ssh_transport(sshd) -> Iterator[Transport]:  # type: ignore[no-untyped-def]
    from test_transport_ssh import transport_for

    t = transport_for(sshd)
    yield t
    t.close()


@pytest.fixture(params=["local", "ssh"])
def transport(request: pytest.FixtureRequest) -> Transport:
    if request.param == "local":
        return LocalTransport("w0 localhost")
    return request.getfixturevalue("ssh_transport")


def test_exit_code_stdout_stderr_and_streamed_lines(transport: Transport) -> None:
    assert isinstance(transport, Transport)
    lines: list[str] = []
    result = transport.run("echo one; echo two >&2; printf 'three'; exit 3", on_output=lines.append)
    assert (result.exit_code, result.stdout, result.stderr) == (3, "one\nthree", "two\n")
    assert sorted(lines) == ["one", "three", "two"]  # each line once, unterminated tail included
    assert result.worker == transport.name and not result.ok


def test_output_is_streamed_while_the_command_runs(transport: Transport, tmp_path: Path) -> None:
    # The command waits for a file that only the callback for its first line creates: without streaming
    # the first line never arrives while the command runs, and the run times out instead.
    go = tmp_path / "go"
    seen: list[str] = []

    def on_output(line: str) -> None:
        seen.append(line)
        go.touch()

    command = f"echo first; while [ ! -e '{go}' ]; do sleep 0.05; done; echo second"
    result = transport.run(command, on_output=on_output, timeout=30)
    assert result.ok, result.stderr
    assert seen == ["first", "second"]


def test_env_is_exported_quoted_and_cwd_is_honoured(transport: Transport, tmp_path: Path) -> None:
    folder = tmp_path / "dir with 'quote' and space"
    folder.mkdir()
    value = "a b; $(touch pwned) 'c'"
    result = transport.run(
        'printf "%s|%s|%s" "$FLAG" "$PWD" "$EVAL_FULL_SWEEP"',
        env={"FLAG": value, "EVAL_FULL_SWEEP": "1"},
        cwd=str(folder),
    )
    assert result.ok, result.stderr
    assert result.stdout == f"{value}|{folder}|1"
    assert not (folder / "pwned").exists()


def test_missing_cwd_runs_nothing(transport: Transport, tmp_path: Path) -> None:
    result = transport.run(f"touch {tmp_path}/ran", cwd=str(tmp_path / "missing"))
    assert result.exit_code == 1 and "missing" in result.stderr
    assert not (tmp_path / "ran").exists()


def test_timeout_kills_the_command_and_its_children(transport: Transport, tmp_path: Path) -> None:
    marker = f"grpoctl-timeout-{time.monotonic_ns()}"
    done = tmp_path / "background-finished"
    result = transport.run(
        f"echo started; (sleep 30; touch '{done}') & exec -a {marker} sleep 31", timeout=0.7
    )
    assert not done.exists()  # run returned at the timeout, not when the background child ended
    assert result.exit_code == TIMEOUT_EXIT_CODE and "timed out after 0.7 s" in result.stderr
    assert result.stdout == "started\n"
    for _ in range(500):  # the kill is sent; over ssh it lands a moment after run returns
        if marker not in ps_args():
            break
        time.sleep(0.01)
    assert marker not in ps_args()
    assert transport.run("echo still usable").stdout == "still usable\n"


def test_detached_job_does_not_hold_run_open(transport: Transport, tmp_path: Path) -> None:
    # A job launched with setsid that keeps our pipes: run returns once the shell exits.
    done = tmp_path / "job-finished"
    result = transport.run(f"setsid sh -c 'sleep 5; touch \"{done}\"' & echo launched")
    assert result.ok and result.stdout == "launched\n"
    assert not done.exists()  # returned while the detached job still runs


def test_put_is_atomic_with_its_mode_and_get_roundtrips(transport: Transport, tmp_path: Path) -> None:
    dest = tmp_path / "new" / "dirs" / ".env"
    transport.put(b"A=1\n", str(dest), mode=0o600)
    inode = transport.run(f"stat -c %i {dest}").stdout
    transport.put(b"A=2\n", str(dest), mode=0o600)
    assert transport.run(f"stat -c %a {dest}").stdout.strip() == "600"
    assert transport.run(f"stat -c %i {dest}").stdout != inode  # renamed over, never rewritten in place
    assert transport.run(f"ls -A {dest.parent}").stdout.split() == [".env"]  # no temp file left
    assert transport.get(str(dest)) == b"A=2\n"
    blob = bytes(range(256)) * 4096
    transport.put(blob, str(tmp_path / "blob.bin"))  # the default mode: 0644, like a file cp makes
    assert transport.get(str(tmp_path / "blob.bin")) == blob
    assert transport.run(f"stat -c %a {tmp_path / 'blob.bin'}").stdout.strip() == "644"
