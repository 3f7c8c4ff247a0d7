"""Logical axis names -> ``PartitionSpec``, for parameters and for activations.

Parameters carry logical names (``nn.with_logical_partitioning``); a rules table (``vjax.train.sharding.RULES``)
maps each name to mesh axes. :func:`spec_for` makes the ``PartitionSpec`` of one array, replicating a
dimension the mesh axes do not divide (tiny models on big meshes) and using a mesh axis at most once.

:func:`constrain` pins an activation's sharding by logical names (every transformer block's output
``[B, L, D]`` as :data:`ACTIVATION`: batch over the data axes, so FSDP and tensor parallelism shard the
activations as well as the parameters) while a mesh (``jax.set_mesh``) and rules
(``flax.linen.logical_axis_rules``) are active — ``vjax.train.step.Trainer`` sets both while its steps trace —
and is a no-op everywhere else (single device, inference, other projects).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import PartitionSpec as P


def target_platform() -> str:
    """The platform the traced computation will run on: that of the devices of the active mesh
    (``jax.set_mesh``, as ``Trainer`` sets while its steps trace), else ``jax.default_backend()``. A CPU host that
    compiles for abstract TPU chips (``experiments.plan``) thus picks the TPU kernels."""
    mesh = jax.sharding.get_abstract_mesh()  # usable while tracing, and it knows its devices' platform
    platform = getattr(getattr(mesh, "abstract_device", None), "platform", None) if not mesh.empty else None
    return platform or jax.default_backend()


def axis_size(mesh, axes) -> int:
    """Devices along mesh ``axes`` (a name, a tuple of names, or None: 1)."""
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[a] for a in axes]))


def spec_for(names: Sequence[str | None], shape: Sequence[int], mesh, rules: Sequence[tuple[str, Any]]) -> P:
    """PartitionSpec for one array from its logical ``names`` under ``rules`` on ``mesh`` (a ``Mesh`` or an
    ``AbstractMesh``); indivisible dims are replicated and a mesh axis is used at most once per array.

    >>> import jax, numpy as np
    >>> mesh = jax.sharding.AbstractMesh((2, 4), ("data", "tensor"))
    >>> spec_for(("batch", "mlp"), (8, 6), mesh, (("batch", "data"), ("mlp", "tensor")))  # 6 % 4 != 0
    P('data', None)
    """
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name, size in zip(names, shape):
        axes = table.get(name) if name is not None else None
        flat = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        flat = tuple(a for a in flat if a not in used and mesh.shape[a] > 1)
        if flat and size % axis_size(mesh, flat) == 0:
            used.update(flat)
            out.append(flat[0] if len(flat) == 1 else flat)
        else:
            out.append(None)
    return P(*out)


ACTIVATION = ("batch", "length", "act_embed")  # [B, L, D] between transformer blocks (decoder, ViT)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``jax.lax.with_sharding_constraint`` of ``x`` by logical ``names`` under the active mesh and rules;
    ``x`` unchanged when either is missing."""
    rules = nn.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, spec_for(names, x.shape, mesh, rules))
