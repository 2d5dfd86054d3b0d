"""LocalTransport: this machine plays the worker (subprocesses under bash, files on the local disk)."""

from __future__ import annotations

import os
import queue
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import IO

from orchestrator.errors import UsageError
from orchestrator.transport.base import Command, CommandResult, Transport
from orchestrator.transport.shell import (
    EXIT_GRACE_S,
    TIMEOUT_EXIT_CODE,
    LineSplitter,
    not_regular,
    read_timed_out,
    script,
    timed_out_note,
    too_large,
)
from orchestrator.untrusted import DEFAULT_GET_CAP

# The local target runs every command under bash and starts jobs with setsid and flock (recipes.launch).
LOCAL_TOOLS = ("bash", "setsid", "flock")
LOCAL_TOOLS_NEEDED = "the local target needs a Linux/macOS host with bash, setsid and flock"

# A timed-out command gets SIGTERM, then SIGKILL if it is still there after this long.
_KILL_GRACE_S = 2.0


def _pump(stream: IO[bytes], which: int, chunks: queue.Queue[tuple[int, bytes]]) -> None:
    """Copy a pipe into the queue in chunks as they arrive; an empty chunk marks its end."""
    fd = stream.fileno()
    try:
        while data := os.read(fd, 65536):
            chunks.put((which, data))
    finally:
        chunks.put((which, b""))


def _file_type(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "character special file"), (stat.S_ISBLK, "block special file"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "special file"


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the command's process group, SIGKILL it if it lingers."""
    for sig, wait_s in ((signal.SIGTERM, _KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _collect(
    proc: subprocess.Popen[bytes],
    chunks: queue.Queue[tuple[int, bytes]],
    splitters: dict[int, LineSplitter],
    deadline: float | None,
) -> bool:
    """Feed output to the splitters until both pipes close; True if the deadline killed the command."""
    open_streams, exited_at, timed_out = 2, None, False
    while open_streams:
        now = time.monotonic()
        if deadline is not None and now >= deadline and proc.poll() is None:
            _kill_group(proc)
            timed_out = True
        if exited_at is None and proc.poll() is not None:
            exited_at = now
        if exited_at is not None and now - exited_at > EXIT_GRACE_S:
            break  # a detached child still holds our pipes: its output is not ours
        wait = 0.25 if deadline is None else max(0.0, min(0.25, deadline - now))
        try:
            which, data = chunks.get(timeout=wait)
        except queue.Empty:
            continue
        if data:
            splitters[which].feed(data)
        else:
            open_streams -= 1
    return timed_out


class LocalTransport(Transport):
    """Runs commands as `bash -c SCRIPT` in their own process group; env/cwd go into the script."""

    def __init__(self, name: str = "w0 localhost", *, shell: str = "/bin/bash") -> None:
        self.name = name
        self._shell = shell

    def _run(self, cmd: Command) -> CommandResult:
        try:
            proc = subprocess.Popen(
                [self._shell, "-c", script(cmd.text, env=cmd.env, cwd=cmd.cwd)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # so a timeout can kill the whole group
            )
        except FileNotFoundError:  # Windows, or a bare container: one line, not `[WinError 2]`
            raise UsageError(f"{LOCAL_TOOLS_NEEDED} (no {self._shell} here)") from None
        chunks: queue.Queue[tuple[int, bytes]] = queue.Queue()
        for which, stream in ((1, proc.stdout), (2, proc.stderr)):
            assert stream is not None
            threading.Thread(target=_pump, args=(stream, which, chunks), daemon=True).start()
        # Callbacks run here, in the caller's thread, never in the pump threads.
        splitters = {1: LineSplitter(cmd.on_output), 2: LineSplitter(cmd.on_output)}
        try:
            timed_out = _collect(proc, chunks, splitters, cmd.deadline())
        except BaseException:  # Ctrl-C or a callback that raised: do not leave the command behind
            _kill_group(proc)
            raise
        code = proc.wait()
        stdout, stderr = splitters[1].close(), splitters[2].close()
        if timed_out:
            code = TIMEOUT_EXIT_CODE
            stderr += timed_out_note(self.name, cmd.timeout or 0)
        elif code < 0:  # killed by a signal: report it the way a shell would
            code = 128 - code
        return CommandResult(self.name, code, stdout, stderr, cmd.elapsed(), len(splitters[1].data))

    def put(self, data: bytes, remote_path: str, *, mode: int = 0o644) -> None:
        """Write via a temp file that has `mode` (or less, under the umask) from its creation, then rename."""
        dest = Path(remote_path).expanduser()
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.grpoctl-tmp.{os.getpid()}.{threading.get_ident()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(fd, mode)  # exact mode; the umask could only have narrowed it
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, dest)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            tmp.unlink(missing_ok=True)
            raise

    def get(self, remote_path: str, *, max_bytes: int | None = None, timeout: float | None = None) -> bytes:
        """A regular file only (checked before it is opened, and again on the open file), at most
        `max_bytes`, within `timeout` (see the Transport protocol)."""
        path = Path(remote_path).expanduser()
        cap = DEFAULT_GET_CAP if max_bytes is None else max_bytes
        try:
            before = os.stat(path)  # follows symlinks: a link to /dev/zero is a device
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.name}: no such file {remote_path}") from None
        if not stat.S_ISREG(before.st_mode):
            raise not_regular(self.name, remote_path, _file_type(before.st_mode))
        if before.st_size > cap:
            raise too_large(self.name, remote_path, cap)
        # O_NONBLOCK: had the file been swapped for a FIFO since, opening it must not wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
        try:
            opened = os.fstat(fd)
            if not stat.S_ISREG(opened.st_mode):
                raise not_regular(self.name, remote_path, _file_type(opened.st_mode))
            deadline = None if timeout is None else time.monotonic() + timeout
            chunks, size = [], 0
            while data := os.read(fd, min(1 << 20, cap + 1 - size)):
                chunks.append(data)
                size += len(data)
                if size > cap:
                    raise too_large(self.name, remote_path, cap)
                if deadline is not None and time.monotonic() > deadline:
                    raise read_timed_out(self.name, remote_path, timeout or 0)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Nothing is kept open between calls."""
