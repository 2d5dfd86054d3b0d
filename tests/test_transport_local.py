"""LocalTransport and LocalTarget: real bash subprocesses and real files in a temp folder."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
from conftest import modes_during, ps_args

from orchestrator.config import LocalTargetConfig, RepoConfig
from orchestrator.targets import build_target
from orchestrator.targets.local import LocalTarget
from orchestrator.transport.local import LocalTransport


@pytest.fixture
def local() -> LocalTransport:
    return LocalTransport("w0 localhost")


def test_bad_env_name_is_refused(local: LocalTransport) -> None:
    with pytest.raises(ValueError, match="invalid environment variable name"):
        local.run("true", env={"A;rm -rf /": "1"})


def test_put_is_atomic_with_mode_from_the_first_byte(local: LocalTransport, tmp_path: Path) -> None:
    dest = tmp_path / "deep" / "er" / ".env"
    local.put(b"OLD=1\n", str(dest), mode=0o600)
    old_inode = dest.stat().st_ino
    local.put(b"NEW=2\n", str(dest), mode=0o600)
    assert dest.read_bytes() == b"NEW=2\n"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert dest.stat().st_ino != old_inode  # replaced by rename, never rewritten in place
    assert sorted(p.name for p in dest.parent.iterdir()) == [".env"]  # no temp file left behind


def test_put_mode_is_exact_whatever_the_umask(local: LocalTransport, tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        local.put(b"#!/bin/sh\n", str(tmp_path / "tool"), mode=0o755)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "tool").stat().st_mode) == 0o755


def test_put_failure_leaves_no_temp_file(local: LocalTransport, tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keeps the directory non-empty")
    with pytest.raises(OSError):
        local.put(b"data", str(tmp_path / "taken"), mode=0o600)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_get_roundtrip_and_missing_file(local: LocalTransport, tmp_path: Path) -> None:
    payload = bytes(range(256)) * 10
    local.put(payload, str(tmp_path / "blob"))
    assert local.get(str(tmp_path / "blob")) == payload
    with pytest.raises(FileNotFoundError, match="w0 localhost"):
        local.get(str(tmp_path / "nope"))


def test_put_temp_file_has_its_mode_from_creation_whatever_the_umask(
    local: LocalTransport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With umask 0 a file created without the final mode is 0666 until a chmod: readable (and writable)
    # by every user for that moment. Look at each file the moment it is created, and keep sampling the
    # folder from another thread while a large put is in flight.
    real_open = os.open
    at_creation: dict[str, int] = {}

    def spying_open(path, flags, mode=0o777, *args, **kwargs):  # type: ignore[no-untyped-def]
        fd = real_open(path, flags, mode, *args, **kwargs)
        if flags & os.O_CREAT:
            at_creation[os.fspath(path)] = stat.S_IMODE(os.fstat(fd).st_mode)
        return fd

    monkeypatch.setattr(os, "open", spying_open)
    old = os.umask(0)
    try:
        payload = b"WANDB_API_KEY=x\n" * 4_000_000  # 64 MB: the write takes a while
        seen = modes_during(tmp_path, lambda: local.put(payload, str(tmp_path / ".env"), mode=0o600))
    finally:
        os.umask(old)
    assert at_creation, "put created no file through os.open"
    assert set(at_creation.values()) == {0o600}, at_creation
    assert all(modes == {0o600} for modes in seen.values()), seen
    assert stat.S_IMODE((tmp_path / ".env").stat().st_mode) == 0o600


# Every process start this test process makes, as the interpreter reports it (argv, env): whatever a put
# would hand to a child process is visible to other users in ps.
_SPAWN_EVENTS = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork")
_spawned: list[str] | None = None


def _record_spawns(event: str, args: tuple) -> None:  # type: ignore[type-arg]
    if _spawned is not None and event in _SPAWN_EVENTS:
        _spawned.append(f"{event} {args!r}")


sys.addaudithook(_record_spawns)  # audit hooks cannot be removed: it records only while a test asks


def test_secret_put_never_reaches_a_child_process_or_output(local: LocalTransport, tmp_path: Path) -> None:
    global _spawned
    secret = "sk-local-PLANTED-" + os.urandom(8).hex()
    payload = f"WANDB_API_KEY={secret}\n".encode() * 20000
    _spawned = []
    try:
        local.put(payload, str(tmp_path / ".env"), mode=0o600)
        local.run("true")  # the recorder does see process starts
        spawned = _spawned
    finally:
        _spawned = None
    assert spawned and "subprocess.Popen" in spawned[-1]
    assert not any(secret in s for s in spawned), "the secret reached a child's argv or env"
    result = local.run(f"wc -c < {tmp_path}/.env")
    assert result.stdout.strip() == str(len(payload))
    assert secret not in result.stdout + result.stderr


def test_local_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    target = build_target("local", LocalTargetConfig(workdir="w/local"), RepoConfig(remote_dir="/elsewhere"))
    assert isinstance(target, LocalTarget)
    assert target.remote_dir == str(tmp_path / "w" / "local" / "grpoctl-work")
    assert [w.label for w in target.workers()] == ["w0"]
    assert target.transports()[0] is target.transports()[0]  # cached, kept open
    target.up()
    assert (tmp_path / "w" / "local").is_dir()
    (result,) = [t.run("pwd", cwd=str(tmp_path / "w" / "local")) for t in target.transports()]
    assert result.stdout.strip() == str(tmp_path / "w" / "local")
    assert target.state().healthy


def test_a_raising_callback_does_not_leave_the_command_running(local: LocalTransport) -> None:
    marker = f"grpoctl-abandoned-{os.getpid()}"

    def stop_following(line: str) -> None:
        raise KeyboardInterrupt  # what Ctrl-C during `logs --follow` looks like from here

    with pytest.raises(KeyboardInterrupt):
        local.run(f"echo go; exec -a {marker} sleep 30", on_output=stop_following)
    assert marker not in ps_args()


def test_streamed_lines_drop_only_the_line_end(local: LocalTransport) -> None:
    # A CRLF line loses its \r; trailing spaces and tabs are part of the line (aligned columns, diffs).
    lines: list[str] = []
    result = local.run("printf 'a  \\r\\nb\\t\\n c \\r'", on_output=lines.append)
    assert lines == ["a  ", "b\t", " c "]
    assert result.stdout == "a  \r\nb\t\n c \r"  # the captured text is untouched
