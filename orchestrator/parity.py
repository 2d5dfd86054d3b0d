"""Lockstep parity of a loss provider, read back from a run's files: the kernel verdict.

A run with `train.shadow_policy_loss_impl` set computes the shadow provider on the same batch and
parameters every GRPO step and logs the differences (`train/parity/*` in metrics.jsonl; their maxima as
`train/parity/<name>_max` in summary.json). This answers "does the kernel compute the same thing?" inside
one run, free of trajectory luck; it says nothing about how a whole training run would end.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from grpoctl_contract import rundir
from orchestrator import untrusted

# The trainer's parity metrics (the contract's names, `train/parity/logp_max_abs_diff`, ...) by their short
# names (`logp_max_abs_diff`), which the tolerances, labels and verdict use.
METRICS = {name.rsplit("/", 1)[-1]: name for name in rundir.PARITY_KEYS}
# What "tracked" means, per compute dtype: the largest difference still called rounding. float32 kernels
# agree to ~1e-6 on log-probs; bfloat16 keeps 8 bits of mantissa, so its rounding is ~1e-2 relative.
TOLERANCES: dict[str, dict[str, float]] = {
    "float32": {"logp_max_abs_diff": 1e-4, "grad_rel_diff": 1e-3, "loss_abs_diff": 1e-4},
    "bfloat16": {"logp_max_abs_diff": 5e-2, "grad_rel_diff": 5e-2, "loss_abs_diff": 1e-2},
}
_LABELS = {
    "logp_max_abs_diff": "|dlogp|",
    "grad_rel_diff": "grad rel diff",
    "loss_abs_diff": "|dloss|",
    "logp_mean_abs_diff": "mean |dlogp|",
}


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def _get(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


@dataclass(frozen=True)
class ParityVerdict:
    run_id: str
    main: str  # the run's loss provider (train.policy_loss_impl)
    shadow: str  # the provider computed beside it
    steps: int  # GRPO steps with parity rows (0: only the summary's maxima were found)
    maxima: dict[str, float]  # per key, the largest value seen (NaN: a non-finite value was logged)
    tolerance: dict[str, float]
    dtype: str
    parted_at: int | None  # the first step past a tolerance (or non-finite); None: tracked throughout
    parted_on: str | None = None  # the key that parted first

    @property
    def tracked(self) -> bool:
        return self.parted_at is None and all(
            math.isfinite(v) and v <= self.tolerance[k] for k, v in self.maxima.items() if k in self.tolerance
        )

    def _figures(self) -> str:
        shown = [k for k in ("logp_max_abs_diff", "grad_rel_diff", "loss_abs_diff") if k in self.maxima]
        return ", ".join(f"max {_LABELS[k]} {self.maxima[k]:.2g}" for k in shown)

    def _tolerance_text(self) -> str:
        return ", ".join(f"{_LABELS[k]} <= {v:g}" for k, v in self.tolerance.items()) + f" ({self.dtype})"

    def line(self) -> str:
        where = f"on all {self.steps} steps" if self.steps else "over the run (summary maxima)"
        if self.tracked:
            head = f"{self.main} tracked {self.shadow} {where}"
        elif self.parted_at is not None:
            on = _LABELS.get(self.parted_on or "", "?")
            head = f"{self.main} parted from {self.shadow} at step {self.parted_at} ({on})"
        else:
            head = f"{self.main} did not track {self.shadow} {where}"
        return f"{self.run_id}: kernel parity: {head}: {self._figures()}; tolerance {self._tolerance_text()}"

    def to_json(self) -> dict[str, Any]:
        return {
            "run": self.run_id,
            "main": self.main,
            "shadow": self.shadow,
            "steps": self.steps,
            "maxima": self.maxima,
            "tolerance": self.tolerance,
            "dtype": self.dtype,
            "tracked": self.tracked,
            "parted_at": self.parted_at,
            "parted_on": self.parted_on,
        }


def parity_verdict(
    run_id: str,
    summary: Mapping[str, Any],
    metrics: Sequence[Mapping[str, Any]],
    config: Mapping[str, Any],
) -> ParityVerdict | None:
    """The run's kernel verdict from its per-step rows (preferred) or its summary's maxima; None when the
    run logged no parity at all (no shadow provider)."""
    rows = [m for m in metrics if any(name in m for name in rundir.PARITY_KEYS)]
    from_summary = {
        k: v for k, name in METRICS.items() if (v := _num(summary.get(rundir.parity_max(name)))) is not None
    }
    if not rows and not from_summary:
        return None
    dtype = untrusted.clean(_get(config, "compute_dtype") or "float32", 40)
    tolerance = TOLERANCES.get(dtype, TOLERANCES["bfloat16"])
    maxima: dict[str, float] = {}
    parted_at, parted_on = None, None
    logged = {k for k, name in METRICS.items() if any(name in r for r in rows)}
    for n, row in enumerate(rows, 1):
        for key, name in METRICS.items():
            value = _num(row.get(name))
            if value is None:
                if key not in logged:
                    continue
                # A key the run logs is missing from this step's row: its value was NaN/Infinity, which
                # the validated reader (worker_data.metrics) leaves out. Not finite counts as parted.
                value = math.nan
            bad = not math.isfinite(value)
            maxima[key] = (
                math.nan if bad or math.isnan(maxima.get(key, 0.0)) else max(maxima.get(key, 0.0), value)
            )
            if parted_at is None and key in tolerance and (bad or value > tolerance[key]):
                parted_at, parted_on = int(row.get("step", n)), key
    for key, value in from_summary.items():  # the summary covers steps whose rows were not kept
        maxima[key] = value if key not in maxima or not math.isfinite(value) else max(maxima[key], value)
    # config.json came from a worker: its strings reach a terminal only cleaned (orchestrator/untrusted.py)
    main = untrusted.clean(
        _get(config, "train.policy_loss_impl") or "this run's loss provider", untrusted.FIELD
    )
    shadow = untrusted.clean(_get(config, "train.shadow_policy_loss_impl") or "its shadow provider", 40)
    return ParityVerdict(
        run_id, main, shadow, len(rows), maxima, dict(tolerance), dtype, parted_at, parted_on
    )
