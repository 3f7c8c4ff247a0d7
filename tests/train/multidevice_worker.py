"""Run in a subprocess with 8 simulated CPU devices: train steps on a given mesh, save results."""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from tests.train.common import build, fixed_batches  # noqa: E402
from vjax.layers.scan import unstack_all  # noqa: E402
from vjax.pretrained import with_layer_layout  # noqa: E402
from vjax.train.checkpoint import Checkpoints  # noqa: E402
from vjax.train.sharding import make_mesh  # noqa: E402


def main(model: str, mesh_shape: str, out: str, steps: int, ckpt_dir: str = "", restore_shape: str = ""):
    shape = tuple(int(s) for s in mesh_shape.split("x"))
    n = int(np.prod(shape))
    trainer = build(model, make_mesh(shape, jax.devices()[:n]))
    if model.endswith("+scan"):  # the unrolled model's initial values, stacked: runs compare leaf by leaf
        unrolled = build(model.partition("+")[0], make_mesh(shape, jax.devices()[:n]))
        state = trainer.init_state(0, with_layer_layout(jax.device_get(unrolled.init_state(0).params), trainer.module))
        spec = state.params["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec  # [layers, embed, mlp]
        assert tuple(spec) == (None, "fsdp", "tensor"), spec
    else:
        state = trainer.init_state(0)
    losses = []
    for batch in fixed_batches(trainer.module, steps):
        state, metrics = trainer.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    params = unstack_all(jax.device_get(state.params))  # scanned groups unrolled: the leaves of the unrolled model
    leaves = {str(i): np.asarray(x) for i, x in enumerate(jax.tree_util.tree_leaves(params))}
    np.savez(out, losses=np.asarray(losses), **leaves)
    if ckpt_dir:
        ck = Checkpoints(ckpt_dir)
        ck.save(steps, state, force=True)
        ck.close()
        # restore onto another mesh and check bitwise equality of every leaf
        rshape = tuple(int(s) for s in restore_shape.split("x"))
        other = build(model, make_mesh(rshape, jax.devices()[: int(np.prod(rshape))]))
        restored = Checkpoints(ckpt_dir).restore(other.abstract_state, other.state_shardings)
        for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(restored)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        mesh_of = {tuple(x.sharding.mesh.devices.shape) for x in jax.tree_util.tree_leaves(restored.params)}
        assert mesh_of == {rshape}, mesh_of
        print("restored onto", rshape)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), *sys.argv[5:])
