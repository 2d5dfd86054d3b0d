"""The preflight report: what `python -m trainer.preflight --json` prints and the laptop parses (stdlib only).

One schema for both halves: the trainer builds `FunctionReport`s and a `Report` and prints
`Report.to_json()`; the laptop reads it back with `Report.from_json`, caches it and renders it with
preflight_table.py. Reading is lenient (unknown keys ignored, missing ones defaulted) so that a report
written by a newer trainer, or a hand-made one in a test, still parses; writing is lossless for every key
the trainer sets. docs/ARCHITECTURE.md ("Contract: preflight") lists the keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from grpoctl_contract.accelerators import GIB

# Exit codes of `python -m trainer.preflight`.
EXIT_FITS = 0  # every program fits with the headroom
EXIT_DOES_NOT_FIT = 2  # a program does not fit (one line naming it, T and GiB), or a bad config/accelerator
EXIT_UNAVAILABLE = 4  # this host cannot compile for a TPU (no jax/libtpu: Linux x86_64 only)

DEFAULT_ACCELERATOR = "v6e-8"
DEFAULT_HEADROOM = 0.10  # the fraction of usable HBM a program must leave free


@dataclasses.dataclass(frozen=True)
class FunctionReport:
    """One compiled program, per chip (bytes, flops, seconds)."""

    name: str
    seq_len: int = 0  # the sequence length it was compiled at (0: none, e.g. optimizer_init)
    peak_bytes: int = 0  # argument + temp + output - alias (XLA's own check compares temp alone with HBM)
    capacity_bytes: int = 0  # usable HBM x (1 - headroom)
    fits: bool = True
    mosaic_kernels: int = 0
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    generated_code_bytes: int = 0
    compile_s: float = 0.0
    # The roofline inputs, per chip, read off the compiled text with every loop trip counted (layer scan,
    # micro-batches; a loop whose trip count depends on data, the sampler's decode loop, counts once):
    flops: float = 0.0  # matmul flops (hlo_stats.matmul_flops; a Pallas kernel counts its CostEstimate)
    bytes_accessed: float = 0.0  # XLA's cost analysis: HBM bytes with every loop body counted ONCE
    # max(flops / peak, hbm_bytes / HBM bandwidth) + collective_bytes / ICI bandwidth
    estimated_s: float = 0.0
    hbm_bytes: float = 0.0  # HBM bytes, every loop trip counted (hlo_stats.hbm_traffic)
    collective_bytes: int = 0  # sum of `collectives`
    collectives: dict[str, int] = dataclasses.field(default_factory=dict)  # {kind: bytes per chip}
    # XLA's own cost analysis (loop bodies once) and the same formula on it, for comparison.
    xla_flops: float = 0.0
    xla_estimated_s: float = 0.0
    # One iteration of the loops whose trip count depends on data (the decode loop of a whole sampler
    # program): {"flops", "hbm_bytes", "collective_bytes"}, already counted once in the totals above.
    data_loop: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> FunctionReport:
        if not isinstance(data, Mapping) or "name" not in data:
            raise ValueError("a preflight function without a name")
        # None where a number belongs (an old laptop cache wrote nulls): the field's default.
        return FunctionReport(**{k: v for k, v in data.items() if k in _FUNCTION_KEYS and v is not None})


_FUNCTION_KEYS = frozenset(f.name for f in dataclasses.fields(FunctionReport))


@dataclasses.dataclass(frozen=True)
class Report:
    """The whole preflight of one config on one accelerator.

    `extra` holds the trainer's other top-level keys as printed: the run's facts (model, mesh, num_micro,
    max_new_tokens, sweep_max_new_tokens, policy_loss_impl, shadow_policy_loss_impl), the estimates
    (decode_estimate, grpo_step) and `suggest` with --suggest. `cached` is the laptop's: never written."""

    fits: bool
    accelerator: str = ""
    topology: str = ""
    num_devices: int = 0
    headroom: float = DEFAULT_HEADROOM
    usable_bytes: int = 0  # the chip's usable HBM, before the headroom
    jax_version: str = ""
    config_hash: str = ""
    reason: str | None = None  # why it does not fit: one line naming the program, T and GiB
    functions: tuple[FunctionReport, ...] = ()
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    cached: bool = dataclasses.field(default=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        """The --json object: the typed keys, then `extra`'s, then the functions."""
        out: dict[str, Any] = {k: getattr(self, k) for k in _REPORT_KEYS}
        out.update({k: v for k, v in self.extra.items() if k not in out})
        out["functions"] = [f.to_json() for f in self.functions]
        return out

    @staticmethod
    def from_json(data: Any, *, cached: bool = False) -> Report:
        if not isinstance(data, dict) or not isinstance(data.get("functions"), list) or "fits" not in data:
            raise ValueError("not a preflight report object")
        reason = data.get("reason")
        return Report(
            fits=bool(data["fits"]),
            accelerator=str(data.get("accelerator", "")),
            topology=str(data.get("topology", "")),
            num_devices=int(data.get("num_devices", 0)),
            headroom=float(data.get("headroom", DEFAULT_HEADROOM)),
            usable_bytes=int(data.get("usable_bytes", 0)),
            jax_version=str(data.get("jax_version", "")),
            config_hash=str(data.get("config_hash", "")),
            reason=None if reason is None else str(reason),
            functions=tuple(FunctionReport.from_json(f) for f in data["functions"]),
            extra={k: v for k, v in data.items() if k not in _REPORT_KEYS and k != "functions"},
            cached=cached,
        )

    @property
    def largest(self) -> FunctionReport | None:
        """The function with the highest per-chip peak: what decides whether the run fits."""
        return max(self.functions, key=lambda f: f.peak_bytes, default=None)

    def line(self) -> str:
        """One line for progress output and reports: verdict, the largest function, capacity."""
        top = self.largest
        verdict = "fits" if self.fits else "DOES NOT FIT"
        if top is None:
            return f"{verdict} on {self.accelerator}"
        at = f" at T={top.seq_len}" if top.seq_len else ""
        text = (
            f"{verdict} on {self.accelerator}: largest {top.name}{at} {gib(top.peak_bytes)} of "
            f"{gib(top.capacity_bytes)} GiB per chip (headroom {self.headroom:.0%})"
        )
        return text + (" [cached]" if self.cached else "")


_REPORT_KEYS = (
    "fits", "accelerator", "topology", "num_devices", "headroom", "usable_bytes", "jax_version",
    "config_hash", "reason",
)  # fmt: skip


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"
