"""A worker's result files are validated before they count: nothing a worker writes can flip a verdict,
forge a figure or crash `compare` with a traceback.

- `eval_full*.jsonl`: one JSON object per line with an `id` (a string or an integer) and a real boolean
  `correct` (`"false"`, `0` or a missing key is refused, not counted); an id seen twice is refused. A
  sweep with a sampled pass has on every row integers `samples` (1 to MAX_SAMPLES) and `sampled_correct`
  (0 to `samples`); on some rows only, or out of range, is refused.
- `summary.json`: a flat JSON object; every value a finite number, a string, a boolean or null.
  `wandb-summary.json` (W&B's own file) may nest its internals (`_wandb`, histograms): nested values are
  left out, the rest must be as above.
- `metrics.jsonl`: one JSON object per line; values that are not finite numbers are left out of plots.
Anything else is a one-line WorkerDataError (exit 2) naming the file and the row or key. Strings must not
hold control characters (terminal escapes have no business in results). Files are read with the size
caps of orchestrator/untrusted.py (they came from a worker, even once they are on this disk).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpoctl_contract import rundir
from orchestrator import untrusted
from orchestrator.errors import UsageError


class WorkerDataError(UsageError):
    """A result file that does not hold what the trainer's contract says (grpoctl_contract.rundir)."""


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _loads(text: str, where: str, *, constants: bool = False) -> Any:
    """json.loads, refusing NaN/Infinity (or, with `constants`, reading them as None) and any nesting
    deeper than Python's recursion allows: one line, never a traceback."""
    try:
        return json.loads(text, parse_constant=(lambda _: None) if constants else _no_constants)
    except RecursionError:
        raise WorkerDataError(f"{where}: nested too deeply to be a result") from None
    except ValueError as err:
        raise WorkerDataError(f"{where}: not valid JSON ({getattr(err, 'msg', None) or err})") from None


def _decode(data: bytes | str, source: str) -> str:
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:  # worded like the config files' error: line, then the byte
        line = data.count(b"\n", 0, err.start) + 1
        raise WorkerDataError(
            f"{source}: line {line}: not UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start})"
        ) from None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _plain(text: str) -> bool:
    """No control characters (nor bidi overrides): what `untrusted.clean` would leave as it is."""
    return untrusted.clean(text, max_chars=len(text) + 1) == text


def _rows(text: str, source: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        row = _loads(line, f"{source}:{number}", constants=True)
        if not isinstance(row, dict):
            raise WorkerDataError(f"{source}:{number}: expected a JSON object, not a JSON {_kind(row)}")
        yield number, row


def _kind(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


MAX_SAMPLES = 4096  # samples per question in a sweep's sampled pass: more is no trainer's output


@dataclass(frozen=True)
class Sweep:
    """One eval_full*.jsonl: each question's greedy correctness and, with a sampled pass, (right, samples)."""

    correct: dict[str, bool]
    sampled: dict[str, tuple[int, int]] | None = None


def _count(row: dict[str, Any], key: str, low: int, high: int, where: str) -> int:
    value = row.get(key)
    if not _is_number(value) or not float(value).is_integer() or not low <= value <= high:
        shown = "missing" if key not in row else f"{untrusted.clean(repr(value), untrusted.FIELD)}"
        raise WorkerDataError(f"{where}: `{key}` must be an integer from {low} to {high}, not {shown}")
    return int(value)


def eval_sweep(data: bytes | str, source: str) -> Sweep:
    """Every row checked (see the module docstring)."""
    out: dict[str, bool] = {}
    sampled: dict[str, tuple[int, int]] = {}
    first_row: dict[str, int] = {}
    for number, row in _rows(_decode(data, source), source):
        qid, correct = row.get("id"), row.get("correct")
        if not isinstance(qid, str | int) or isinstance(qid, bool):
            raise WorkerDataError(f"{source}:{number}: no question id (a string or integer `id`)")
        if not isinstance(correct, bool):
            shown = "missing" if "correct" not in row else f"a {_kind(correct)}"
            raise WorkerDataError(f"{source}:{number}: `correct` must be true or false, not {shown}")
        key = str(qid)
        if key in first_row:
            raise WorkerDataError(
                f"{source}:{number}: question id {untrusted.clean(key, untrusted.FIELD)!r} "
                f"repeats row {first_row[key]}"
            )
        has_samples = "samples" in row or "sampled_correct" in row
        if first_row and has_samples != bool(sampled):
            raise WorkerDataError(f"{source}:{number}: a sampled pass on some rows only")
        if has_samples:
            n = _count(row, "samples", 1, MAX_SAMPLES, f"{source}:{number}")
            sampled[key] = (_count(row, "sampled_correct", 0, n, f"{source}:{number}"), n)
        first_row[key], out[key] = number, correct
    return Sweep(out, sampled or None)


def eval_rows(data: bytes | str, source: str) -> dict[str, bool]:
    """Question id -> correct, every row checked (see the module docstring)."""
    return eval_sweep(data, source).correct


def summary(data: bytes | str, source: str, *, nested_ok: bool = False) -> dict[str, Any]:
    """A flat summary object (see the module docstring); `nested_ok` drops nested values instead."""
    parsed = _loads(_decode(data, source), source)
    if not isinstance(parsed, dict):
        raise WorkerDataError(f"{source}: expected a JSON object, not a JSON {_kind(parsed)}")
    out: dict[str, Any] = {}
    for key, value in parsed.items():
        shown = untrusted.clean(key, untrusted.FIELD)
        if not _plain(key):
            raise WorkerDataError(f"{source}: key {shown!r} holds control characters")
        if isinstance(value, dict | list):
            if nested_ok:
                continue
            raise WorkerDataError(
                f"{source}: key {shown!r} is a JSON {'object' if isinstance(value, dict) else 'array'}: "
                "a summary holds numbers and strings only"
            )
        if isinstance(value, str) and not _plain(value):
            raise WorkerDataError(f"{source}: key {shown!r}: the value holds control characters")
        if _is_number(value) and not math.isfinite(value):
            raise WorkerDataError(f"{source}: key {shown!r} is not a finite number")
        out[key] = value
    return out


def metrics(data: bytes | str, source: str) -> list[dict[str, Any]]:
    """metrics.jsonl rows: objects, with only their finite numbers (and `step`) kept."""
    return [
        {k: v for k, v in row.items() if _is_number(v) and math.isfinite(v)}
        for _, row in _rows(_decode(data, source), source)
    ]


def check(name: str, data: bytes, source: str) -> None:
    """Validate one fetched run file by its name (rundir); other files (config.json) pass as they are."""
    if name in (rundir.EVAL_FULL_ROWS, rundir.EVAL_FULL_START_ROWS):
        eval_rows(data, source)
    elif name == rundir.SUMMARY:
        summary(data, source)
    elif name == rundir.WANDB_SUMMARY:
        summary(data, source, nested_ok=True)
    elif name == rundir.METRICS:
        metrics(data, source)


# --------------------------------------------------------------------------- fetched files on this disk


def _read(path: Path) -> str:
    """A fetched file, no larger than the cap its kind has on a worker."""
    limit = untrusted.limit_for(path.name)
    if path.stat().st_size > limit.max_bytes:
        raise WorkerDataError(f"{path}: larger than {untrusted.size_text(limit.max_bytes)}, the cap for it")
    return _decode(path.read_bytes(), str(path))


def read_summary_file(path: Path) -> dict[str, Any]:
    return summary(_read(path), str(path), nested_ok=path.name == rundir.WANDB_SUMMARY)


def read_eval_sweep(path: Path) -> Sweep:
    return eval_sweep(_read(path), str(path))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return metrics(_read(path), str(path))
