"""Shell text and output plumbing shared by the transports (pure functions, no I/O)."""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping

from orchestrator.transport.base import OutputCallback

# What `run` reports when it killed a command for running past its timeout (coreutils' convention).
TIMEOUT_EXIT_CODE = 124
# After the shell exited, how long to keep reading output that a detached child may still hold open.
EXIT_GRACE_S = 1.0

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def quote(value: object) -> str:
    """THE quoting helper: every value that reaches a remote shell goes through here (or `quote_path`).

    Single quotes make everything literal: spaces, `$()`, backticks, `;`, newlines, `EXIT`.
    """
    return shlex.quote(str(value))


def quote_path(path: str) -> str:
    """`quote` that keeps a leading `~` (`~` or `~/...`) meaning the remote user's home directory."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + quote(path[2:])
    return quote(path)


def script(command: str, *, env: Mapping[str, str] | None = None, cwd: str | None = None) -> str:
    """The shell script that runs `command` in `cwd` with `env` exported (values quoted, names checked)."""
    lines = []
    if cwd is not None:
        lines.append(f"cd -- {quote_path(cwd)} || exit 1")
    if env:
        for key in env:
            if not _ENV_NAME.match(key):
                raise ValueError(f"invalid environment variable name {key!r}")
        lines.append("export " + " ".join(f"{k}={quote(v)}" for k, v in env.items()))
    lines.append(command)
    return "\n".join(lines)


def timed_out_note(worker: str, timeout: float) -> str:
    """The stderr line `run` appends when it stopped a command at its timeout."""
    return f"grpoctl: {worker}: timed out after {timeout:g} s\n"


class LineSplitter:
    """Turns a byte stream into complete text lines for `on_output`, keeping the whole text too."""

    def __init__(self, on_line: OutputCallback | None) -> None:
        self._on_line = on_line
        self._pending = b""
        self._chunks: list[bytes] = []

    def feed(self, data: bytes) -> None:
        if not data:
            return
        self._chunks.append(data)
        if self._on_line is None:
            return
        *complete, self._pending = (self._pending + data).split(b"\n")
        for line in complete:
            self._on_line(line.decode("utf-8", errors="replace").rstrip("\r"))

    @property
    def data(self) -> bytes:
        """Every byte fed so far, undecoded."""
        return b"".join(self._chunks)

    def close(self) -> str:
        """Emit the last unterminated line, if any, and return everything seen as text."""
        if self._on_line is not None and self._pending:
            self._on_line(self._pending.decode("utf-8", errors="replace").rstrip("\r"))
        self._pending = b""
        return self.data.decode("utf-8", errors="replace")
