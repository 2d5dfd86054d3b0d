"""The one rendering of a preflight report, as plain text lines: `python -m trainer.preflight` and
`grpoctl preflight` print the same table and notes (stdlib only, like the rest of this package).

Units: memory in GiB per chip, under 0.01 GiB in MiB with an `M` (a tiny config would read 0.00 in every
cell); the roofline estimate in milliseconds (a decode step is a few ms; seconds would need four decimals).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from grpoctl_contract.accelerators import GIB
from grpoctl_contract.preflight import FunctionReport, Report, gib

MIB = 2**20
# (header, left-aligned); the rest are right-aligned numbers.
COLUMNS = (
    ("function", True), ("T", False), ("args", False), ("temp", False), ("out", False), ("alias", False),
    ("code", False), ("peak", False), ("capacity", False), ("fits", True), ("mosaic", False),
    ("compile s", False), ("GFLOP", False), ("HBM GB", False), ("collectives MiB", False),
    ("est. ms*", False),
)  # fmt: skip
FOOTNOTE = (
    "* est. ms: a roofline ESTIMATE, max(flops / peak FLOP/s, HBM bytes / HBM bandwidth) + collective bytes"
    " / ICI bandwidth per chip (grpoctl_contract/accelerators.py), every loop trip counted except a decode"
    " loop's (once): device time only, not a measurement"
)


def memory(n: float) -> str:
    """GiB; under 0.01 GiB in MiB with an `M`."""
    return f"{n / GIB:.2f}" if n == 0 or n >= GIB / 100 else f"{n / MIB:.1f}M"


def milliseconds(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.1f}" if ms == 0 or ms >= 1 else f"{ms:.3f}"


def row(f: FunctionReport) -> tuple[str, ...]:
    return (
        f.name, str(f.seq_len or "-"), memory(f.argument_bytes), memory(f.temp_bytes), memory(f.output_bytes),
        memory(f.alias_bytes), memory(f.generated_code_bytes), memory(f.peak_bytes), memory(f.capacity_bytes),
        "yes" if f.fits else "NO", str(f.mosaic_kernels), f"{f.compile_s:.1f}", f"{f.flops / 1e9:.1f}",
        f"{f.hbm_bytes / 1e9:.2f}", f"{f.collective_bytes / MIB:.1f}", milliseconds(f.estimated_s),
    )  # fmt: skip


def title(report: Report) -> str:
    mesh = report.extra.get("mesh")
    shape = f", mesh {','.join(f'{k}={v}' for k, v in mesh.items())}" if isinstance(mesh, dict) else ""
    usable = f"; usable {gib(report.usable_bytes)} GiB" if report.usable_bytes else ""
    return (
        f"preflight {report.accelerator} ({report.topology}, {report.num_devices} chips{shape}), per chip,"
        f" GiB (M: MiB){usable} less {report.headroom:.0%} headroom; jax {report.jax_version}"
    )


def table(report: Report) -> list[str]:
    """The title, the header and one aligned row per function."""
    cells = [tuple(c for c, _ in COLUMNS), *(row(f) for f in report.functions)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    lines = [title(report)]
    for r in cells:
        aligned = zip(r, widths, COLUMNS, strict=True)
        parts = [c.ljust(w) if left else c.rjust(w) for c, w, (_, left) in aligned]
        lines.append("  ".join(parts).rstrip())
    return lines


def notes(report: Report) -> list[str]:
    """What the table means and what adds up from it: the lockstep parity, the footnote, the decode and
    whole-step estimates, the --suggest answer."""
    out = []
    shadow = report.extra.get("shadow_policy_loss_impl") or "none"
    if shadow != "none":
        out.append(
            f"update_step includes the lockstep parity: the {shadow} provider beside"
            f" {report.extra.get('policy_loss_impl')} on every micro-batch (train.shadow_policy_loss_impl)."
        )
    out.append(FOOTNOTE)
    out += [line for line in (decode_line(report), step_line(report), suggestion_line(report)) if line]
    return out


def render(report: Report) -> list[str]:
    """Everything a person reads: table, notes and the one-line verdict."""
    return [*table(report), *notes(report), report.line()]


def _numbers(entry: Any, keys: Sequence[str]) -> bool:
    return isinstance(entry, dict) and all(isinstance(entry.get(k), int | float) for k in keys)


def decode_line(report: Report) -> str | None:
    """The rollout's estimate: prefill + decode_step x max new tokens (the trainer's `decode_estimate`)."""
    d = report.extra.get("decode_estimate")
    if not _numbers(d, ("decode_step_s", "tokens", "decode_s", "prefill_s", "rollout_s")):
        return None
    return (
        f"decode (estimate): {d['decode_step_s'] * 1e3:.2f} ms per decode step x {d['tokens']} tokens"
        f" = {d['decode_s']:.2f} s, + prefill {d['prefill_s']:.3f} s = {d['rollout_s']:.2f} s per rollout"
    )


def step_line(report: Report) -> str | None:
    """The whole GRPO step's roofline estimate and its parts (the trainer's `grpo_step` entry)."""
    g = report.extra.get("grpo_step")
    if not _numbers(g, ("estimated_s", "rollout_s", "logprob_s", "update_s", "eval_s")):
        return None
    text = (
        f"GRPO step (estimate, device work only): {g['estimated_s']:.2f} s = rollout {g['rollout_s']:.2f}"
        f" + log-probs {g['logprob_s']:.2f} + update {g['update_s']:.2f} + eval (amortised) {g['eval_s']:.2f}"
    )
    if _numbers(g, ("flops", "hbm_bytes", "collective_bytes")):
        text += (
            f"; per chip {g['flops'] / 1e12:.1f} TFLOP, {g['hbm_bytes'] / 1e9:.1f} GB HBM,"
            f" {g['collective_bytes'] / 1e9:.1f} GB collectives"
        )
    return text


def suggestion_line(report: Report) -> str | None:
    """`--suggest`: the largest micro-batch per device whose update step fits, and what was tried."""
    sug = report.extra.get("suggest")
    if not isinstance(sug, dict):
        return None
    tried = ", ".join(
        f"{t.get('micro_batch_size_per_device')}: {gib(t.get('peak_bytes'))} GiB"
        f" {'fits' if t.get('fits') else 'no'}"
        for t in sug.get("tried", [])
        if isinstance(t, dict)
    )
    best = sug.get("micro_batch_size_per_device")
    head = (
        f"suggestion: --set train.micro_batch_size_per_device={best}"
        if best
        else "suggestion: no micro-batch size fits"
    )
    return f"{head} (tried {tried})" if tried else head
