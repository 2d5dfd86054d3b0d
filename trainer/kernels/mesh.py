"""Run a memory-efficient provider per device on that device's tokens.

Under jit with FSDP the batch (tokens) is split over the mesh and the LM head is split over its vocabulary.
Left to GSPMD, a Pallas kernel is an opaque custom call, so GSPMD would gather everything and run the whole
loss on every device; the chunked loop slices lm_head by a loop index along its sharded axis, which GSPMD
can only serve by re-gathering lm_head in every iteration. Instead we shard_map the provider: each device
takes its own tokens and the whole lm_head (gathered once, as FSDP does for every layer), and shard_map's
transpose sums dlm_head over the devices.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from trainer.kernels.types import TokenStats

Provider = Callable[[jax.Array, jax.Array, jax.Array], TokenStats]


def token_mesh(hidden: jax.Array) -> AbstractMesh | None:
    """The device mesh the tokens live on: the ambient one (`jax.set_mesh`), else the one in hidden's type
    (under jit, arrays placed with a NamedSharding carry their mesh), else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        mesh = getattr(jax.typeof(hidden).sharding, "mesh", None)
    return None if mesh is None or mesh.empty else mesh


def token_axes(mesh: AbstractMesh | None, tokens: int) -> tuple[str, ...]:
    """Mesh axes to split the token axis over: every axis of size > 1, in mesh order, while their product
    divides N. Batch axes (dp, fsdp) come first in our meshes, so the split matches the batch's own."""
    axes: list[str] = []
    ways = 1
    named = () if mesh is None else zip(mesh.axis_names, mesh.axis_types, strict=True)
    for name, kind in named:
        size = mesh.shape[name]
        # Manual axes: we are already inside the caller's shard_map, per device along them.
        if kind != AxisType.Manual and size > 1 and tokens % (ways * size) == 0:
            axes.append(name)
            ways *= size
    return tuple(axes)


def per_device(provider: Provider, hidden: jax.Array, lm_head: jax.Array, targets: jax.Array) -> TokenStats:
    """provider(hidden [N, H], lm_head [V, H], targets [N]) on each device's slice of the tokens."""
    mesh = token_mesh(hidden)
    axes = token_axes(mesh, hidden.shape[0])
    if not axes:
        return provider(hidden, lm_head, targets)
    tokens = PartitionSpec(axes)
    # check_vma=False: pallas_call outputs carry no varying-axes type; the replicated lm_head's cotangent
    # is still summed over the token shards by shard_map's transpose.
    return jax.shard_map(
        provider, mesh=mesh, in_specs=(tokens, PartitionSpec(), tokens), out_specs=tokens, check_vma=False
    )(hidden, lm_head, targets)
