"""The TPU generations grpoctl knows: per-chip facts and slice shapes, ONE table for the laptop, the trainer
and the test fakes (stdlib only). A generation that is not in CHIPS is refused everywhere with the same
one line (`AcceleratorError`), so no half accepts a slice the other cannot compile for.

The preflight's roofline ESTIMATE of every program uses these and only these numbers:

    estimated_s = max(flops / peak_flops, hbm_bytes / hbm_bytes_per_s) + collective_bytes / ici_bytes_per_s

per chip (collectives added, not overlapped: they sit between the matmuls that need them).
"""

from __future__ import annotations

import dataclasses
import math
import re

GIB = 1024**3


class AcceleratorError(ValueError):
    """An accelerator type no table entry covers: one line, without a prefix (each half adds its own)."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip facts: HBM XLA may use, peak bf16 flops, HBM bandwidth, ICI bandwidth (published figures),
    and how its slices are named and wired."""

    kind: str
    usable_bytes: int
    peak_flops: float
    hbm_bytes_per_s: float
    ici_bytes_per_s: float  # one chip's published inter-chip bandwidth (all links)
    # An accelerator type's number counts TensorCores: 2 per chip on v4/v5p ("v4-8" is 4 chips), 1 on v5e/v6e.
    cores_per_chip: int = 1
    torus_dims: int = 2  # v5e/v6e slices are 2-D tori, v4/v5p 3-D

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
    "v5p": Chip("v5p", int(94.25 * GIB), 459e12, 2.765e12, 600e9, cores_per_chip=2, torus_dims=3),
    "v4": Chip("v4", int(31.75 * GIB), 275e12, 1.2e12, 300e9, cores_per_chip=2, torus_dims=3),
}
ALIASES = {"v5litepod": "v5e"}  # Cloud TPU's accelerator-type prefix -> the CHIPS key
# Chips -> the slice's torus shape, the ones jax's topology tables know.
_SHAPES_2D = {
    1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)
}
_SHAPES_3D = {1: (1, 1, 1), 4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4)}
_NAME = re.compile(r"(?P<gen>[a-z0-9]+)-(?P<n>\d+)")
_EXAMPLES = "v6e-8, v5litepod-16, v5p-8, v4-8"


@dataclasses.dataclass(frozen=True)
class Slice:
    """One accelerator type, e.g. v6e-8: its chip, jax's topology name and how the chips sit on hosts."""

    name: str
    chip: Chip
    topology: str  # jax's topology name, e.g. "v6e:2x4"
    chips_per_host: tuple[int, int, int]
    num_chips: int  # what is billed

    @property
    def hosts(self) -> int:
        """How many VMs (workers) the slice has: v6e-8 -> 1, v6e-16 -> 4, v4-32 -> 4."""
        return max(1, self.num_chips // math.prod(self.chips_per_host))


def family(name: str) -> str:
    """The generation of an accelerator type without checking it (price tables, old run records):
    v6e-8 -> v6e, v5litepod-16 -> v5e."""
    gen = name.strip().rsplit("-", 1)[0]
    return ALIASES.get(gen, gen)


def parse_slice(name: str) -> Slice:
    """'v6e-8', 'v5litepod-16', 'v5p-8', 'v4-8', ... -> its Slice; `AcceleratorError` for anything else
    (v2/v3 and unknown generations, malformed names, sizes no slice has)."""
    m = _NAME.fullmatch(name.strip())
    kind = ALIASES.get(m["gen"], m["gen"]) if m else ""
    if m is None or kind not in CHIPS:
        raise AcceleratorError(f"unknown accelerator {name!r} (expected e.g. {_EXAMPLES})")
    chip, count = CHIPS[kind], int(m["n"])
    chips = count // chip.cores_per_chip
    unit = "cores" if chip.cores_per_chip > 1 else "chips"
    shapes: dict[int, tuple[int, ...]] = _SHAPES_2D if chip.torus_dims == 2 else _SHAPES_3D
    if count % chip.cores_per_chip or chips not in shapes:
        raise AcceleratorError(f"no {kind} slice has {count} {unit}")
    shape = shapes[chips]
    if chip.torus_dims == 2:
        # One host holds up to 8 chips (v6e-8 is 2x4 on one host); bigger slices have 4 chips per host.
        per_host = (shape[0], shape[1], 1) if chips <= 8 else (2, 2, 1)
    else:  # 3-D tori (v5p, v4): 4 chips per host, 2x2x1 per host
        per_host = (1, 1, 1) if chips == 1 else (2, 2, 1)
    return Slice(name, chip, f"{kind}:{'x'.join(map(str, shape))}", per_host, chips)
