"""Every attention implementation equals the einsum reference (``impl="xla"``), forward and gradient.

Tolerance: 1e-5 absolute and relative, float32, on outputs and on d/dq, d/dk, d/dv of a weighted sum of the
output. ``chunked`` and ``cudnn`` (``jax.nn``'s XLA path on a CPU) follow the reference's convention on a
row with nothing to attend (the mean of ``v``) and are compared on every row; ``splash`` (Pallas, run by
its interpreter on a CPU) is compared on the rows that attend something, and must be finite elsewhere.
The chunked kernel runs with 8-wide tiles, so every case spans several tiles and ``L``, ``S`` are not
multiples of them.
"""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vjax.layers.attention as attention_lib
from vjax.layers.attention import attention, dot_product_attention, make_attention_mask, resolve_impl
from vjax.layers.masks import StructuredMask
from vjax.layers.vit import segment_mask, segment_structure

TOL = 1e-5
H, K, DH = 4, 2, 8  # GQA: 2 query heads per kv head


def qkv(b, l, s, h=H, kh=K, seed=0, dh=DH):
    r = np.random.default_rng(seed)
    q = r.normal(size=(b, l, h, dh)).astype(np.float32)
    k = r.normal(size=(b, s, kh, dh)).astype(np.float32)
    v = r.normal(size=(b, s, kh, dh)).astype(np.float32)
    w = r.normal(size=(b, l, h, dh)).astype(np.float32)  # weights of the scalar loss
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(w)


def left_valid(s, pads):
    return jnp.asarray(np.arange(s)[None, :] >= np.asarray(pads)[:, None])  # [B, S]


def seg_ids(rows):
    return jnp.asarray(np.asarray(rows, np.int32))


# name -> (shapes (B, L, S, H, K), StructuredMask); every case has L, S not multiples of the 8-wide tiles
CASES = {
    "causal_left_padding": ((3, 13, 13, H, K), StructuredMask(kv_valid=left_valid(13, [0, 3, 6]), causal=True)),
    "sliding_window": ((2, 21, 21, H, K),
                       StructuredMask(kv_valid=left_valid(21, [0, 4]), causal=True, sliding_window=5)),
    "segments_with_padding": ((2, 11, 11, H, K), StructuredMask(
        q_segment_ids=seg_ids([[0, 0, 0, 1, 1, 2, 2, 2, 2, -1, -1], [0, 1, 1, 1, 1, 1, 2, 2, 3, 3, 3]]),
        kv_segment_ids=seg_ids([[0, 0, 0, 1, 1, 2, 2, 2, 2, -1, -1], [0, 1, 1, 1, 1, 1, 2, 2, 3, 3, 3]]))),
    "decode_chunk_offset": ((2, 5, 19, H, K), StructuredMask(
        kv_valid=left_valid(19, [2, 7]) & (jnp.arange(19) < 15)[None], q_offset=10, causal=True)),
    "decode_chunk_per_row_offset": ((2, 3, 19, H, K), StructuredMask(
        kv_valid=left_valid(19, [0, 7]), q_offset=jnp.asarray([9, 16]), causal=True, sliding_window=6)),
    "mha_no_mask": ((2, 9, 17, 4, 4), None),
    "mqa_rectangular_causal": ((1, 6, 10, 4, 1), StructuredMask(causal=True, q_offset=4)),
    # row 0: every key is padding, so every query of it attends nothing (finite, gradients not NaN)
    "fully_masked_rows": ((2, 9, 9, H, K), StructuredMask(kv_valid=left_valid(9, [9, 2]), causal=True)),
}


def run(impl, case, dense=False, jit=True):
    (b, l, s, h, kh), spec = CASES[case]
    q, k, v, w = qkv(b, l, s, h, kh)
    mask = spec.dense(l, s, b) if (dense and spec is not None) else spec

    def loss(q, k, v, mask):
        out = attention(q, k, v, mask, impl=impl, block_q=8, block_kv=8)
        return jnp.sum(out * w), out

    fn = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    (_, out), grads = (jax.jit(fn) if jit else fn)(q, k, v, mask)
    return out, grads


def reference(case):
    (b, l, s, h, kh), spec = CASES[case]
    q, k, v, w = qkv(b, l, s, h, kh)
    mask = None if spec is None else spec.dense(l, s, b)

    def loss(q, k, v):
        out = dot_product_attention(q, k, v, mask)
        return jnp.sum(out * w), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    rows = np.ones((b, l), bool) if mask is None else np.asarray(mask[:, 0].any(-1))  # rows that attend
    return out, grads, rows


def assert_close(got, want, what):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=TOL, rtol=TOL, err_msg=what)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("impl", ["chunked", "cudnn"])
def test_impl_equals_reference_forward_and_gradient(impl, case):
    out, grads = run(impl, case)
    ref_out, ref_grads, rows = reference(case)
    assert_close(out, ref_out, f"{impl} {case}: output")
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert np.isfinite(np.asarray(g)).all(), f"{impl} {case}: d{name} not finite"
        assert_close(g, rg, f"{impl} {case}: d{name}")
    if case == "fully_masked_rows":
        assert not rows[0].any() and rows[1].any()  # the case has what it claims
        assert_close(out[0], jnp.broadcast_to(jnp.repeat(qkv(2, 9, 9)[2][0], 2, axis=1).mean(0), out[0].shape),
                     "a row with nothing to attend is the mean of v")


HALF_TOL = 1e-2  # relative, in norm: bfloat16 rounding of the softmax and of both products (8 bits of mantissa)


HALF_CASES = ["causal_left_padding", "sliding_window", "segments_with_padding", "mha_no_mask"]


def check_half(case):
    """``impl="cudnn"`` on bfloat16 inputs at head dim 64 against the float32 reference on the same rounded
    inputs: ``|got - ref| / |ref| <= HALF_TOL`` (norms over the rows that attend) for the output and the
    gradients of a weighted sum of the rows that attend. Every case has an odd ``L`` or ``S``."""
    (b, l, s, h, kh), spec = CASES[case]
    q, k, v, w = (x.astype(jnp.bfloat16) for x in qkv(b, l, s, h, kh, dh=64))
    rows = np.ones((b, l), bool) if spec is None else np.asarray(spec.dense(l, s, b)[:, 0].any(-1))
    w = w * rows[:, :, None, None]  # a row that attends nothing is unspecified under cuDNN: no gradient from it

    def loss(q, k, v, impl):
        out = attention(q, k, v, spec, impl=impl)
        return jnp.sum(out.astype(jnp.float32) * w.astype(jnp.float32)), out

    fn = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    (_, out), grads = jax.jit(fn, static_argnums=3)(q, k, v, "cudnn")
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    (_, ref), ref_grads = jax.jit(fn, static_argnums=3)(*f32, "xla")
    assert out.dtype == jnp.bfloat16 and out.shape == (b, l, h, 64)
    for name, got, want in [("output", out, ref), *zip(("dq", "dk", "dv"), grads, ref_grads)]:
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        if name in ("output", "dq"):  # [B, L, ...]: the rows that attend
            got, want = got[rows], want[rows]
        assert np.isfinite(got).all(), f"{case}: {name} not finite"
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert err <= HALF_TOL, f"{case}: {name} relative error {err:.2e} > {HALF_TOL}"


@pytest.mark.parametrize("case", HALF_CASES)
def test_cudnn_in_bfloat16_is_the_float32_reference_within_rounding(case):
    """On a GPU this runs cuDNN's fused kernel (odd lengths padded to even); on a CPU ``jax.nn``'s XLA path."""
    check_half(case)


@pytest.mark.parametrize("case", HALF_CASES)
def test_cudnn_pads_odd_lengths_to_even_hidden_slots(case, monkeypatch):
    """The GPU mapping, run on this CPU: the target platform reads "gpu" and ``jax.nn.dot_product_attention``
    records what it is given and runs its XLA path. cuDNN (jax 0.10-0.11) refuses odd training lengths
    ("Unsupported sequence length Q 21, KV 21", seen on an H200): every call must get even ``L`` and ``S``, and
    the padding slots must change nothing (the same reference check as on a GPU)."""
    real = jax.nn.dot_product_attention
    seen = []

    def recording(q, k, v, *args, implementation=None, **kw):
        seen.append((q.shape[1], k.shape[1], implementation))
        return real(q, k, v, *args, implementation=None, **kw)

    monkeypatch.setattr(attention_lib, "target_platform", lambda: "gpu")
    monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
    check_half(case)
    cudnn_calls = [(l, s) for l, s, impl in seen if impl == "cudnn"]
    assert cudnn_calls and all(l % 2 == 0 and s % 2 == 0 for l, s in cudnn_calls), seen


@pytest.mark.parametrize("case", ["causal_left_padding", "segments_with_padding", "decode_chunk_per_row_offset"])
def test_chunked_takes_dense_masks(case):
    """A dense boolean mask (what callers like the Q-Former pass) is sliced per tile: same result."""
    out, grads = run("chunked", case, dense=True)
    ref_out, ref_grads, _ = reference(case)
    assert_close(out, ref_out, f"dense {case}: output")
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert_close(g, rg, f"dense {case}: d{name}")


def test_chunked_head_wise_dense_mask_and_traced_offset():
    """A per-head dense mask ``[B, H, L, S]``, and a query offset that is traced (as in jitted decoding)."""
    q, k, v, _ = qkv(2, 7, 12)
    r = np.random.default_rng(1)
    mask = jnp.asarray(r.random((2, H, 7, 12)) < 0.6)
    assert_close(attention(q, k, v, mask, impl="chunked", block_q=8, block_kv=8), dot_product_attention(q, k, v, mask),
                 "per-head dense mask")
    valid = left_valid(12, [1, 4])

    @jax.jit
    def both(offset):
        spec = StructuredMask(kv_valid=valid, q_offset=offset, causal=True)
        return attention(q, k, v, spec, impl="chunked", block_q=8, block_kv=8), attention(q, k, v, spec, impl="xla")

    got, want = both(jnp.int32(5))
    assert_close(got, want, "traced q_offset")


def test_chunked_refuses_bias():
    q, k, v, _ = qkv(1, 4, 4)
    with pytest.raises(ValueError, match="chunked"):
        attention(q, k, v, bias=jnp.zeros((1, H, 4, 4)), impl="chunked")


def test_unknown_impl_is_named():
    q, k, v, _ = qkv(1, 4, 4)
    with pytest.raises(ValueError, match="'flash2'"):
        attention(q, k, v, impl="flash2")


def test_structured_mask_reproduces_the_public_dense_masks():
    valid = left_valid(9, [0, 3])
    for offset in (0, 4, jnp.asarray([2, 5])):
        for window in (None, 3):
            want = make_attention_mask(valid, 5, query_offset=offset, sliding_window=window)
            spec = StructuredMask(kv_valid=valid, q_offset=offset, causal=True, sliding_window=window)
            got = spec.dense(5, 9)
            np.testing.assert_array_equal(got, want)
            tile = spec.block(jnp.arange(2, 5), jnp.arange(4, 9))  # any (q-block, kv-block) tile
            np.testing.assert_array_equal(tile, want[:, :, 2:5, 4:9])
    seg = seg_ids([[0, 0, 1, 1, 1, -1]])
    np.testing.assert_array_equal(segment_structure(seg).dense(6, 6), segment_mask(seg))
    assert int(segment_mask(seg)[0, 0].sum()) == 4 + 9  # two blocks, the padding row attends nothing


# ---------------------------------------------------------------------------------------- splash
SPLASH_CASES = ["sliding_window", "segments_with_padding", "decode_chunk_offset", "fully_masked_rows"]


@pytest.mark.parametrize("case", SPLASH_CASES)
def test_splash_interpreted_equals_reference(case):
    """Splash in the Pallas interpreter (works on a CPU; slow, so few small cases). Rows that attend
    something equal the reference; the others are finite, and so are all gradients."""
    (b, l, s, h, kh), _ = CASES[case]
    _, _, _, w = qkv(b, l, s, h, kh)
    ref_out, _, rows = reference(case)
    rows_j = jnp.asarray(rows)[:, :, None, None]
    q, k, v, _ = qkv(b, l, s, h, kh)
    spec = CASES[case][1]

    def loss(impl):
        def f(q, k, v):
            out = attention(q, k, v, spec if impl == "splash" else spec.dense(l, s, b), impl=impl)
            return jnp.sum(jnp.where(rows_j, out * w, 0.0)), out
        return jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)

    (_, out), grads = loss("splash")(q, k, v)
    _, ref_grads = loss("xla")(q, k, v)
    assert np.isfinite(np.asarray(out)).all()
    assert_close(jnp.where(rows_j, out, 0.0), jnp.where(rows_j, ref_out, 0.0), f"splash {case}: output")
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert np.isfinite(np.asarray(g)).all(), f"splash {case}: d{name} not finite"
        assert_close(g, rg, f"splash {case}: d{name}")


def test_int_offset_stays_static_through_jit():
    """A Python-int ``q_offset`` is pytree metadata: it survives ``jit`` (and ``remat``), so splash and
    cuDNN's ``is_causal`` still see it; an array offset stays an array."""
    spec = StructuredMask(kv_valid=jnp.ones((1, 4), bool), q_offset=3, causal=True)
    seen = jax.jit(lambda m: (m.static_offset is not None and m.static_offset == 3, m.dense(2, 4)))(spec)
    assert seen[0] and seen[1].shape == (1, 1, 2, 4)
    assert jax.jit(lambda m: jnp.int32(m.static_offset is None))(spec.replace(q_offset=jnp.int32(3))) == 1


def test_splash_refuses_what_it_cannot_express():
    q, k, v, _ = qkv(1, 4, 4)
    with pytest.raises(ValueError, match="splash"):
        attention(q, k, v, jnp.ones((1, 1, 4, 4), bool), impl="splash")
    with pytest.raises(ValueError, match="splash"):
        jax.jit(lambda o: attention(q, k, v, StructuredMask(causal=True, q_offset=o), impl="splash"))(0)


def test_auto_by_backend(monkeypatch):
    spec = StructuredMask(causal=True)
    monkeypatch.setattr(attention_lib.jax, "default_backend", lambda: "cpu")
    assert resolve_impl("auto", 8, spec) == "xla"
    assert resolve_impl("chunked", 8, spec) == "chunked"  # an explicit choice is kept
    monkeypatch.setattr(attention_lib.jax, "default_backend", lambda: "tpu")
    assert resolve_impl("auto", 8, spec) == "splash"
    assert resolve_impl("auto", 8, jnp.ones((1, 1, 8, 8), bool)) == "chunked"  # dense mask: no splash
    assert resolve_impl("auto", 8, StructuredMask(causal=True, q_offset=jnp.int32(3))) == "chunked"  # traced
    assert resolve_impl("auto", 1, spec) == "xla"  # the decode step
    assert resolve_impl("auto", 8, spec, bias=jnp.zeros(())) == "xla"
    monkeypatch.setattr(attention_lib.jax, "default_backend", lambda: "gpu")
    assert resolve_impl("auto", 8, spec, dtype=jnp.bfloat16) == "cudnn"
    assert resolve_impl("auto", 8, spec, dtype=jnp.float32) == "xla"


def test_splash_compiles_for_tpu_forward_and_gradient():
    """Ahead-of-time compile (no TPU needed) of splash forward and gradient for an abstract v5p chip, with
    padding, a sliding window and GQA; the compiled program holds the Pallas kernels (fwd, dq, dkv)."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.fail("libtpu is missing: the test extra installs it (pip install -e '.[test]' pulls '.[plan]')")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")  # no real TPU to ask; quiets libtpu's warnings
    # another process (an xdist worker) may hold libtpu's lockfile; a compile-only use may share it
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1")
    sharding = NamedSharding(Mesh(np.array(topo.devices[:1]), ("x",)), PartitionSpec())
    b, l, dh = 2, 1000, 128  # L not a multiple of the kernel's blocks: padded inside
    q = jax.ShapeDtypeStruct((b, l, 4, dh), jnp.bfloat16, sharding=sharding)
    kv = jax.ShapeDtypeStruct((b, l, 2, dh), jnp.bfloat16, sharding=sharding)
    valid = jax.ShapeDtypeStruct((b, l), jnp.bool_, sharding=sharding)

    def fwd(q, k, v, valid):
        spec = StructuredMask(kv_valid=valid, causal=True, sliding_window=256)
        return attention(q, k, v, spec, impl="splash", interpret=False)  # compiled for the TPU, not interpreted

    def grad(q, k, v, valid):
        return jax.grad(lambda *a: fwd(*a, valid).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

    for fn, kernels in ((fwd, 1), (grad, 3)):
        compiled = jax.jit(fn).lower(q, kv, kv, valid).compile()
        assert compiled.as_text().count("tpu_custom_call") >= kernels
    # "auto" follows the devices of the active mesh, not this host's backend: a CPU host compiling for TPU chips
    # (experiments.plan, the Trainer's scope) picks splash
    spec = StructuredMask(causal=True)
    assert resolve_impl("auto", 8, spec) == ("xla" if jax.default_backend() == "cpu" else resolve_impl("auto", 8, spec))
    with jax.set_mesh(Mesh(np.array(topo.devices[:1]), ("x",))):
        assert resolve_impl("auto", 8, spec) == "splash"


def test_splash_runs_per_device_under_a_mesh_compiled_for_tpu():
    """Under a mesh and the training rules (the Trainer's and experiments.plan's scope) the kernel runs per
    device: compiled for 4 abstract v5p chips, batch 4 over ``fsdp`` = 2 and 4 query / 2 kv heads over
    ``tensor`` = 2, every kernel call sees 2 examples and 2 / 1 heads, and nothing is all-gathered. XLA cannot
    partition a Mosaic kernel (without ``shard_map`` jit refuses the call), and ``interpret`` follows the
    mesh's platform, so no ``interpret=False`` is needed on this CPU host."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.fail("libtpu is missing: the test extra installs it (pip install -e '.[test]' pulls '.[plan]')")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import re

    import flax.linen as nn
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from vjax.train.sharding import RULES

    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1")
    mesh = Mesh(np.array(topo.devices).reshape(1, 2, 2), ("data", "fsdp", "tensor"))
    batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    b, l, dh = 4, 512, 128
    q = jax.ShapeDtypeStruct((b, l, 4, dh), jnp.bfloat16, sharding=batch)
    kv = jax.ShapeDtypeStruct((b, l, 2, dh), jnp.bfloat16, sharding=batch)
    valid = jax.ShapeDtypeStruct((b, l), jnp.bool_, sharding=batch)

    def fwd(q, k, v, valid):
        return attention(q, k, v, StructuredMask(kv_valid=valid, causal=True), impl="splash")

    def grad(q, k, v, valid):
        return jax.grad(lambda *a: fwd(*a, valid).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

    for fn, kernels in ((fwd, 1), (grad, 3)):
        with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
            text = jax.jit(fn).lower(q, kv, kv, valid).compile().as_text()
        calls = [line.split("custom-call(", 1)[1] for line in text.splitlines()
                 if "tpu_custom_call" in line and "custom-call(" in line]
        assert len(calls) >= kernels, fn.__name__
        operands = {m for c in calls for m in re.findall(r"bf16\[[0-9,]+\]", c)}
        assert operands <= {"bf16[2,2,512,128]", "bf16[2,1,512,128]"}, (fn.__name__, operands)
        assert "all-gather" not in text, fn.__name__


def test_splash_sharded_over_simulated_devices_equals_reference():
    """The per-device path on 8 simulated CPU devices (a subprocess: the device count is fixed at start),
    mesh (data, fsdp, tensor) = (2, 2, 2): batch and heads split, the kernel interpreted; output and
    gradients equal the einsum reference within 1e-5 (tests/layers/sharded_splash_worker.py)."""
    import subprocess
    import sys

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-m", "tests.layers.sharded_splash_worker"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "dv max abs diff" in proc.stdout


# ---------------------------------------------------------------------------------------- memory
def test_chunked_memory_is_far_below_the_reference():
    """Compiled (not run) forward + backward at L = S = 4096, H = 4, Dh = 64 on the CPU backend: the
    temporaries of the chunked kernel are under a quarter of the einsum reference's ``[B, H, L, S]``."""
    b, l, h, dh = 1, 4096, 4, 64
    shape = jax.ShapeDtypeStruct((b, l, h, dh), jnp.float32)
    valid = jax.ShapeDtypeStruct((b, l), jnp.bool_)

    def step(impl):
        def f(q, k, v, valid):
            spec = StructuredMask(kv_valid=valid, causal=True)
            return jax.grad(lambda q, k, v: attention(q, k, v, spec, impl=impl).sum(), argnums=(0, 1, 2))(q, k, v)
        return jax.jit(f).lower(shape, shape, shape, valid).compile().memory_analysis().temp_size_in_bytes

    ref, chunked = step("xla"), step("chunked")
    print(f"temp bytes: xla {ref / 2**20:.1f} MiB, chunked {chunked / 2**20:.1f} MiB, ratio {chunked / ref:.4f}")
    assert ref >= b * h * l * l * 4  # the reference holds at least the float32 logits
    assert chunked < ref / 4
