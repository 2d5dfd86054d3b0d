"""LocalTransport: this machine plays the worker (subprocesses under bash, files on the local disk)."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from orchestrator.errors import UsageError
from orchestrator.transport.base import CommandResult, OutputCallback
from orchestrator.transport.shell import (
    EXIT_GRACE_S,
    TIMEOUT_EXIT_CODE,
    LineSplitter,
    script,
    timed_out_note,
)

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


class LocalTransport:
    """Runs commands as `bash -c SCRIPT` in their own process group; env/cwd go into the script."""

    def __init__(self, name: str = "w0 localhost", *, shell: str = "/bin/bash") -> None:
        self.name = name
        self._shell = shell

    def run(
        self,
        command: str,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
    ) -> CommandResult:
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                [self._shell, "-c", script(command, env=env, cwd=cwd)],
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
        splitters = {1: LineSplitter(on_output), 2: LineSplitter(on_output)}
        deadline = None if timeout is None else start + timeout
        try:
            timed_out = _collect(proc, chunks, splitters, deadline)
        except BaseException:  # Ctrl-C or a callback that raised: do not leave the command behind
            _kill_group(proc)
            raise
        code = proc.wait()
        stdout, stderr = splitters[1].close(), splitters[2].close()
        if timed_out:
            code = TIMEOUT_EXIT_CODE
            stderr += timed_out_note(self.name, timeout)
        elif code < 0:  # killed by a signal: report it the way a shell would
            code = 128 - code
        return CommandResult(self.name, code, stdout, stderr, time.monotonic() - start)

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

    def get(self, remote_path: str) -> bytes:
        path = Path(remote_path).expanduser()
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.name}: no such file {remote_path}") from None

    def close(self) -> None:
        """Nothing is kept open between calls."""
