"""Every byte a worker sends is untrusted: the caps on what grpoctl reads from one, and the one sanitizer
that makes worker text safe to show in a terminal, a table, a progress bar, JSON or Markdown.

A worker is a machine the laptop does not control: a buggy trainer, a full disk, a symlink left by a
script, or a compromised VM. So:
- every file read from a worker goes through `read` with its kind's `Limit` (a size cap and a time
  limit); the transports follow regular files only: a device, FIFO or socket, or a symlink to one, is
  refused in one line (`WorkerReadError`);
- every command's output is capped inside the transports (`OUTPUT_CAP` per stream, `LINE_CAP` per line),
  and `logs` reads at most `LOG_CHUNK` bytes per read;
- every string that came from a worker passes `clean` (one line) or `clean_text` (a log) before it is
  shown: C0/C1 control characters, escape sequences (OSC 52 clipboard writes, title changes, CSI screen
  clears), bare CRs and bidi overrides are shown as visible `\\x1b`-style escapes; `\\t` is kept.
- `md` makes such a string inert in Markdown (it can never start a line or a block of its own).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

KiB, MiB = 1 << 10, 1 << 20

# Any command's stdout or stderr, per stream: past this the transport keeps draining but drops the bytes.
OUTPUT_CAP = 16 * MiB
# One file `get` from a worker when the caller names no cap (callers use `read` with a `Limit`).
DEFAULT_GET_CAP = 64 * MiB
# One line handed to an output callback (progress of sync/bootstrap): cut here, the rest of it dropped.
LINE_CAP = 64 * KiB
# One read of a run's log (`logs`, each poll of `logs -f`): past this the read is cut, the rest comes next.
LOG_CHUNK = 4 * MiB
# What the screen shows of one worker line (a log line, a progress detail): the rest is summarised.
SCREEN_LINE = 4000
FIELD = 300  # one short field from a worker: phase, detail, config hash, a W&B URL, a metric name
READ_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Limit:
    """How much of one kind of worker file grpoctl reads, and for how long."""

    kind: str
    max_bytes: int
    timeout_s: float = READ_TIMEOUT_S


SUMMARY = Limit("summary", 4 * MiB)
EVAL_ROWS = Limit("eval rows", 32 * MiB)  # GSM8K's 1319 rows with answers: ~0.2 MB
METRICS = Limit("metrics", 32 * MiB)
CONFIG = Limit("config", 4 * MiB)
ENV = Limit(".env", 256 * KiB, 30.0)


def limit_for(name: str) -> Limit:
    """The limit of a run file by its name (grpoctl_contract.rundir)."""
    if name.endswith("summary.json"):
        return SUMMARY
    if name.startswith("eval_full") and name.endswith(".jsonl"):
        return EVAL_ROWS
    if name.endswith(".jsonl"):
        return METRICS
    return CONFIG


class _Getter(Protocol):
    name: str

    def get(self, remote_path: str, *, max_bytes: int | None = ..., timeout: float | None = ...) -> bytes: ...


def read(t: _Getter, path: str, limit: Limit) -> bytes:
    """THE way to read a file from a worker: regular files only, at most `limit.max_bytes`, within
    `limit.timeout_s`; anything else raises WorkerReadError (one line, exit 3)."""
    return t.get(path, max_bytes=limit.max_bytes, timeout=limit.timeout_s)


def size_text(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB and n % MiB == 0 else f"{n // KiB} KiB" if n >= KiB else f"{n} B"


# ------------------------------------------------------------------------------------ the sanitizer

# C0 controls but \t, DEL, C1 controls, and the invisible characters that reorder or hide text
# (bidi overrides and isolates, line/paragraph separators, the BOM).
_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ufeff]")


def _visible(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def clean(text: Any, max_chars: int = SCREEN_LINE) -> str:
    """One line of worker text made inert: every control character, line break included, shown as a
    visible escape (`\\x1b`, `\\x0d`, `\\x0a`), and at most `max_chars` characters (a note says how
    many more). `\\t` stays."""
    text = str(text)
    if len(text) > 4 * max_chars:  # escaping can only lengthen: never escape what is cut anyway
        cut = len(text) - 4 * max_chars
        text = text[: 4 * max_chars]
    else:
        cut = 0
    text = _UNSAFE.sub(_visible, text)
    if len(text) > max_chars:
        cut += len(text) - max_chars
        text = text[:max_chars]
    return f"{text}... [{cut} more characters]" if cut else text


def clean_text(text: str, max_chars: int = SCREEN_LINE) -> str:
    """Many lines of worker text (a log): each line through `clean`; line breaks (and a CR right before
    one, as Windows and tqdm leave) kept as line breaks."""
    lines = text.split("\n")
    out = [clean(line[:-1] if line.endswith("\r") else line, max_chars) for line in lines]
    return "\n".join(out)


def clean_opt(text: Any, max_chars: int = FIELD) -> str | None:
    return None if text is None else clean(text, max_chars)


def clean_map(data: Mapping[Any, Any] | None, max_chars: int = FIELD) -> dict[str, Any]:
    """Keys and string values cleaned; numbers kept only when finite (the rest dropped)."""
    out: dict[str, Any] = {}
    for key, value in (data or {}).items():
        if isinstance(value, str):
            out[clean(key, max_chars)] = clean(value, max_chars)
        elif value is None or isinstance(value, bool) or (isinstance(value, int | float) and finite(value)):
            out[clean(key, max_chars)] = value
    return out


def finite(value: Any) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def strict_json(data: Any) -> Any:
    """`data` with every NaN/Infinity replaced by None: what `json.dumps(..., allow_nan=False)` accepts,
    so that `--json` output is JSON every strict parser reads."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, Mapping):
        return {k: strict_json(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [strict_json(v) for v in data]
    return data


# Characters that mean something inside a Markdown line (emphasis, code, links, HTML, table cells). Those
# that matter only at a line's start (#, -, >, 1.) cannot: a cleaned string holds no line break.
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|~])")


# What a commit, a hash, a run id or a URL is made of: shown as it is (a code span for `code`) when nothing
# else is in it; anything else goes through `md`.
_MD_PLAIN = re.compile(r"[A-Za-z0-9._:/@+=%?&#~-]*")


def md_value(text: Any, *, code: bool = False) -> str:
    """A worker's identifier for a Markdown report: as it is (in backticks with `code`) when it holds only
    identifier/URL characters, else escaped by `md` (never in backticks: a code span cannot escape)."""
    text = str(text)
    if len(text) <= FIELD and _MD_PLAIN.fullmatch(text):
        return f"`{text}`" if code else text
    return md(text, FIELD)


def md(text: Any, max_chars: int = SCREEN_LINE) -> str:
    """Worker text for a Markdown report: one line (`clean`), every Markdown character backslash-escaped,
    so it can never start a heading, a list, a table row or a paragraph of its own, nor close a code span."""
    return _MD_SPECIAL.sub(r"\\\1", clean(text, max_chars))
