"""The time ledger of a run (and of an SOP replay): where its wall-clock seconds and chip-hours went.

Pure functions over what grpoctl already keeps: the trainer's own split of its time by phase (the `ledger`
field of its progress events, grpoctl_contract/progress.py), and the run record's launch/end times and
recoveries (orchestrator/runs.py, recovery.py). A run is one attempt, or several when a preemption made
grpoctl relaunch it. Per attempt:

    launch -> trainer start          bootstrap (interpreter start, imports)
    the trainer's phases             bootstrap (setup, model and data load), compile, warm_start, train,
                                     eval (periodic and sweeps), checkpoint
    trainer's last event -> end      bootstrap (teardown) for the last attempt; recovery for a preempted one
    end seen -> next launch          recovery (detection, recreate, re-sync)

and the train seconds of steps that a preempted attempt made but the next one had to redo (it resumed
from an earlier checkpoint) move to `lost_progress`. So the categories add up to the run's wall time (first
launch to the end grpoctl saw). An SOP adds its own steps: `up` (waiting_for_capacity, provisioning),
`sync` (bootstrap), and the time a node was up with no run on it (idle).

Cost is an ESTIMATE: chip-hours x a list price per chip-hour (PRICES, read on PRICES_DATE; grpoctl.yaml
`prices:` overrides it). It is not a bill: it leaves out VM disks, network, storage and discounts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from orchestrator.errors import UsageError
from orchestrator.lifecycle.states import RunState, is_terminal
from orchestrator.runs import RunRecord

CATEGORIES = (
    "waiting_for_capacity",
    "provisioning",
    "bootstrap",
    "compile",
    "warm_start",
    "train",
    "eval",
    "checkpoint",
    "lost_progress",
    "recovery",
    "idle",
)
# The trainer's phases (grpoctl_contract.progress.PHASES) -> ledger categories; unknown phases of a newer
# trainer count as bootstrap (overhead), never as productive training.
PHASE_CATEGORY = {
    "setup": "bootstrap",
    "model_load": "bootstrap",
    "data_load": "bootstrap",
    "compile": "compile",
    "warm_start": "warm_start",
    "start_sweep": "eval",
    "train": "train",
    "eval": "eval",
    "final_sweep": "eval",
    "checkpoint": "checkpoint",
}

# USD per chip-hour, (on-demand, spot), approximate us-central1 list prices of cloud.google.com/tpu/pricing.
# Prices differ by region and change (spot prices move): override them in grpoctl.yaml `prices:`.
PRICES_DATE = "2025-06"
PRICES: dict[str, tuple[float | None, float | None]] = {
    "v6e": (2.70, 1.35),
    "v5p": (4.20, 2.10),
    "v5e": (1.20, 0.60),
    "v4": (3.22, 1.61),
}
HOST_FAMILY = "host"  # local and ssh targets: one host is one device; no price unless the user sets one


@dataclass(frozen=True)
class Price:
    family: str
    spot: bool
    usd_per_chip_hour: float | None
    source: str  # "list prices of 2025-06" or "grpoctl.yaml"

    def note(self) -> str:
        if self.usd_per_chip_hour is None:
            return f"no price for {self.family}: set prices.{self.family} in grpoctl.yaml"
        kind = "spot" if self.spot else "on-demand"
        return f"estimate: {self.family} {kind} ${self.usd_per_chip_hour:g}/chip-hour ({self.source})"


def price_for(family: str, spot: bool, overrides: Mapping[str, Any] | None = None) -> Price:
    """The price of a chip-hour of `family`: grpoctl.yaml's `prices.<family>` first, then the table."""
    user = (overrides or {}).get(family)
    if user is not None:
        value = getattr(user, "spot" if spot else "on_demand", None)
        if value is None and isinstance(user, Mapping):
            value = user.get("spot" if spot else "on_demand")
        if value is not None:
            return Price(family, spot, float(value), "grpoctl.yaml prices")
    on_demand, spot_price = PRICES.get(family, (None, None))
    return Price(family, spot, spot_price if spot else on_demand, f"list prices of {PRICES_DATE}")


@dataclass
class Ledger:
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0.0))
    devices: int = 1  # chips (TPU) or hosts (local, ssh)
    price: Price | None = None

    @property
    def wall_s(self) -> float:
        return sum(self.seconds.values())

    @property
    def chip_hours(self) -> float:
        return self.wall_s * self.devices / 3600.0

    @property
    def goodput(self) -> float | None:
        return self.seconds["train"] / self.wall_s if self.wall_s > 0 else None

    @property
    def cost_estimate_usd(self) -> float | None:
        if self.price is None or self.price.usd_per_chip_hour is None:
            return None
        return self.chip_hours * self.price.usd_per_chip_hour

    def add(self, category: str, seconds: float) -> None:
        self.seconds[category] += max(seconds, 0.0)

    def to_json(self) -> dict[str, Any]:
        cost = self.cost_estimate_usd
        return {
            "chip_hours": round(self.chip_hours, 6),
            "devices": self.devices,
            "wall_s": round(self.wall_s, 3),
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "goodput": None if self.goodput is None else round(self.goodput, 4),
            "cost_estimate_usd": None if cost is None else round(cost, 4),
            "price": None if self.price is None else self.price.note(),
        }

    def lines(self) -> list[str]:
        """For people: `ledger: 0.42 chip-hours, goodput 61%, ~$1.13 (estimate: ...)` and the split."""
        goodput = "?" if self.goodput is None else f"{self.goodput:.0%}"
        cost = self.cost_estimate_usd
        money = f", ~${cost:.2f}" if cost is not None else ""
        note = f" ({self.price.note()})" if self.price is not None else ""
        split = ", ".join(f"{k} {fmt_s(v)}" for k, v in self.seconds.items() if v >= 0.5)
        hours = f"{self.chip_hours:.3g} chip-hours on {self.devices} device(s)"
        return [
            f"ledger: {hours}, goodput {goodput}{money}{note}",
            f"  time: {fmt_s(self.wall_s)} = {split or 'nothing yet'}",
        ]


def fmt_s(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s // 60 % 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def devices_of(record: RunRecord) -> int:
    from orchestrator.targets.topology import chips_for_accelerator  # the targets package imports config

    if record.target_kind == "tpu" and record.accelerator_type:
        try:
            return chips_for_accelerator(record.accelerator_type)
        except UsageError:  # a generation this grpoctl does not know: count hosts
            pass
    return max(len(record.workers), 1)  # local: the one host; ssh: one device per host


def family_of(record: RunRecord) -> str:
    from orchestrator.targets.topology import accelerator_family

    if record.target_kind == "tpu" and record.accelerator_type:
        return accelerator_family(record.accelerator_type)
    return HOST_FAMILY


def _epoch(iso: str | None) -> float | None:
    try:
        return datetime.fromisoformat(iso).timestamp() if iso else None
    except ValueError:
        return None


@dataclass(frozen=True)
class _Attempt:
    launched: float | None
    end: float | None  # when grpoctl saw it end (None: still running)
    trainer: Mapping[str, Any]  # the trainer's `ledger` of its last event seen ({} from older trainers)
    step: int | None  # the last GRPO step seen
    elapsed_s: float | None  # of the last event (older trainers: the only timing there is)
    phase: str | None  # of the last event
    next_launch: float | None  # the relaunch that followed it (None: the last attempt)
    alive_at: float | None = None  # the last poll that found its job running


def _attempts(record: RunRecord) -> list[_Attempt]:
    out = []
    for rec in record.recoveries:
        out.append(_Attempt(
            launched=rec.get("attempt_launched_at_s"), end=rec.get("detected_at_s"),
            trainer=rec.get("attempt_ledger") or {}, step=rec.get("step"), elapsed_s=None, phase=None,
            next_launch=rec.get("relaunched_at_s"), alive_at=rec.get("alive_at_s"),
        ))
    ev = record.last_progress
    end = record.ended_at_s or (_epoch(record.finished_at) if is_terminal(record.state) else None)
    out.append(_Attempt(
        launched=record.launched_at_s, end=end, trainer=ev.ledger if ev else {}, step=ev.step if ev else None,
        elapsed_s=ev.elapsed_s if ev else None, phase=ev.phase if ev else None, next_launch=None,
        alive_at=record.alive_at_s,
    ))
    if out[0].launched is None:  # a record from before the ledger: its creation is the first launch
        out[0] = _Attempt(**{**out[0].__dict__, "launched": _epoch(record.created_at)})
    return out


def run_ledger(record: RunRecord, *, now: float, prices: Mapping[str, Any] | None = None) -> Ledger:
    """The ledger of one run as far as it went (`now` closes a running run's open interval)."""
    spot = bool(record.spot) if record.target_kind == "tpu" else False
    ledger = Ledger(devices=devices_of(record), price=price_for(family_of(record), spot, prices))
    attempts = _attempts(record)
    for i, a in enumerate(attempts):
        phase_s = dict(a.trainer.get("phase_s") or {})
        if not phase_s and a.elapsed_s:  # a trainer without a ledger: all its time counts as training
            phase_s = {"train": float(a.elapsed_s)}
        t0 = a.trainer.get("t0")
        covered = sum(phase_s.values())
        startup = max(t0 - a.launched, 0.0) if t0 is not None and a.launched is not None else 0.0
        last_attempt = i == len(attempts) - 1
        train_s = phase_s.get("train", 0.0)
        if not last_attempt:  # the steps the next attempt had to do again were lost
            resumed = (attempts[i + 1].trainer or {}).get("resumed_from")
            mine = a.trainer.get("resumed_from") or 0
            done = (a.step or 0) - mine
            if resumed is not None and done > 0:
                lost = min(max((a.step or 0) - resumed, 0), done)
                moved = train_s * lost / done
                phase_s["train"] = train_s - moved
                ledger.add("lost_progress", moved)
        for phase, seconds in phase_s.items():
            ledger.add(PHASE_CATEGORY.get(phase, "bootstrap"), seconds)
        ledger.add("bootstrap", startup)
        if a.launched is None:
            continue
        end = a.end if a.end is not None else (now if last_attempt else None)
        if end is not None:
            rest = end - a.launched - startup - covered
            if not last_attempt or record.state in (RunState.PREEMPTED, RunState.RECOVERING):
                # the job ran on after its last event until a poll last saw it (work the preemption threw
                # away), then the machine was gone until grpoctl noticed (detection)
                last_event = a.launched + startup + covered
                lost = min(max((a.alive_at or last_event) - last_event, 0.0), max(rest, 0.0))
                ledger.add("lost_progress", lost)
                ledger.add("recovery", rest - lost)
            elif a.end is not None:
                ledger.add("bootstrap", rest)  # the trainer's exit, and the poll that saw it
            else:  # running: the time since its last event belongs to what it was doing then
                ledger.add(PHASE_CATEGORY.get(a.phase or "train", "bootstrap"), rest)
        if a.next_launch is not None and a.end is not None:
            ledger.add("recovery", a.next_launch - a.end)
    return ledger


def total(ledgers: Iterable[Ledger], extra: Mapping[str, float] | None = None) -> Ledger:
    """An SOP's ledger: its runs' added up, plus its own steps (`extra`: provisioning, idle, ...). The
    chip-hours and cost are each run's own (runs may differ in devices and price), shown on the total."""
    out = Ledger(devices=0)
    cost: float | None = 0.0
    chip_hours = 0.0
    for ledger in ledgers:
        for k, v in ledger.seconds.items():
            out.seconds[k] += v
        chip_hours += ledger.chip_hours
        out.devices = max(out.devices, ledger.devices)
        c = ledger.cost_estimate_usd
        cost = None if cost is None or c is None else cost + c
        out.price = out.price or ledger.price
    devices = max(out.devices, 1)
    for k, v in (extra or {}).items():
        out.seconds[k] += max(v, 0.0)
        chip_hours += max(v, 0.0) * devices / 3600.0
        if cost is not None and out.price is not None and out.price.usd_per_chip_hour is not None:
            cost += max(v, 0.0) * devices / 3600.0 * out.price.usd_per_chip_hour
    return _Total(seconds=out.seconds, devices=devices, price=out.price, fixed_chip_hours=chip_hours,
                  fixed_cost=cost)


@dataclass
class _Total(Ledger):
    fixed_chip_hours: float = 0.0
    fixed_cost: float | None = None

    @property
    def chip_hours(self) -> float:
        return self.fixed_chip_hours

    @property
    def cost_estimate_usd(self) -> float | None:
        return self.fixed_cost
