"""Shell text and output plumbing shared by the transports (pure functions, no I/O)."""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping

from orchestrator.errors import WorkerReadError
from orchestrator.transport.base import OutputCallback
from orchestrator.untrusted import LINE_CAP, OUTPUT_CAP, size_text

# What `run` reports when it killed a command for running past its timeout (coreutils' convention).
TIMEOUT_EXIT_CODE = 124
# After the shell exited, how long to keep reading output that a detached child may still hold open.
EXIT_GRACE_S = 1.0

# `get` on a worker: the file is missing / is not a regular file (a device, FIFO or socket).
GET_MISSING, GET_NOT_REGULAR, GET_TOO_LARGE = 66, 67, 68

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


def get_script(path: str, max_bytes: int) -> str:
    """Shell text that prints at most `max_bytes` + 1 bytes of a REGULAR file `path` (a symlink to one is
    fine): a missing file exits GET_MISSING, a device, FIFO or socket (or a link to one) GET_NOT_REGULAR
    with its type on stderr, without ever opening it."""
    return (
        f"f={quote_path(path)}; "
        f'if [ ! -e "$f" ]; then exit {GET_MISSING}; fi; '
        f'if [ ! -f "$f" ]; then stat -L -c %F -- "$f" >&2 2>/dev/null || echo special >&2; '
        f"exit {GET_NOT_REGULAR}; fi; "
        # a file that says it is too large is refused before a byte moves (head still caps the rest)
        f's=$(stat -L -c %s -- "$f" 2>/dev/null || echo 0); if [ "$s" -gt {int(max_bytes)} ]; then '
        f"exit {GET_TOO_LARGE}; fi; "
        f'exec head -c {int(max_bytes) + 1} -- "$f"'
    )


def not_regular(worker: str, path: str, what: str) -> WorkerReadError:
    return WorkerReadError(f"{worker}: {path} is not a regular file ({what or 'special file'}): refused")


def too_large(worker: str, path: str, max_bytes: int) -> WorkerReadError:
    return WorkerReadError(f"{worker}: {path} is larger than {size_text(max_bytes)}, the cap for it: refused")


def read_timed_out(worker: str, path: str, timeout: float) -> WorkerReadError:
    return WorkerReadError(f"{worker}: {path} was not read within {timeout:g} s: refused")


class LineSplitter:
    """Turns a byte stream into complete text lines for `on_output`, keeping the whole text too.

    Bounded (a worker may send anything): at most `max_bytes` are kept (the rest is counted in `dropped`
    and dropped), and a line longer than LINE_CAP reaches `on_output` cut, the rest of it dropped."""

    def __init__(self, on_line: OutputCallback | None, max_bytes: int = OUTPUT_CAP) -> None:
        self._on_line = on_line
        self._pending = b""
        self._chunks: list[bytes] = []
        self._max = max_bytes
        self._size = 0
        self._skipping = False  # inside a line already cut at LINE_CAP
        self.dropped = 0  # bytes past max_bytes, not kept

    def feed(self, data: bytes) -> None:
        if not data:
            return
        keep = data[: max(0, self._max - self._size)]
        self.dropped += len(data) - len(keep)
        if not keep:
            return
        self._chunks.append(keep)
        self._size += len(keep)
        if self._on_line is None:
            return
        if self._skipping:
            end = keep.find(b"\n")
            if end < 0:
                return
            keep, self._skipping = keep[end + 1 :], False
        *complete, self._pending = (self._pending + keep).split(b"\n")
        for line in complete:
            self._emit(line)
        if len(self._pending) > LINE_CAP:
            self._emit(self._pending)
            self._pending, self._skipping = b"", True

    def _emit(self, line: bytes) -> None:
        assert self._on_line is not None
        self._on_line(line[:LINE_CAP].decode("utf-8", errors="replace").rstrip("\r"))

    @property
    def data(self) -> bytes:
        """Every byte kept so far, undecoded."""
        return b"".join(self._chunks)

    def close(self) -> str:
        """Emit the last unterminated line, if any, and return everything kept as text (with a note when
        output was dropped)."""
        if self._on_line is not None and self._pending:
            self._emit(self._pending)
        self._pending = b""
        text = self.data.decode("utf-8", errors="replace")
        if self.dropped:
            text += f"\ngrpoctl: {self.dropped} more bytes of output dropped (cap {self._max} bytes)\n"
        return text
