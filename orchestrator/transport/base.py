"""The one interface every way of reaching a worker implements (local, SSH, recording)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

OutputCallback = Callable[[str], None]


@dataclass(frozen=True)
class CommandResult:
    """What one command did on one worker."""

    worker: str
    exit_code: int
    stdout: str
    stderr: str
    duration_s: float
    stdout_bytes: int | None = None  # stdout's length in bytes as received (None: len(stdout.encode()))

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@runtime_checkable
class Transport(Protocol):
    """Runs shell commands and moves files on one worker.

    `run` executes `command` with `bash -lc`-like semantics (a POSIX shell string) and never raises
    for a non-zero exit code; it raises `InfraError` when the worker cannot be reached and
    `HostKeyError` on a bad host key. `env` values are exported before the command: they are for
    non-secret flags only (they can end up on a process command line); secrets travel via `put`.
    `put` writes atomically (temp file + rename) and the file has `mode` from its first byte.
    """

    name: str  # a worker label for prefixes and errors, e.g. "w0 127.0.0.1:2222"

    def run(
        self,
        command: str,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
    ) -> CommandResult: ...

    def put(self, data: bytes, remote_path: str, *, mode: int = 0o644) -> None: ...

    def get(self, remote_path: str, *, max_bytes: int | None = None, timeout: float | None = None) -> bytes:
        """A regular file's bytes (a symlink to one is followed): FileNotFoundError when missing;
        WorkerReadError for a device, FIFO or socket, a file over `max_bytes` (default DEFAULT_GET_CAP) or
        a read past `timeout`. Callers use orchestrator.untrusted.read, which picks the limits."""
        ...

    def close(self) -> None: ...
