"""The one interface every way of reaching a worker implements (local, SSH, recording)."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Command:
    """One `run` call as every transport receives it; `started` is when `run` was called."""

    text: str
    env: Mapping[str, str] | None
    cwd: str | None
    timeout: float | None
    on_output: OutputCallback | None
    started: float

    def deadline(self, slack_s: float = 0.0) -> float | None:
        """When the command's `timeout` (plus `slack_s`) runs out, on time.monotonic's clock; None: never."""
        return None if self.timeout is None else self.started + self.timeout + slack_s

    def elapsed(self) -> float:
        return time.monotonic() - self.started


class Transport(ABC):
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
    ) -> CommandResult:
        """The one signature of `run`, for every transport: each implements `_run` of the same `Command`."""
        return self._run(Command(command, env, cwd, timeout, on_output, started=time.monotonic()))

    @abstractmethod
    def _run(self, cmd: Command) -> CommandResult: ...

    @abstractmethod
    def put(self, data: bytes, remote_path: str, *, mode: int = 0o644) -> None: ...

    @abstractmethod
    def get(self, remote_path: str, *, max_bytes: int | None = None, timeout: float | None = None) -> bytes:
        """A regular file's bytes (a symlink to one is followed): FileNotFoundError when missing;
        WorkerReadError for a device, FIFO or socket, a file over `max_bytes` (default DEFAULT_GET_CAP) or
        a read past `timeout`. Callers use orchestrator.untrusted.read, which picks the limits."""

    @abstractmethod
    def close(self) -> None: ...
