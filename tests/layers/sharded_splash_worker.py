"""Run in a subprocess with 8 simulated CPU devices: splash attention (Pallas interpreter) under a
``(data, fsdp, tensor) = (2, 2, 2)`` mesh with the training rules, against the einsum reference.

Prints one line per check; exits non-zero on a mismatch (tolerance 1e-5, float32, rows that attend)."""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from vjax.layers.attention import attention  # noqa: E402
from vjax.layers.masks import StructuredMask  # noqa: E402
from vjax.layers.splash import kernel_specs  # noqa: E402
from vjax.train.sharding import RULES, make_mesh  # noqa: E402


def main():
    b, l, h, kh, dh = 4, 24, 4, 2, 8  # batch over data x fsdp = 4, heads and kv heads over tensor = 2
    r = np.random.default_rng(0)
    q, w = (jnp.asarray(r.normal(size=(b, l, h, dh)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(r.normal(size=(b, l, kh, dh)), jnp.float32) for _ in range(2))
    valid = jnp.asarray(np.arange(l)[None] >= np.array([0, 3, 7, 11])[:, None])
    spec = StructuredMask(kv_valid=valid, causal=True)
    dense = spec.dense(l, l, b)
    rows = np.asarray(dense[:, 0].any(-1))[:, :, None, None]

    def loss(impl, mask):
        def f(q, k, v):
            out = attention(q, k, v, mask, impl=impl)
            return jnp.sum(jnp.where(rows, out * w, 0.0)), out
        return jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)

    (_, want), want_grads = jax.jit(loss("xla", dense))(q, k, v)
    mesh = make_mesh((2, 2, 2))
    on_mesh = [jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp")))) for x in (q, k, v)]
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        specs = kernel_specs(b, h, kh)
        (_, got), got_grads = jax.jit(loss("splash", spec))(*on_mesh)
    assert specs[0] == P(("data", "fsdp"), "tensor", None, None), specs
    print("kernel specs", specs)
    for name, g, ref in [("output", got, want), *zip(("dq", "dk", "dv"), got_grads, want_grads)]:
        g = np.where(rows, g, 0.0) if name in ("output", "dq") else np.asarray(g)
        ref = np.where(rows, ref, 0.0) if name in ("output", "dq") else np.asarray(ref)
        np.testing.assert_allclose(g, ref, atol=1e-5, rtol=1e-5, err_msg=name)
        print(name, "max abs diff", float(np.max(np.abs(g - ref))))


if __name__ == "__main__":
    main()
