"""Device mesh and the one rules table that maps logical axis names to mesh axes.

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel with parameters sharded over it,
ZeRO-3 style), ``tensor`` (Megatron-style tensor parallel over heads / MLP width / vocabulary).
Every parameter carries logical names (``nn.with_logical_partitioning``); :data:`RULES` maps them.
A dimension whose size the mesh axes do not divide is replicated instead (tiny models on big meshes).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vjax.layers import partitioning

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or axes); names not listed are replicated.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),  # the stacked axis of scanned blocks (vjax.layers.scan): not split; the other axes shard
    # activations between blocks (vjax.layers.partitioning.ACTIVATION): the batch as above; the sequence and the
    # width replicated (Megatron's tensor parallelism all-reduces back to whole rows at every block boundary)
    ("length", None),
    ("act_embed", None),
)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh; one ``-1`` entry takes the remaining devices.

    Raises a ``ValueError`` naming the shape and device count when they do not fit.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = list(shape)
    if len(shape) != 3:
        raise ValueError(f"mesh shape must have 3 entries (data, fsdp, tensor), got {tuple(shape)}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {tuple(shape)}: entries must be positive, with at most one -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"mesh shape {tuple(shape)} does not divide {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(
            f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, but {len(devices)} are available")
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def spec_for(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
             rules: Sequence[tuple[str, Any]] = RULES) -> P:
    """PartitionSpec for one array from its logical ``names`` (:func:`vjax.layers.partitioning.spec_for`
    with :data:`RULES` by default)."""
    return partitioning.spec_for(names, shape, mesh, rules)


def logical_shardings(boxed: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = RULES) -> Any:
    """``NamedSharding`` tree for a tree of ``nn.LogicallyPartitioned`` boxes (or their abstract
    values from ``jax.eval_shape(module.init, ...)``); unboxed leaves are replicated."""

    def one(x):
        if isinstance(x, nn.LogicallyPartitioned):
            return NamedSharding(mesh, spec_for(x.names, x.value.shape, mesh, rules))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map(one, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Shard the leading (batch) axis over ``data`` x ``fsdp``; the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Place a host batch (this process's rows) onto the mesh as global arrays."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        sharding = batch_sharding(mesh, v.ndim)
        out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out
