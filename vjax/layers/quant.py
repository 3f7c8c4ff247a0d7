"""int8 weight-only quantisation for inference: per-output-channel symmetric scales, dequantised in the matmul.

A float kernel ``W [in, out]`` (or a scanned stack ``[N, in, out]``) is stored as

    scale[o] = max_i |W[i, o]| / 127                 float32, one per output channel (``kernel_scale``)
    Q[i, o]  = clip(round(W[i, o] / scale[o]), -127, 127)      int8, same name and shape (``kernel``)

so that ``|W - Q * scale| <= scale / 2`` elementwise. Because the scale belongs to the output channel it factors
out of the contraction:

    x @ W  ~=  (x @ Q) * scale

and :class:`Dense` computes exactly that, converting ``Q`` to the compute dtype inside the dot (XLA fuses the
convert into the matmul; no float copy of the weight is kept). An embedding table ``E [V, D]`` gets one scale
per row (``embedding_scale [V]``): the lookup is ``Q[ids] * scale[ids]`` and the tied LM head
``h @ E^T = (h @ Q^T) * scale`` (:class:`Embed`). Everything else — norms, biases, convolution / patch
kernels, learned query tokens, LoRA adapters — stays as it is. This is the scheme of LLM.int8's vector-wise
weights without its outlier split (Dettmers et al. 2022, arXiv 2208.07339, section 3.2) and of
``torch.ao`` / ``torchao``'s ``int8_weight_only``.

The quantised parameters are an ordinary nested dict: ``module.apply({"params": quantize_params(params)}, ...)``
runs every model built from :func:`vjax.layers.mlp.dense`, :class:`vjax.layers.lora.LoRADense` and
:class:`Embed`, unchanged (Flax checks a parameter's shape, not its dtype).
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

MODES = ("", "int8")  # what --quantize / load_run(quantize=...) accept; "" keeps the float weights
SCALE_SUFFIX = "_scale"
QUANTIZED = {"kernel": (2, 3), "embedding": (2,)}  # leaf name -> ranks quantised ([in, out], scanned [N, in, out])


def quantize_array(w: jax.Array, axis: int, bits: int = 8) -> tuple[jax.Array, jax.Array]:
    """Symmetric quantisation of ``w`` with one float32 scale per slice along every axis but ``axis`` (the
    reduced one): ``(q int8 [w.shape], scale float32 [w.shape without axis])``, ``w ~= q * scale``.

    >>> q, s = quantize_array(jnp.array([[1.0, -0.5], [-2.0, 0.25]]), axis=0)
    >>> q.tolist(), s.tolist()
    ([[64, -127], [-127, 64]], [0.015748031437397003, 0.003937007859349251])
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in [2, 8] (values are stored as int8), got {bits}")
    qmax = 2 ** (bits - 1) - 1
    w = jnp.asarray(w, jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=axis) / qmax
    scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero channel: any scale gives q = 0
    q = jnp.clip(jnp.round(w / jnp.expand_dims(scale, axis)), -qmax, qmax).astype(jnp.int8)
    return q, scale


def dequantize_array(q: jax.Array, scale: jax.Array, axis: int, dtype=jnp.float32) -> jax.Array:
    """``q * scale`` with ``scale`` broadcast along ``axis`` (the inverse of :func:`quantize_array`)."""
    return (jnp.asarray(q, jnp.float32) * jnp.expand_dims(jnp.asarray(scale, jnp.float32), axis)).astype(dtype)


def _axis(name: str) -> int:
    """The reduced axis of a quantised leaf: a kernel's input axis (-2), an embedding's feature axis (-1)."""
    return -2 if name == "kernel" else -1


def _unbox(v: Any) -> Any:
    return v.unbox() if hasattr(v, "unbox") else v


def check_mode(mode: str) -> None:
    """Raise ``ValueError`` naming the known modes unless ``mode`` is one of :data:`MODES`."""
    if mode not in MODES:
        raise ValueError(f"unknown quantisation {mode!r}; known: {', '.join(m for m in MODES if m)}")


def quantize_params(params: Mapping[str, Any], *, bits: int = 8, min_size: int = 1024,
                    embeddings: bool = True) -> dict[str, Any]:
    """Every Dense ``kernel`` (``[in, out]``, or ``[N, in, out]`` of scanned layers) and, with ``embeddings``,
    every ``Embed`` table ``embedding [V, D]`` of at least ``min_size`` elements per layer becomes int8 with a
    float32 sibling ``<name>_scale`` (per output channel; per table row). Other leaves are returned as they are.

    Convolution kernels (rank 4-5: patch embeddings) are never touched. Quantising twice is an error.

    >>> p = {"fc": {"kernel": jnp.ones((64, 32)), "bias": jnp.zeros(32)}, "norm": {"scale": jnp.ones(64)}}
    >>> q = quantize_params(p)
    >>> sorted(q["fc"]), q["fc"]["kernel"].dtype, q["fc"]["kernel_scale"].shape, q["norm"]["scale"].dtype
    (['bias', 'kernel', 'kernel_scale'], dtype('int8'), (32,), dtype('float32'))
    """
    names = dict(QUANTIZED) if embeddings else {"kernel": QUANTIZED["kernel"]}

    def walk(node: Mapping[str, Any]) -> dict[str, Any]:
        out = {}
        for k, v in node.items():
            v = _unbox(v)
            if isinstance(v, Mapping):
                out[k] = walk(v)
                continue
            out[k] = v
            if k in names and jnp.ndim(v) in names[k]:
                if k + SCALE_SUFFIX in node:
                    raise ValueError(f"{k!r} is already quantised (it has a {k + SCALE_SUFFIX!r} sibling)")
                per_layer = int(np.prod(jnp.shape(v)[-2:]))
                if per_layer >= min_size and jnp.issubdtype(jnp.result_type(v), jnp.floating):
                    out[k], out[k + SCALE_SUFFIX] = quantize_array(v, _axis(k), bits)
        return out

    return walk(params)


def dequantize_params(params: Mapping[str, Any], dtype=jnp.float32) -> dict[str, Any]:
    """The float parameters a quantised tree stands for: every ``<name>`` with a ``<name>_scale`` sibling becomes
    ``<name> * scale`` in ``dtype``, and the scales are dropped (for export, and to check :class:`Dense`)."""

    def walk(node: Mapping[str, Any]) -> dict[str, Any]:
        out, scales = {}, _scales_of(node)
        for k, v in node.items():
            v = _unbox(v)
            if isinstance(v, Mapping):
                out[k] = walk(v)
            elif k in scales:
                continue
            elif k + SCALE_SUFFIX in node:
                out[k] = dequantize_array(v, _unbox(node[k + SCALE_SUFFIX]), _axis(k), dtype)
            else:
                out[k] = v
        return out

    return walk(params)


def _scales_of(node: Mapping[str, Any]) -> set[str]:
    """The keys of ``node`` that are the quantisation scale of a sibling."""
    return {k for k in node if k.endswith(SCALE_SUFFIX) and k[: -len(SCALE_SUFFIX)] in node}


def is_quantized(params: Mapping[str, Any]) -> bool:
    """Whether any leaf of ``params`` has a quantisation scale beside it."""
    return bool(_scales_of(params)) or any(isinstance(v, Mapping) and is_quantized(v) for v in params.values())


def param_bytes(params: Mapping[str, Any], dtype=None) -> int:
    """Bytes of every leaf (arrays or ``jax.ShapeDtypeStruct``). With ``dtype``, floating leaves count as that
    dtype (e.g. ``jnp.bfloat16``: the size of the parameters served in bf16) — except quantisation scales, which
    stay float32; int8 weights count one byte each."""
    total, scales = 0, _scales_of(params)
    for k, v in params.items():
        v = _unbox(v)
        if isinstance(v, Mapping):
            total += param_bytes(v, dtype)
            continue
        dt = jnp.dtype(v.dtype)
        if dtype is not None and jnp.issubdtype(dt, jnp.floating) and k not in scales:
            dt = jnp.dtype(dtype)
        total += int(np.prod(v.shape)) * dt.itemsize
    return total


def sibling_scale(module: nn.Module, name: str) -> jax.Array | None:
    """The quantisation scale ``<name>_scale`` stored beside parameter ``name`` of ``module``, or None (float)."""
    key = name + SCALE_SUFFIX
    return module.get_variable("params", key) if module.has_variable("params", key) else None


def quantized_matmul(x: jax.Array, kernel: jax.Array, scale: jax.Array | None, dtype=None,
                     precision=None) -> jax.Array:
    """``x [..., in] @ kernel [in, out]`` in ``dtype`` (default ``x``'s floating dtype); with ``scale [out]`` the
    kernel is int8 and the product is ``(x @ kernel) * scale`` — the convert fuses into the dot."""
    dtype = jnp.dtype(dtype) if dtype is not None else jnp.result_type(x.dtype, jnp.float32 if scale is not None
                                                                       else kernel.dtype)
    if scale is None and kernel.dtype == jnp.int8:
        raise ValueError("an int8 kernel without its kernel_scale: quantise with vjax.layers.quant.quantize_params")
    contract = (((x.ndim - 1,), (0,)), ((), ()))
    y = jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype), contract, precision=precision)  # [..., out]
    return y if scale is None else y * scale.astype(dtype)


class Dense(nn.Dense):
    """``nn.Dense`` (same parameters, names and auto-names) that also runs int8 kernels: when a ``kernel_scale``
    parameter sits beside ``kernel`` the output is ``(x @ kernel) * kernel_scale + bias``
    (:func:`quantized_matmul`); otherwise it is exactly ``nn.Dense``.

    >>> layer = Dense(32)
    >>> x = jnp.ones((2, 64))
    >>> p = layer.init(jax.random.key(0), x)["params"]
    >>> y, yq = layer.apply({"params": p}, x), layer.apply({"params": quantize_params({"d": p})["d"]}, x)
    >>> bool(jnp.allclose(y, yq, atol=0.02))
    True
    """

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:  # [..., in] -> [..., out]
        kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        scale = sibling_scale(self, "kernel")
        if scale is None and kernel.dtype != jnp.int8:
            inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
            dot = (self.dot_general_cls() if self.dot_general_cls is not None
                   else self.dot_general or jax.lax.dot_general)
            y = dot(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())), precision=self.precision)
        else:
            y = quantized_matmul(inputs, kernel, scale, self.dtype, self.precision)
        if bias is not None:
            y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,)).astype(y.dtype)
        return y


class Embed(nn.Embed):
    """``nn.Embed`` (same parameter ``embedding [V, D]``) that also runs an int8 table with one scale per row
    (``embedding_scale [V]``): lookup ``Q[ids] * scale[ids]``, tied LM head ``(h @ Q^T) * scale``."""

    def __call__(self, inputs: jax.Array) -> jax.Array:  # int [...] -> [..., D]
        """Embed the ids ``inputs``, dequantising the rows it reads when the table is int8."""
        scale = sibling_scale(self, "embedding")
        if scale is None:
            return super().__call__(inputs)
        dtype = jnp.dtype(self.dtype or jnp.float32)
        rows = jnp.take(self.embedding, inputs, axis=0).astype(dtype)  # [..., D]
        return rows * jnp.take(scale, inputs, axis=0)[..., None].astype(dtype)

    def attend(self, query: jax.Array) -> jax.Array:  # [..., D] -> [..., V]
        """``query @ embedding^T`` (tied LM head); an int8 table's row scales multiply the result."""
        scale = sibling_scale(self, "embedding")
        if scale is None:
            return super().attend(query)
        dtype = jnp.dtype(self.dtype or jnp.result_type(query.dtype, jnp.float32))
        return quantized_matmul(query, self.embedding.T, scale, dtype)


__all__ = ["MODES", "check_mode", "sibling_scale", "quantize_array", "dequantize_array", "quantize_params", "dequantize_params", "is_quantized",
           "param_bytes", "quantized_matmul", "Dense", "Embed"]
