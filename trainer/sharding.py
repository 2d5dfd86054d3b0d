"""Device mesh (dp, fsdp, tp) and the PartitionSpecs of the Qwen2 params pytree.

The model declares what each weight axis is (`out_sharding` metadata on its NNX params, read back through
`trainer.model.param_axes`: `vocab`, `embed`, `heads`, `mlp`, `layers`); this module maps those logical
names onto the mesh, per leaf and from its shape:
  * tp splits the `heads`, `mlp` and `vocab` axis (column-parallel q/k/v/gate/up, row-parallel o/down,
    the vocabulary of the embedding / LM head) where the dimension divides;
  * fsdp then takes the largest remaining dimension that it divides, never the `layers` axis (the stacked
    layer params keep it whole, because `lax.scan` slices it);
  * dp replicates parameters; batches are split over (dp, fsdp).

Optimizer state is placed by the same names: a leaf's path is matched from its first params root name
(`embed`, `layers`, ...), so `mu/layers/q/kernel` of a Lion state is split exactly like `layers/q/kernel`,
and scalars (step counts) are replicated.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from trainer.model import param_axes

AXES = ("dp", "fsdp", "tp")
BATCH_AXES = ("dp", "fsdp")

# Logical axes that tensor parallelism splits (see trainer/model.py for where each name sits).
_TP_NAMES = ("heads", "mlp", "vocab")


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


@functools.cache
def _axes_by_path() -> dict[tuple[str, ...], tuple[str | None, ...]]:
    """Params path (e.g. ('layers', 'q', 'kernel')) -> logical axis names, from the model's metadata."""
    flat = jax.tree_util.tree_flatten_with_path(param_axes(), is_leaf=lambda x: isinstance(x, tuple))[0]
    return {tuple(_name(k) for k in path): axes for path, axes in flat}


def _name(key: Any) -> str:
    return str(getattr(key, "key", getattr(key, "name", key)))


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
    table = _axes_by_path()
    roots = {p[0] for p in table}
    names = [_name(k) for k in path]
    names = names[next((i for i, n in enumerate(names) if n in roots), 0) :]  # optimizer state prefixes
    axes = table.get(tuple(names))
    if axes is None or len(axes) != len(shape):  # not a param (rng, counts) or a reshaped statistic
        stacked = names[:1] == ["layers"]
        axes = tuple("layers" if stacked and i == 0 else None for i in range(len(shape)))
    spec: list[str | None] = [None] * len(shape)
    tp, fsdp = mesh.shape["tp"], mesh.shape["fsdp"]
    tp_axis = next((i for i, a in enumerate(axes) if a in _TP_NAMES), None)
    if tp > 1 and tp_axis is not None and shape[tp_axis] % tp == 0:
        spec[tp_axis] = "tp"
    if fsdp > 1:
        candidates = [
            (size, axis)
            for axis, size in enumerate(shape)
            if spec[axis] is None and size % fsdp == 0 and axes[axis] != "layers"
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
