"""The trainer's progress lines (docs/ARCHITECTURE.md, "Progress lines"): encode, decode, describe.

The trainer prints one JSON object per line to stdout (the nohup log), each starting with `{"event": `,
and beside it an ordinary line for people (`human`). The orchestrator reads the last JSON line of the log
(`decode`). Both halves import this module, so it is stdlib only: no jax on the laptop, no typer on a worker.

`Event` is the one representation of an event on both sides: the trainer builds and encodes it, the laptop
decodes it (every number checked, see `from_json`), keeps it in its run record (`to_json`/`from_json`, the
form `status --json` shows as `last_progress`) and shows it (`describe`, `human`).

Four events:
- `phase`    a phase began or advanced: {"event": "phase", "phase": "warm_start", "k": 40, "n": 400, ...}
- `progress` a GRPO step finished (the original line, kept as it was, plus "phase": "train", "k", "n")
- `done`     the run finished: {"event": "done", "step": N, "total": N, "summary": "runs/<id>/summary.json"}
- `info`     once, after setup: {"event": "info", "info": {"run_id", "config_hash", "git_commit",
             "wandb_url" (online only)}}; readers find it with INFO_PREFIX

Every event may carry `step`/`total` (GRPO steps finished / planned, for readers that know only those),
`elapsed_s` (seconds since the trainer started), `eta_s` (seconds to `done`, compilation excluded, the
remaining sweeps included; null while unknown) and `detail` (a short human string: the function being
compiled, the checkpoint being loaded). `model_load` adds `bytes_done`/`bytes_total` while downloading.

Every event of a trainer that keeps a time ledger also carries `ledger`: {"t0": unix seconds when the
trainer started, "phase_s": {phase: seconds spent in it so far, compilation counted as phase `compile`
whichever phase it happened in}, "resumed_from": the GRPO step it resumed from (0: a fresh start)}. The
phase seconds add up to `elapsed_s`; the orchestrator's ledger (orchestrator/ledger.py) builds on them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

PREFIX = '{"event": '
INFO_PREFIX = '{"event": "info"'
# The preflight (`python -m trainer.preflight`, a separate program) writes one line per compiled function
# to stderr, starting with this; the laptop's preflight gate relays those lines while it waits.
PREFLIGHT_COMPILED = "preflight: compiled "

# The phases of a run, in the order they happen (compile and checkpoint recur; eval is the periodic one).
PHASES = (
    "setup",
    "model_load",
    "data_load",
    "compile",
    "warm_start",
    "start_sweep",
    "train",
    "eval",
    "final_sweep",
    "checkpoint",
    "done",
)
# How a person reads "k/n" in each phase.
_UNITS = {
    "warm_start": "step",
    "start_sweep": "batch",
    "train": "step",
    "eval": "batch",
    "final_sweep": "batch",
    "compile": "",
}
_LABELS = {
    "model_load": "model load",
    "data_load": "data load",
    "warm_start": "warm start",
    "start_sweep": "start sweep",
    "final_sweep": "final sweep",
}
# Metrics a train step's human line shows, by W&B name -> short label.
_SHOWN = {
    "train/reward/total/mean": "reward",
    "train/reward/func/reward_correct/mean": "correct",
    "loss": "loss",
    "eval/reward/total/mean": "eval reward",
    "time/train/step_s": "step_s",
}


@dataclass(frozen=True)
class Event:
    event: str  # phase | progress | done
    phase: str
    k: int | None = None
    n: int | None = None
    step: int | None = None
    total: int | None = None
    elapsed_s: float | None = None
    eta_s: float | None = None
    # Seconds until the current phase ends, while `eta_s` is still unknown (a warm start or the start sweep
    # runs before the first GRPO step is timed): what `status` shows instead of `eta ?`.
    phase_eta_s: float | None = None
    detail: str | None = None
    bytes_done: int | None = None
    bytes_total: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    summary: str | None = None
    info: dict[str, str] = field(default_factory=dict)
    ledger: dict[str, Any] = field(default_factory=dict)  # {"t0", "phase_s", "resumed_from"} (see above)

    @property
    def done(self) -> bool:
        return self.event == "done"

    @property
    def text(self) -> str:
        """`train step 3/40`, `final sweep batch 2/11`, `compile sampler` (see `describe`)."""
        return describe(self)


def _finite(value: Any) -> Any:
    """NaN/inf become null, so every line stays valid JSON for any reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def encode(ev: Event) -> str:
    """The JSON line (without newline). `event` comes first: readers find lines by PREFIX."""
    out: dict[str, Any] = {"event": ev.event}
    if ev.event == "progress":  # the original progress line's keys first, as they always were
        out |= {"step": ev.step, "total": ev.total, "elapsed_s": ev.elapsed_s,
                "metrics": {k: _finite(v) for k, v in ev.metrics.items()}}
    elif ev.event == "done":
        out |= {"step": ev.step, "total": ev.total, "summary": ev.summary}
    elif ev.event == "info":
        out["info"] = {k: str(v) for k, v in ev.info.items()}
    out["phase"] = ev.phase
    optional = {
        "k": ev.k, "n": ev.n, "step": ev.step, "total": ev.total, "elapsed_s": ev.elapsed_s,
        "eta_s": None if ev.eta_s is None else round(max(ev.eta_s, 0.0), 1), "detail": ev.detail,
        "phase_eta_s": None if ev.phase_eta_s is None else round(max(ev.phase_eta_s, 0.0), 1),
        "bytes_done": ev.bytes_done, "bytes_total": ev.bytes_total,
    }
    for key, value in optional.items():
        if key not in out and value is not None:
            out[key] = _finite(value)
    if ev.event == "done":
        out.setdefault("eta_s", 0.0)
    if ev.ledger:
        out["ledger"] = ev.ledger
    text = json.dumps(out, separators=(", ", ": "))
    assert text.startswith(PREFIX)
    return text


def _number(value: Any) -> bool:
    """A finite JSON number (a NaN or Infinity a line may hold is no number: the field is dropped)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _int(value: Any) -> int | None:
    return int(value) if _number(value) else None


def _float(value: Any) -> float | None:
    return float(value) if _number(value) else None


def decode(line: str) -> Event | None:
    """An Event from one log line, or None when the line is not one of ours (or is cut short)."""
    line = line.strip()
    if not line.startswith(PREFIX):
        return None
    try:
        data = json.loads(line)
    except (ValueError, RecursionError):  # not JSON, or nested deeper than any event is
        return None
    return from_json(data)


def to_json(ev: Event) -> dict[str, Any]:
    """Every field (null where unknown) and `text`: what a run record keeps of its last event and `status
    --json` shows as `last_progress`. `from_json` reads it back."""
    return {**dataclasses.asdict(ev), "ledger": ev.ledger or None, "text": describe(ev)}


def from_json(data: Any) -> Event | None:
    """An Event from a decoded JSON object (a log line's, or `to_json`'s), every field checked: numbers
    finite (NaN/Infinity dropped), strings strings, anything else dropped; None when it is no event.

    A progress line without `phase` (and k/n) is phase `train` with k/n = step/total; a done line is phase
    `done` with k/n = step/total."""
    if not isinstance(data, dict) or not isinstance(data.get("event"), str):
        return None
    kind = data["event"]
    step, total = _int(data.get("step")), _int(data.get("total"))
    phase = data.get("phase") if isinstance(data.get("phase"), str) else None
    k, n = _int(data.get("k")), _int(data.get("n"))
    if kind == "progress":
        phase, k, n = phase or "train", k if k is not None else step, n if n is not None else total
    elif kind == "done":
        phase = "done"
        k, n = k if k is not None else step, n if n is not None else total
    metrics = data.get("metrics")
    detail = data.get("detail")
    return Event(
        event=kind,
        phase=phase or kind,
        k=k,
        n=n,
        step=step,
        total=total,
        elapsed_s=_float(data.get("elapsed_s")),
        eta_s=_float(data.get("eta_s")),
        phase_eta_s=_float(data.get("phase_eta_s")),
        detail=detail if isinstance(detail, str) else None,
        bytes_done=_int(data.get("bytes_done")),
        bytes_total=_int(data.get("bytes_total")),
        # finite numbers, or null (what encode writes for NaN); anything else is dropped
        metrics={str(k): v for k, v in metrics.items() if v is None or _number(v)}
        if isinstance(metrics, dict)
        else {},
        summary=data.get("summary") if isinstance(data.get("summary"), str) else None,
        info={str(k): str(v) for k, v in data["info"].items()} if isinstance(data.get("info"), dict) else {},
        ledger=_ledger(data.get("ledger")),
    )


def _ledger(value: Any) -> dict[str, Any]:
    """The `ledger` field, its numbers checked (a foreign or damaged line gives {} rather than junk)."""
    if not isinstance(value, dict) or not isinstance(value.get("phase_s"), dict):
        return {}
    phase_s = {str(k): v for k, v in value["phase_s"].items() if _float(v) is not None and v >= 0}
    return {"t0": _float(value.get("t0")), "phase_s": phase_s,
            "resumed_from": _int(value.get("resumed_from"))}


def fmt_duration(seconds: float | None) -> str:
    """`m:ss` or `h:mm:ss`; `?` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = max(int(round(seconds)), 0)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def fmt_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def label(phase: str) -> str:
    return _LABELS.get(phase, phase)


def describe(ev: Event) -> str:
    """What the run is doing, short: `train step 3/40`, `compile update_step`, `model load 1.2/6.2 GB`."""
    text = label(ev.phase)
    if ev.event == "info":
        return ", ".join(f"{k} {v}" for k, v in ev.info.items())
    if ev.phase == "done":
        return "done" if ev.step is None else f"done (step {ev.step}/{ev.total})"
    if ev.bytes_total:
        text += f" {fmt_bytes(ev.bytes_done or 0)}/{fmt_bytes(ev.bytes_total)}"
    if ev.n:
        unit = _UNITS.get(ev.phase, "")
        text += f" {unit} {ev.k or 0}/{ev.n}" if unit else f" {ev.k or 0}/{ev.n}"
    if ev.detail:
        text += f": {ev.detail}" if ev.phase != "compile" else f" {ev.detail}"
    return text


def human(ev: Event) -> str:
    """The line for people beside the JSON line: what `grpoctl logs -f` shows. Never holds secrets: it is
    built only from the event's own fields, which the trainer fills from config and measurements."""
    when = "" if ev.elapsed_s is None else f" +{fmt_duration(ev.elapsed_s)}"
    parts = [describe(ev)]
    shown = [f"{short} {ev.metrics[k]:.4g}" for k, short in _SHOWN.items()
             if isinstance(ev.metrics.get(k), int | float)]
    if shown:
        parts.append(", ".join(shown))
    if ev.eta_s is not None and not ev.done:
        parts.append(f"eta {fmt_duration(ev.eta_s)}")
    elif ev.phase_eta_s is not None and not ev.done:
        parts.append(f"{label(ev.phase)} eta {fmt_duration(ev.phase_eta_s)}")
    if ev.summary:
        parts.append(f"summary {ev.summary}")
    return f"[trainer{when}] " + " | ".join(parts)
