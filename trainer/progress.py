"""Phase events and human lines on stdout, and the ETA they carry (the trainer side of
grpoctl_contract/progress.py; docs/ARCHITECTURE.md, "Progress lines").

A run is a sequence of phases (setup, model load, data load, warm start, start sweep, train with periodic
evals, checkpoints, final sweep, done). `Reporter` prints one JSON event when a phase begins and as it
advances (at most about once a second, always at its first and last unit), each followed by a line for
people. Compilation is seen through jax.monitoring: a compile that lasts over a second is announced as
phase `compile` (with the function's name) while it runs, and every measured rate leaves compile time out.

The ETA is the remaining work times the compile-free seconds per unit of each phase: warm start steps,
sweep batches, GRPO steps, periodic-eval batches. Rates not yet measured are estimated from the closest
measured one (an eval batch samples like a step's rollout; a sweep batch of R rows like R/rows_per_step
rollouts) and the ETA is null until a GRPO step has been timed. Only process 0 prints.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

from grpoctl_contract.progress import Event, encode, fmt_duration, human

# jax.monitoring events that make up "compilation" (outermost trace, lowering, XLA compile; sequential).
_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_BACKEND_COMPILE = _COMPILE_EVENTS[-1]
ANNOUNCE_COMPILE_AFTER_S = 1.0  # shorter compiles (small eager ops) are not worth a line
COMPILE_HEARTBEAT_S = 60.0  # a line this often while one compile goes on
EMIT_EVERY_S = 1.0  # JSON events of one phase at most this often (first and last unit always)
HUMAN_EVERY_S = 10.0  # human lines of a fast phase (warm start) at most this often
# Readable names for the jitted functions that take long to compile.
_FUNCTION_NAMES = {
    "_generate": "sampler",
    "update_step": "GRPO update step",
    "sft_step": "warm-start step",
    "behaviour_logprobs": "behaviour log-probs",
}


@dataclasses.dataclass
class Plan:
    """The work of this run, counted in each phase's units."""

    steps: int  # GRPO steps in the run
    first_step: int = 1  # > 1 when resumed
    warm_start_steps: int = 0
    start_sweep_batches: int = 0
    eval_steps: tuple[int, ...] = ()  # steps followed by a periodic eval
    eval_batches: int = 0
    final_sweep_batches: int = 0
    rows_per_step: int = 1  # sequences sampled per GRPO step (batch_size x n)
    rows_per_sweep_batch: int = 1


def function_name(module_name: Any) -> str:
    name = str(module_name).removeprefix("jit_").removeprefix("jit(").removesuffix(")")
    return _FUNCTION_NAMES.get(name, name)


class _CompileWatch:
    """Compile time seen through jax.monitoring (listeners live for the process: registered once)."""

    _installed: _CompileWatch | None = None

    def __init__(self) -> None:
        self.total_s = 0.0  # finished compile work, seconds
        self.current: tuple[str, float] | None = None  # (function, start) of the compile under way
        self.by_name: dict[str, float] = {}  # function -> seconds its latest compile took
        self._acc = 0.0

    @classmethod
    def install(cls) -> _CompileWatch:
        if cls._installed is None:
            import jax.monitoring

            watch = cls()
            jax.monitoring.register_scalar_listener(watch._on_start)
            jax.monitoring.register_event_duration_secs_listener(watch._on_duration)
            cls._installed = watch
        return cls._installed

    def _on_start(self, event: str, value: float, **kwargs: Any) -> None:
        # A compile is trace -> lowering -> XLA compile (outermost only: never nested); it starts with
        # whichever of them comes first.
        if event in _COMPILE_EVENTS and (self.current is None or event == _COMPILE_EVENTS[0]):
            self.current = (function_name(kwargs.get("fun_name", "?")), time.perf_counter())
            self._acc = 0.0

    def _on_duration(self, event: str, duration: float, **kwargs: Any) -> None:
        if event in _COMPILE_EVENTS:
            self.total_s += duration
            self._acc += duration
            if event == _BACKEND_COMPILE:
                self.by_name[function_name(kwargs.get("fun_name", "?"))] = self._acc
                self.current = None


class Span:
    """Compile-free seconds since it was made."""

    def __init__(self, watch: _CompileWatch | None) -> None:
        self.watch, self.t0 = watch, time.perf_counter()
        self.c0 = watch.total_s if watch else 0.0

    def seconds(self) -> float:
        compiled = (self.watch.total_s - self.c0) if self.watch else 0.0
        return max(time.perf_counter() - self.t0 - compiled, 0.0)


class Reporter:
    def __init__(self, enabled: bool = True, *, watch_compiles: bool = True, out: Any = None) -> None:
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.plan = Plan(steps=0)
        self.done_units: dict[str, int] = {}  # units finished per phase (train: GRPO steps)
        self.rates: dict[str, list[float]] = {}  # compile-free seconds per unit, last few
        self.last: Event | None = None  # the last non-compile event (re-shown after a compile)
        self._marks: dict[str, tuple[Span, int]] = {}  # phase -> (span since last emission, k then)
        self._emitted_at: dict[str, float] = {}
        self._human_at: dict[str, float] = {}
        self._lock = threading.Lock()
        self._out = out
        self.watch = _CompileWatch.install() if watch_compiles else None
        # Seconds each jitted function's latest compile took: the greedy sweep compiles its own sampler,
        # so until its first batch is done the ETA adds what the training sampler took to compile.
        self.compile_s_of: dict[str, float] = self.watch.by_name if self.watch else {}
        self.sweep_compiled = False
        # The time ledger (the events' `ledger` field): seconds per phase, compilation apart.
        self.started_at = time.time()
        self.phase_s: dict[str, float] = {}
        self._acct: tuple[str, float, float] = ("setup", self.t0, self._compiled())
        self._stop = threading.Event()
        if enabled and self.watch is not None:
            threading.Thread(target=self._announce_compiles, daemon=True, name="grpoctl-compile").start()

    # ------------------------------------------------------------------ printing

    def _print(self, ev: Event, *, human_line: bool = True) -> None:
        if not self.enabled:
            return
        lines = encode(ev) + "\n" + (human(ev) + "\n" if human_line else "")
        with self._lock:  # the compile watcher prints from its own thread
            if self._out is not None:
                self._out.write(lines)
                self._out.flush()
            else:
                print(lines, end="", flush=True)

    def say(self, text: str) -> None:
        """A plain line for people (no event): values from config and measurements only, never secrets."""
        if not self.enabled:
            return
        with self._lock:
            line = f"[trainer +{fmt_duration(self.elapsed())}] {text}\n"
            if self._out is not None:
                self._out.write(line)
                self._out.flush()
            else:
                print(line, end="", flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def span(self) -> Span:
        return Span(self.watch)

    def _event(self, event: str, phase: str, **fields: Any) -> Event:
        step = self.done_units.get("train", self.plan.first_step - 1) if self.plan.steps else None
        eta = self.eta()
        phase_eta = self.phase_eta(phase, fields.get("k"), fields.get("n")) if eta is None else None
        return Event(event=event, phase=phase, step=step, total=self.plan.steps or None,
                     elapsed_s=round(self.elapsed(), 3), eta_s=eta, phase_eta_s=phase_eta,
                     ledger=self.ledger(), **fields)

    # ------------------------------------------------------------------ time ledger

    def _compiled(self) -> float:
        """Compile seconds so far, the compile under way included."""
        watch = self.watch
        if watch is None:
            return 0.0
        current = watch.current
        if current is None:
            return watch.total_s
        return watch.total_s + max(time.perf_counter() - current[1] - getattr(watch, "_acc", 0.0), 0.0)

    def _split(self, now: float) -> tuple[str, float, float]:
        """The open interval of the current phase: (phase, its compile-free seconds, compile seconds)."""
        phase, since, compiled_then = self._acct
        compiled = min(max(self._compiled() - compiled_then, 0.0), now - since)
        return phase, now - since - compiled, compiled

    def _enter(self, phase: str) -> None:
        """The run is in `phase` from now on: the time since the last change goes to the phase it was in."""
        if phase == self._acct[0]:
            return
        now = time.perf_counter()
        old, spent, compiled = self._split(now)
        self.phase_s[old] = self.phase_s.get(old, 0.0) + spent
        self.phase_s["compile"] = self.phase_s.get("compile", 0.0) + compiled
        self._acct = (phase, now, self._compiled())

    def ledger(self) -> dict[str, Any]:
        """{"t0", "phase_s", "resumed_from"}: seconds per phase so far (they add up to elapsed())."""
        phase, spent, compiled = self._split(time.perf_counter())
        totals = dict(self.phase_s)
        if phase != "done":
            totals[phase] = totals.get(phase, 0.0) + spent
            totals["compile"] = totals.get("compile", 0.0) + compiled
        phase_s = {k: round(v, 3) for k, v in totals.items() if v > 0}
        return {"t0": round(self.started_at, 3), "phase_s": phase_s, "resumed_from": self.plan.first_step - 1}

    # ------------------------------------------------------------------ phases

    def phase(self, phase: str, detail: str | None = None, **fields: Any) -> None:
        """A phase without units began (setup, model load, data load, checkpoint)."""
        self._enter(phase)
        ev = self._event("phase", phase, detail=detail, **fields)
        self.last = ev
        self._print(ev)

    def info(self, info: dict[str, str]) -> None:
        """The run's identity (run id, config hash, git commit, W&B URL when online): printed once."""
        self._print(Event(event="info", phase="setup", elapsed_s=round(self.elapsed(), 3), info=info))

    def bytes(self, done: int, total: int, detail: str | None = None) -> None:
        """Download progress of the model load (throttled like any phase)."""
        now = time.perf_counter()
        if done < total and now - self._emitted_at.get("model_load", 0.0) < EMIT_EVERY_S:
            return
        self._emitted_at["model_load"] = now
        self._enter("model_load")
        human_due = done >= total or now - self._human_at.get("model_load", 0.0) >= HUMAN_EVERY_S
        if human_due:
            self._human_at["model_load"] = now
        ev = self._event("phase", "model_load", detail=detail, bytes_done=done, bytes_total=total)
        self.last = ev
        self._print(ev, human_line=human_due)

    def due(self, phase: str, k: int, n: int) -> bool:
        """Whether `advance(phase, k, n)` would print now (callers sync the device only then)."""
        if k <= 0 or k >= n or phase not in self._marks:
            return True
        return time.perf_counter() - self._emitted_at.get(phase, 0.0) >= EMIT_EVERY_S

    def advance(self, phase: str, k: int, n: int, detail: str | None = None, **fields: Any) -> None:
        """`k` of `n` units of `phase` are finished (k=0: the phase begins). Measures the phase's rate
        between calls (the caller has synced the device) and prints when due."""
        due = self.due(phase, k, n)
        self._enter(phase)
        mark = self._marks.get(phase)
        if phase == "final_sweep" and k >= 1:
            self.sweep_compiled = True
        if mark is not None and k > mark[1]:
            self._rate(phase, mark[0].seconds() / (k - mark[1]))
        if k == 0 or mark is None or k > mark[1]:
            self._marks[phase] = (self.span(), k)
        self.done_units[phase] = k
        if not due:
            return
        now = time.perf_counter()
        self._emitted_at[phase] = now
        human_due = k <= 0 or k >= n or now - self._human_at.get(phase, 0.0) >= HUMAN_EVERY_S
        if human_due:
            self._human_at[phase] = now
        ev = self._event("phase", phase, k=k, n=n, detail=detail, **fields)
        self.last = ev
        self._print(ev, human_line=human_due)

    def observe(self, phase: str, seconds: float) -> None:
        """One unit of `phase` took `seconds` (compile-free): for rates the caller measures itself."""
        self._rate(phase, seconds)

    def _rate(self, phase: str, seconds: float) -> None:
        history = self.rates.setdefault(phase, [])
        history.append(seconds)
        del history[:-10]

    def step(self, step: int, metrics: dict[str, Any]) -> None:
        """GRPO step `step` finished (its periodic eval included): the per-step `progress` line."""
        self.done_units["train"] = step
        self._enter("train")
        ev = self._event("progress", "train", k=step, n=self.plan.steps, metrics=dict(metrics))
        self.last = ev
        self._print(ev)

    def resume(self, phase: str = "train") -> None:
        """After a short interlude (checkpoint save), say again where the run stands (JSON only)."""
        k = self.done_units.get(phase, 0)
        self._enter(phase)
        ev = self._event("phase", phase, k=k, n=self.plan.steps if phase == "train" else None)
        self.last = ev
        self._print(ev, human_line=False)

    def finish(self, summary: str) -> None:
        self._stop.set()
        self._enter("done")
        ev = dataclasses.replace(self._event("done", "done", summary=summary), eta_s=0.0)
        self.last = ev
        self._print(ev)

    def close(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ compile announcements

    def _announce_compiles(self) -> None:
        shown: tuple[str, float] | None = None  # the compile announced last, until it is over
        said = 0.0  # when the last line about it was printed
        while not self._stop.wait(0.2):
            watch = self.watch
            current = watch.current if watch else None
            if shown is not None and current is not shown:
                name, start = shown
                shown = None
                took = watch.by_name.get(name) if watch else None
                took = time.perf_counter() - start if took is None else took
                self.say(f"compiled {name} in {took:.1f} s")
                if current is None and self.last is not None:  # back to what the run was doing
                    self._print(dataclasses.replace(self.last, elapsed_s=round(self.elapsed(), 3),
                                                    eta_s=self.eta(), ledger=self.ledger()), human_line=False)
            if current is not None and current is not shown:
                name, start = current
                if time.perf_counter() - start >= ANNOUNCE_COMPILE_AFTER_S:
                    shown, said = current, time.perf_counter()
                    self._print(self._event("phase", "compile", detail=name))
            elif shown is not None and time.perf_counter() - said >= COMPILE_HEARTBEAT_S:
                # A line now and then during a long compile: people see it is alive, and so does the
                # orchestrator's STALLED check (it watches the log grow).
                said = time.perf_counter()
                self.say(f"still compiling {shown[0]} ({fmt_duration(said - shown[1])})")

    # ------------------------------------------------------------------ ETA

    def rate(self, phase: str) -> float | None:
        history = self.rates.get(phase)
        return sum(history) / len(history) if history else None

    def phase_eta(self, phase: str, k: int | None, n: int | None) -> float | None:
        """Seconds left in `phase` (k of n units done) at its measured rate; None before one is measured."""
        rate = self.rate(phase)
        if rate is None or k is None or not n or k >= n:  # a finished phase has nothing left to say
            return None
        return (n - k) * rate

    def eta(self) -> float | None:
        """Seconds of work left, compile excluded; None until a GRPO step has been timed."""
        p = self.plan
        step_s = self.rate("train")
        if not p.steps or step_s is None:
            return None
        rollout_s = self.rate("rollout") or step_s
        eval_s = self.rate("eval") or rollout_s
        sweep_s = self.rate("final_sweep") or self.rate("start_sweep")
        if sweep_s is None:
            sweep_s = rollout_s * p.rows_per_sweep_batch / max(p.rows_per_step, 1)
        done = self.done_units
        step = done.get("train", p.first_step - 1)
        left = 0.0
        left += max(p.warm_start_steps - done.get("warm_start", 0), 0) * (self.rate("warm_start") or 0.0)
        left += max(p.start_sweep_batches - done.get("start_sweep", 0), 0) * sweep_s
        left += max(p.steps - step, 0) * step_s
        evals_left = sum(1 for s in p.eval_steps if s > step)
        in_eval = self.last is not None and self.last.phase == "eval"
        current_eval = (p.eval_batches - done.get("eval", 0)) if in_eval else 0
        left += (evals_left * p.eval_batches + current_eval) * eval_s
        left += max(p.final_sweep_batches - done.get("final_sweep", 0), 0) * sweep_s
        if p.final_sweep_batches and not self.sweep_compiled:
            left += self.compile_s_of.get(_FUNCTION_NAMES["_generate"], 0.0)
        return left


def eval_steps(first: int, steps: int, every: int) -> tuple[int, ...]:
    """The steps after which the periodic eval runs (every `every` steps and the last one)."""
    if not every:
        return ()
    return tuple(s for s in range(first, steps + 1) if s % every == 0 or s == steps)


def batches(count: int, size: int) -> int:
    return -(-count // size) if size > 0 else 0

