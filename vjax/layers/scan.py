"""Layer stacks: rematerialisation policies by name, ``nn.scan`` over one block, stacked parameter trees.

A model of ``N`` identical blocks either unrolls them (parameters ``layers_0 .. layers_{N-1}``, one traced
copy of the block per layer) or scans one block over a leading layer axis (parameters ``layers`` with every
leaf ``[N, ...]``; one traced copy, so compile time no longer grows with depth). The two layouts hold the
same numbers: :func:`stack_layers` / :func:`unstack_layers` move a tree between them, and
:func:`stack_like` / :func:`unstack_all` do it for every group of a model at once (the checkpoint converters
read and write the unrolled layout and call these when the model is scanned).

A scanned group is a sub-tree whose name is one of :data:`SCAN_GROUPS` (``layers`` in the decoder, ``blocks``
in the ViT); its unrolled form is the siblings ``<name>_0 .. <name>_{N-1}``.

Rematerialisation (``jax.checkpoint``) trades compute for memory: the backward pass recomputes what the
policy did not save. :data:`REMAT_POLICIES` names them:

| name | saved for the backward pass |
|---|---|
| ``none`` | everything (no remat) |
| ``full`` | only the block's inputs |
| ``dots_saveable`` | every matmul output |
| ``dots_with_no_batch_dims_saveable`` | matmuls without batch dimensions (the projections, not attention scores) |
| ``offload`` | as the previous, but moved to pinned host memory (backends that have it) |
| ``full_offload`` | as ``full``, but each block's input is moved to pinned host memory (backends that have it) |

``full`` keeps one ``[B, L, D]`` array per block on the device until the backward pass reaches it: at Llama-2-7B
with 16k tokens a sample, 32 x 128 MiB in bfloat16, the largest temporary of the step after the gradients.
``full_offload`` names the block's input (:func:`named_input`, :data:`BLOCK_INPUT`) and lets XLA copy it to host
memory in the forward pass and back in the backward, as MaxText's offloading policies do.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from vjax.layers.partitioning import target_platform
from vjax.pytree import flatten_params, unflatten_params

REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "offload", "full_offload")
BLOCK_INPUT = "block_input"  # the checkpoint name of a block's input (:func:`named_input`)
SCAN_GROUPS = ("layers", "blocks")
LAYER_AXIS = "layers"  # the logical name of the stacked axis (replicated by vjax.train.sharding.RULES)


def check_remat_policy(name: str) -> str:
    """``name`` if it is one of :data:`REMAT_POLICIES`, else a ``ValueError`` naming it and the choices.

    >>> check_remat_policy("dots_saveable")
    'dots_saveable'
    """
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat_policy={name!r} is not one of {REMAT_POLICIES}")
    return name


def resolve_remat(remat: bool, remat_policy: str) -> str:
    """The policy a config asks for: ``remat_policy``, with the older ``remat=True`` meaning ``"full"``
    when no other policy is named.

    >>> resolve_remat(True, "none"), resolve_remat(False, "dots_saveable"), resolve_remat(True, "offload")
    ('full', 'dots_saveable', 'offload')
    """
    check_remat_policy(remat_policy)
    return "full" if remat and remat_policy == "none" else remat_policy


def has_pinned_host(device: jax.Device | None = None) -> bool:
    """Whether ``device`` (default: the first device) can address a ``pinned_host`` memory space."""
    device = device or jax.devices()[0]
    try:
        return any(m.kind == "pinned_host" for m in device.addressable_memories())
    except (AttributeError, NotImplementedError, jax.errors.JaxRuntimeError):
        return False


def checkpoint_policy(name: str) -> Callable | None:
    """The ``jax.checkpoint`` policy of a :data:`REMAT_POLICIES` name (``None`` for ``"full"``: save nothing).

    ``"offload"`` and ``"full_offload"`` need a backend with pinned host memory; elsewhere a ``ValueError``
    names the backend.
    ``"none"`` has no policy: do not rematerialise at all (:func:`remat_block` returns the class unchanged).
    """
    check_remat_policy(name)
    cp = jax.checkpoint_policies
    if name in ("none", "full"):
        return None
    if name == "dots_saveable":
        return cp.dots_saveable
    if name == "dots_with_no_batch_dims_saveable":
        return cp.dots_with_no_batch_dims_saveable
    if not has_pinned_host():
        instead = "full" if name == "full_offload" else "dots_with_no_batch_dims_saveable"
        raise ValueError(f"remat_policy={name!r} needs a pinned_host memory space, which the "
                         f"{jax.default_backend()!r} backend does not have; use {instead!r}")
    if name == "full_offload":
        return cp.save_and_offload_only_these_names(
            names_which_can_be_saved=(), names_which_can_be_offloaded=(BLOCK_INPUT,),
            offload_src="device", offload_dst="pinned_host")
    return cp.offload_dot_with_no_batch_dims("device", "pinned_host")


@jax.custom_jvp
def gradient_barrier(x: jax.Array) -> jax.Array:
    """The identity, whose gradient XLA's CPU backend must compute once, not fuse into every consumer.

    Put at the input of each block of a stack. The gradient of the residual stream at block ``k`` is an
    elementwise sum over the norm backward of every later block; XLA's CPU fusion duplicates such cheap
    elementwise producers into each consumer fusion (here the transposed operand of every weight gradient), so
    the chain was recomputed once per block: a cost quadratic in depth. ``lax.optimization_barrier`` does not stop
    it (the CPU pipeline expands barriers before fusing). A conditional does: fusion never crosses one, so on a
    CPU target (:func:`vjax.layers.partitioning.target_platform`) the tangent, and so (transposed) the gradient,
    passes through a ``lax.cond`` whose two branches are both the identity, on a predicate XLA cannot fold (from
    the primal value). A JVP rule rather than a VJP one keeps forward-mode differentiation working. Measured on the
    ``experiments.bench`` Qwen2-VL tower (6 LayerNorm blocks, 2,048 patches x 384): the 8 largest such fusions
    held 0.3 s of 3 s of op time per step. Elsewhere (GPU, TPU) the gradient passes unchanged: their fusion
    heuristics differ and a conditional may cost a GPU a host round trip. Values are the identity's everywhere.
    """
    return x


@gradient_barrier.defjvp
def _barrier_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]) -> tuple[jax.Array, jax.Array]:
    (x,), (t,) = primals, tangents
    if target_platform() != "cpu" or x.size == 0:
        return x, t
    first = x.reshape(-1)[0]
    # both branches are the identity; XLA keeps the conditional because it cannot know the predicate
    return x, jax.lax.cond(first == first, lambda a: a, lambda a: a * 1, t)


@functools.lru_cache(maxsize=None)
def named_input(cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of block class ``cls`` whose first argument (the residual stream) is named
    :data:`BLOCK_INPUT` (``jax.ad_checkpoint.checkpoint_name``) before every use, so a remat policy can save
    or offload exactly that array; values are unchanged."""

    class Named(cls):
        def __call__(self, h, *args, **kwargs):
            return super().__call__(checkpoint_name(h, BLOCK_INPUT), *args, **kwargs)

    Named.__name__ = Named.__qualname__ = f"Named{cls.__name__}"
    return Named


def remat_block(cls: type[nn.Module], policy: str, *, scanned: bool = False) -> type[nn.Module]:
    """``cls`` rematerialised by the named policy (``cls`` itself for ``"none"``); for ``"full_offload"``
    its input named first (:func:`named_input`).

    ``scanned``: the block is the body of a scan, where XLA cannot merge the recomputation with the forward
    pass anyway, so common-subexpression prevention is off (``prevent_cse=False``) and costs nothing."""
    if check_remat_policy(policy) == "none":
        return cls
    if policy == "full_offload":
        cls = named_input(cls)
    return nn.remat(cls, policy=checkpoint_policy(policy), prevent_cse=not scanned)


def scan_block(cls: type[nn.Module], length: int, in_axes: Any) -> type[nn.Module]:
    """``nn.scan`` of a block class over ``length`` layers, parameters stacked on a leading axis.

    ``cls.__call__(carry, *args) -> (carry, y)``; ``in_axes`` per positional ``arg``: ``0`` for a
    per-layer input (a stacked KV cache), ``nn.broadcast`` for one shared by every layer (cos/sin, mask).
    Every parameter gets a leading ``[length]`` axis, named :data:`LAYER_AXIS` in its logical partitioning;
    the ``y`` of all layers come back stacked ``[length, ...]``. Each layer initialises from its own key.
    """
    return nn.scan(cls, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=in_axes,
                   length=length, metadata_params={nn.PARTITION_NAME: LAYER_AXIS})


# ----------------------------------------------------------------------------- backward pass in place
IN_PLACE_POLICIES = ("full", "full_offload")  # the remat policies a stack with gradients in place follows


def scan_grads_in_place(layer: Callable[[Any, jax.Array, Any], jax.Array], stacked: Any, h: jax.Array,
                        inputs: Any = None, *, offload: bool = False) -> jax.Array:
    """``h`` through a stack of identical layers, ``h = layer(stacked[i], h, inputs)`` for ``i = 0 .. N-1``,
    whose backward pass writes each layer's parameter gradients over that layer's slice of ``stacked``.

    ``stacked`` is a tree whose leaves are ``[N, ...]`` (the parameters of a scanned group); ``inputs`` a tree
    shared by every layer (cos/sin, the mask; Python scalars in it stay static). The values and every gradient
    equal those of scanning ``jax.checkpoint(layer)`` over the stack (``remat_policy="full"``): the forward
    pass keeps only each layer's input ``h`` (with ``offload``, in pinned host memory: ``"full_offload"``),
    and the backward pass walks the layers from the last, recomputes layer ``i`` from its input, and takes
    its vector-Jacobian product.

    What differs is where the gradients live. Differentiating a scan gives the stacked parameters' gradients
    a buffer of their own, allocated as the backward loop starts, while the loop still reads every layer's
    weights from theirs: two weight-sized arrays live at once. Here the loop carries the weights' buffer
    itself and replaces slice ``i`` by its gradient once layer ``i`` is done (an in-place dynamic update of
    the loop's carry), so the gradients take no memory of their own. It pays where that buffer is a
    temporary of the step: the bfloat16 copy the train step differentiates with
    ``optim.grad_dtype="bfloat16"`` (:func:`vjax.train.optim.grad_inputs`). Compiled for v5p-8, the
    Llama-2-7B step at 4 x 16,384 tokens (``experiments.plan``) needs 7.75 GiB of temporaries per chip with it
    (and the elementwise finite guard and the MLP in pieces), 11.8 without (docs/scale.md).

    Leaves that are not differentiated (frozen parameters, integer inputs) get no gradient and no buffer:
    the rule sees which inputs are perturbed (``symbolic_zeros``). Float ``inputs`` that are differentiated
    get the sum of every layer's cotangent.

    >>> import jax.numpy as jnp
    >>> ws = jnp.stack([jnp.eye(2), 2 * jnp.eye(2)])
    >>> f = lambda w, x: scan_grads_in_place(lambda p, h, _: jnp.tanh(h @ p), w, x).sum()
    >>> g = jax.grad(f)(ws, jnp.ones((1, 2)))
    >>> ref = jax.grad(lambda w, x: jax.lax.scan(lambda h, p: (jnp.tanh(h @ p), None), x, w)[0].sum())(
    ...     ws, jnp.ones((1, 2)))
    >>> bool(jnp.allclose(g, ref, atol=1e-6))
    True
    """
    leaves, treedef = jax.tree_util.tree_flatten(inputs)
    dynamic = [isinstance(x, (jax.Array, np.ndarray)) for x in leaves]

    def apply(p: Any, x: jax.Array, dyn: Sequence[Any]) -> jax.Array:
        return layer(p, x, jax.tree_util.tree_unflatten(treedef, _splice(dynamic, dyn, leaves)))

    def run(params: Any, x: jax.Array, dyn: Sequence[Any]) -> jax.Array:
        return jax.lax.scan(lambda c, p: (apply(p, c, dyn), None), x, params)[0]

    seen: dict[str, Any] = {}  # what the forward rule learnt about its inputs, for the backward rule

    def fwd(params, x, dyn):
        seen.update(params=_primal(params, "perturbed"), x=x.perturbed, dyn=_primal(list(dyn), "perturbed"))
        params, x, dyn = _primal(params, "value"), x.value, _primal(list(dyn), "value")

        def body(c, p):
            kept = jax.device_put(c, jax.memory.Space.Host) if offload else c
            return apply(p, c, dyn), kept

        out, saved = jax.lax.scan(body, x, params)
        return out, (params, saved, dyn)

    def bwd(res, g):
        params, saved, dyn = res
        if isinstance(g, jax.custom_derivatives.SymbolicZero):
            g = jnp.zeros(g.shape, g.dtype)
        flat, ptree = jax.tree_util.tree_flatten(params)
        trained = jax.tree_util.tree_leaves(seen["params"])
        n = flat[0].shape[0]
        # differentiated inputs: floating and perturbed (integer leaves and constants get no cotangent)
        wants = [bool(w) and jnp.issubdtype(jnp.asarray(a).dtype, jnp.inexact) for a, w in zip(dyn, seen["dyn"])]

        def body(k, carry):
            dh, grads, sums = carry
            i = n - 1 - k
            take = functools.partial(jax.lax.dynamic_index_in_dim, index=i, keepdims=False)
            x = take(saved)
            if offload:
                x = jax.device_put(x, jax.memory.Space.Device)
            layer_p = [take(a) for a in _splice(trained, grads, flat)]  # layer i's weights: still in the carry

            def f(tp, xx, td):
                return apply(jax.tree_util.tree_unflatten(ptree, _splice(trained, tp, layer_p)), xx,
                             _splice(wants, td, dyn))

            _, vjp = jax.vjp(f, _pick(trained, layer_p), x, _pick(wants, dyn))
            dp, dh, dd = vjp(dh)
            grads = [jax.lax.dynamic_update_index_in_dim(buf, d.astype(buf.dtype), i, 0)
                     for buf, d in zip(grads, dp)]
            return dh, grads, [s + d.astype(s.dtype) for s, d in zip(sums, dd)]

        grads0 = _pick(trained, flat)  # the weights' own buffers, overwritten layer by layer
        sums0 = [jnp.zeros_like(a) for a in _pick(wants, dyn)]
        dh, grads, sums = jax.lax.fori_loop(0, n, body, (g, grads0, sums0))
        dparams = jax.tree_util.tree_unflatten(ptree, _splice(trained, grads, [None] * len(flat)))
        return dparams, dh if seen["x"] else None, _splice(wants, sums, [None] * len(dyn))

    stack = jax.custom_vjp(run)
    stack.defvjp(fwd, bwd, symbolic_zeros=True)
    return stack(stacked, h, _pick(dynamic, leaves))


def _pick(mask: Sequence[bool], xs: Sequence[Any]) -> list[Any]:
    """The ``xs`` whose ``mask`` is true, in order."""
    return [x for x, m in zip(xs, mask) if m]


def _splice(mask: Sequence[bool], chosen: Sequence[Any], rest: Sequence[Any]) -> list[Any]:
    """``rest`` with the places where ``mask`` is true taken, in order, from ``chosen`` (the inverse of
    :func:`_pick`)."""
    it = iter(chosen)
    return [next(it) if m else x for x, m in zip(rest, mask)]


def _primal(tree: Any, field: str) -> Any:
    """``value`` or ``perturbed`` of every ``CustomVJPPrimal`` in ``tree`` (a ``symbolic_zeros`` forward rule's
    arguments)."""
    return jax.tree_util.tree_map(lambda a: getattr(a, field), tree,
                                  is_leaf=lambda a: isinstance(a, jax.custom_derivatives.CustomVJPPrimal))


# ----------------------------------------------------------------------------- stacked <-> unrolled trees
def _same_form(flat: dict[str, Any], like: Mapping[str, Any]) -> Any:
    """``flat`` nested again when the input was nested (``like``), else flat."""
    nested = any(isinstance(v, Mapping) for v in like.values()) or not all("/" in k for k in like)
    return unflatten_params(flat) if nested else flat


def _stack(leaves: Sequence[Any]) -> Any:
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
        return jax.ShapeDtypeStruct((len(leaves),) + tuple(leaves[0].shape), leaves[0].dtype)
    if all(isinstance(x, np.ndarray) for x in leaves):
        return np.stack(leaves)
    return jax.numpy.stack(leaves)


def _index(x: Any, i: int) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype)
    return x[i]


def stack_layers(params: Mapping[str, Any], prefix: str, n: int) -> Any:
    """The tree with ``<prefix>_0 .. <prefix>_{n-1}`` replaced by ``<prefix>`` holding their leaves stacked
    on a new leading axis. ``prefix`` is a ``/`` path (``"llm/layers"``); ``params`` nested or flat
    (``{"a/b": x}``), returned in the same form. A missing or extra layer is a ``ValueError`` naming it.

    >>> import numpy as np
    >>> p = {"layers_0": {"w": np.zeros(2)}, "layers_1": {"w": np.ones(2)}, "norm": np.ones(2)}
    >>> s = stack_layers(p, "layers", 2)
    >>> sorted(s), s["layers"]["w"].tolist()
    (['layers', 'norm'], [[0.0, 0.0], [1.0, 1.0]])
    """
    flat = flatten_params(params)
    rx = re.compile(re.escape(prefix) + r"_(\d+)/(.+)")
    per_layer: dict[str, dict[int, Any]] = {}
    out = {}
    for path, v in flat.items():
        m = rx.fullmatch(path)
        if m is None:
            out[path] = v
            continue
        per_layer.setdefault(m.group(2), {})[int(m.group(1))] = v
    if not per_layer:
        raise ValueError(f"no {prefix}_<i> sub-trees to stack")
    for rest, layers in per_layer.items():
        if sorted(layers) != list(range(n)):
            raise ValueError(f"{prefix}_<i>/{rest}: found layers {sorted(layers)}, expected 0..{n - 1}")
        out[f"{prefix}/{rest}"] = _stack([layers[i] for i in range(n)])
    return _same_form(out, params)


def unstack_layers(params: Mapping[str, Any], prefix: str) -> Any:
    """Inverse of :func:`stack_layers`: ``<prefix>`` (leaves ``[N, ...]``) back to ``<prefix>_0 .. _{N-1}``.

    >>> import numpy as np
    >>> u = unstack_layers({"blocks": {"w": np.arange(4.0).reshape(2, 2)}}, "blocks")
    >>> sorted(u), u["blocks_1"]["w"].tolist()
    (['blocks_0', 'blocks_1'], [2.0, 3.0])
    """
    flat = flatten_params(params)
    out = {}
    head = prefix + "/"
    found = False
    for path, v in flat.items():
        if not path.startswith(head):
            out[path] = v
            continue
        found = True
        for i in range(v.shape[0]):
            out[f"{prefix}_{i}/{path[len(head):]}"] = _index(v, i)
    if not found:
        raise ValueError(f"no stacked sub-tree {prefix!r} to unstack")
    return _same_form(out, params)


def scanned_groups(params: Mapping[str, Any]) -> list[tuple[str, int]]:
    """``(path, N)`` of every scanned group in a tree: a sub-tree named one of :data:`SCAN_GROUPS` (its
    leaves ``[N, ...]``). An unrolled tree has none.

    >>> import numpy as np
    >>> scanned_groups({"llm": {"layers": {"w": np.zeros((3, 2))}}, "vision": {"blocks_0": {"w": np.zeros(2)}}})
    [('llm/layers', 3)]
    """
    groups: dict[str, int] = {}
    for path, v in flatten_params(params).items():
        parts = path.split("/")
        for j, p in enumerate(parts[:-1]):
            if p in SCAN_GROUPS:
                groups.setdefault("/".join(parts[:j + 1]), int(v.shape[0]))
                break
    return sorted(groups.items())


def unstack_all(params: Mapping[str, Any]) -> Any:
    """Every scanned group of ``params`` unrolled (the tree unchanged when it has none)."""
    for prefix, _ in scanned_groups(params):
        params = unstack_layers(params, prefix)
    return params


def stack_like(params: Mapping[str, Any], like: Mapping[str, Any]) -> Any:
    """Unrolled ``params`` stacked wherever the tree ``like`` (e.g. a scanned model's abstract params) has a
    scanned group; unchanged where ``like`` has none."""
    for prefix, n in scanned_groups(like):
        params = stack_layers(params, prefix, n)
    return params
