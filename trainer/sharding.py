"""Device mesh (dp, fsdp, tp) and partition rules for the Qwen2 params pytree.

Rules, applied per leaf from its path and shape (stacked layer params keep their leading layer axis whole,
because `lax.scan` slices it):
  * tp splits attention heads and the MLP hidden dimension (column-parallel q/k/v/gate/up, row-parallel
    o/down) and the vocabulary of the embedding / LM head, where the dimension divides;
  * fsdp then takes the largest remaining dimension that it divides;
  * dp replicates parameters; batches are split over (dp, fsdp).

The rules also place optimizer state: a leaf's path is matched from its first params root name (`embed`,
`layers`, ...), so `mu/layers/q/kernel` of a Lion state is split exactly like `layers/q/kernel`, and
scalars (step counts) are replicated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("dp", "fsdp", "tp")
BATCH_AXES = ("dp", "fsdp")

# Which axis (of the leaf, layer axis included) carries heads / MLP hidden / vocab, by param name.
_TP_AXIS = {
    ("q", "kernel"): 2,
    ("k", "kernel"): 2,
    ("v", "kernel"): 2,
    ("q", "bias"): 1,
    ("k", "bias"): 1,
    ("v", "bias"): 1,
    ("o", "kernel"): 1,
    ("gate", "kernel"): 2,
    ("up", "kernel"): 2,
    ("down", "kernel"): 1,
    ("embed", "embedding"): 0,
    ("lm_head", "kernel"): 0,
}


def parse_mesh_shape(mesh_shape: str, n_devices: int, n_processes: int = 1) -> tuple[int, int, int]:
    """'auto' -> (hosts, local devices, 1); 'dp,fsdp,tp' -> those sizes (their product must match)."""
    if mesh_shape == "auto":
        return n_processes, n_devices // n_processes, 1
    try:
        dp, fsdp, tp = (int(x) for x in mesh_shape.split(","))
    except ValueError:
        raise ValueError(
            f"mesh_shape: expected 'auto' or 'dp,fsdp,tp' (e.g. 1,8,1), got {mesh_shape!r}"
        ) from None
    if min(dp, fsdp, tp) < 1 or dp * fsdp * tp != n_devices:
        raise ValueError(
            f"mesh_shape: {mesh_shape!r} needs {dp * fsdp * tp} devices but {n_devices} are present"
        )
    return dp, fsdp, tp


# The top-level names of the params pytree (trainer/model.py).
_ROOTS = ("embed", "layers", "final_norm", "lm_head")


def process_count(devices: Sequence[jax.Device]) -> int:
    """Hosts that `devices` span: jax.process_count() for a real run's devices, and for the abstract
    devices of a TPU topology (the preflight) the hosts of that slice."""
    return len({d.process_index for d in devices})


def make_mesh(mesh_shape: str = "auto", devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = parse_mesh_shape(mesh_shape, len(devices), process_count(devices))
    # Auto axes: GSPMD propagates shardings from params and batch through the model code untouched.
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def partition_spec(path: tuple[Any, ...], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec of one param leaf (see the module docstring for the rules)."""
    spec: list[str | None] = [None] * len(shape)
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    names = names[next((i for i, n in enumerate(names) if n in _ROOTS), 0) :]  # optimizer state prefixes
    stacked = bool(names) and names[0] == "layers"
    tp, fsdp = mesh.shape["tp"], mesh.shape["fsdp"]
    tp_axis = _TP_AXIS.get(tuple(names[-2:])) if len(names) >= 2 else None
    if tp > 1 and tp_axis is not None and shape[tp_axis] % tp == 0:
        spec[tp_axis] = "tp"
    if fsdp > 1:
        candidates = [
            (size, axis)
            for axis, size in enumerate(shape)
            if spec[axis] is None and size % fsdp == 0 and not (stacked and axis == 0)
        ]
        if candidates:
            spec[max(candidates)[1]] = "fsdp"
    return PartitionSpec(*spec)


def param_partition_specs(params: Any, mesh: Mesh) -> Any:
    """Pytree of PartitionSpecs matching `params` (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(lambda p, x: partition_spec(p, x.shape, mesh), params)


def param_shardings(params: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_partition_specs(params, mesh))


def shard_params(params: Any, mesh: Mesh) -> Any:
    """Places (host or device) params onto the mesh by the partition rules."""
    return jax.device_put(params, param_shardings(params, mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over dp and fsdp; everything else replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Process-local host arrays (this host's rows) -> global arrays split over (dp, fsdp).

    On one host this is a plain device_put; on several, each process passes its own rows."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
        batch,
    )


def batch_divisor(mesh: Mesh) -> int:
    """Global batch sizes must be multiples of this (the number of batch shards)."""
    return mesh.shape["dp"] * mesh.shape["fsdp"]
