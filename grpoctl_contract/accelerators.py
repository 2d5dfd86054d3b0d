"""Per-chip facts of the TPU generations, one table for the laptop and the trainer (stdlib only).

The preflight's roofline ESTIMATE of every program uses these and only these numbers:

    estimated_s = max(flops / peak_flops, hbm_bytes / hbm_bytes_per_s) + collective_bytes / ici_bytes_per_s

per chip (collectives added, not overlapped: they sit between the matmuls that need them).
"""

from __future__ import annotations

import dataclasses

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip facts: HBM XLA may use, peak bf16 flops, HBM bandwidth, ICI bandwidth (published figures)."""

    kind: str
    usable_bytes: int
    peak_flops: float
    hbm_bytes_per_s: float
    ici_bytes_per_s: float  # one chip's published inter-chip bandwidth (all links)

    def estimate_s(self, flops: float, hbm_bytes: float, collective_bytes: float) -> float:
        """The roofline formula above (see the module docstring)."""
        compute = max(flops / self.peak_flops, hbm_bytes / self.hbm_bytes_per_s)
        return compute + collective_bytes / self.ici_bytes_per_s


# Usable HBM: v6e's 31.25 GiB is what XLA reports on the chip (32 GiB less its reservation); the others
# assume the same 1/128 reservation of their published HBM. ICI: Google's per-chip figures, 3584 / 1600 /
# 4800 / 2400 Gbit/s.
CHIPS = {
    "v6e": Chip("v6e", int(31.25 * GIB), 918e12, 1.64e12, 448e9),
    "v5e": Chip("v5e", int(15.875 * GIB), 197e12, 0.819e12, 200e9),
    "v5p": Chip("v5p", int(94.25 * GIB), 459e12, 2.765e12, 600e9),
    "v4": Chip("v4", int(31.75 * GIB), 275e12, 1.2e12, 300e9),
}
