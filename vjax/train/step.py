"""Train state, its shardings, and the jit-compiled train/eval steps shared by every model.

A model plugs in through one Flax method, ``loss(batch) -> (loss, metrics)``; the batch is a dict of
arrays whose leading axis is the batch (sharded over ``data`` x ``fsdp``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vjax.train import optim
from vjax.train.sharding import RULES, batch_sharding, logical_shardings


@flax.struct.dataclass
class TrainState:
    """``step`` (int32), ``params`` (full tree), ``opt_state`` (trainable subtree only), ``rng``
    (raw ``uint32`` key data, so Orbax can store it)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def _example_batch(module: nn.Module) -> dict[str, jax.Array]:
    if not hasattr(module, "example_batch"):
        raise TypeError(f"{type(module).__name__} has no example_batch(); vjax models define one")
    return module.example_batch()


@dataclasses.dataclass
class Trainer:
    """Compiles and runs the steps of one model on one mesh.

    Args:
      module: a vjax model with ``loss`` and ``example_batch`` methods.
      optim_config: optimizer hyper-parameters.
      mesh: the device mesh (see :func:`vjax.train.sharding.make_mesh`).
      trainable: regexes of the parameter paths that train in this stage (None: all).
      rules: logical-axis rules.
    """

    module: nn.Module
    optim_config: optim.OptimConfig
    mesh: Mesh
    trainable: Sequence[str] | None = None
    rules: Sequence[tuple[str, Any]] = RULES

    def __post_init__(self):
        self.clip_outside = optim.clips_outside(self.optim_config)
        self.tx = optim.make_optimizer(self.optim_config, clip=not self.clip_outside)
        example = _example_batch(self.module)
        boxed = jax.eval_shape(lambda: self.module.init(jax.random.key(0), example, method="loss"))["params"]
        self.param_shardings = logical_shardings(boxed, self.mesh, self.rules)
        abstract = nn.meta.unbox(boxed)
        self.mask = optim.trainable_mask(abstract, self.trainable)
        tr_abs, _ = optim.split_trainable(abstract, self.mask)
        tr_shard, _ = optim.split_trainable(self.param_shardings, self.mask)
        opt_abs = jax.eval_shape(self.tx.init, tr_abs)
        replicated = NamedSharding(self.mesh, P())
        opt_shard = optax.tree_map_params(self.tx, lambda _, s: s, opt_abs, tr_shard,
                                          transform_non_params=lambda _: replicated)
        self.state_shardings = TrainState(step=replicated, params=self.param_shardings,
                                          opt_state=opt_shard, rng=replicated)
        self.abstract_state = TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract, opt_state=opt_abs,
            rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
        self._init = jax.jit(self._init_impl, out_shardings=self.state_shardings)
        self._train_step = jax.jit(self._train_impl, donate_argnums=(0,),
                                   out_shardings=(self.state_shardings, replicated))
        self._eval_step = jax.jit(self._eval_impl, out_shardings=replicated)

    # ------------------------------------------------------------------ state
    def scope(self) -> contextlib.ExitStack:
        """The mesh and the logical-axis rules, active while the steps trace, so that the models'
        activation constraints (:func:`vjax.layers.partitioning.constrain`) apply."""
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    def init_state(self, seed: int = 0, params: Any | None = None) -> TrainState:
        """Fresh state: random init (or the given params, e.g. converted weights) sharded on the mesh."""
        if params is not None:
            params = jax.device_put(params, self.param_shardings)
        with self.scope():
            return self._init(jax.random.key_data(jax.random.key(seed)), params)

    def _init_impl(self, key_data, params):
        key = jax.random.wrap_key_data(key_data)
        init_key, key = jax.random.split(key)
        if params is None:
            params = nn.meta.unbox(self.module.init(init_key, _example_batch(self.module), method="loss"))["params"]
        trainable, _ = optim.split_trainable(params, self.mask)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(trainable),
                          rng=jax.random.key_data(key))

    # ------------------------------------------------------------------ steps
    def _loss(self, params, batch, rng):
        merge = jax.random.fold_in(rng, 1)  # Chat-UniVi's density noise when merge_noise="release"
        return self.module.apply({"params": params}, batch, method="loss", rngs={"dropout": rng, "merge": merge})

    def _train_impl(self, state: TrainState, batch: Mapping[str, jax.Array]):
        key, sub = jax.random.split(jax.random.wrap_key_data(state.rng))
        trainable, frozen = optim.split_trainable(state.params, self.mask)

        def loss_fn(tp):
            return self._loss(optim.merge_trainable(tp, frozen), batch, sub)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            optim.grad_inputs(trainable, self.optim_config.grad_dtype))
        grads = optim.to_params(grads, trainable)
        grad_norm = optax.tree.norm(grads)  # computed once: reported, checked, and clipped with
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(_):
            g = optim.clip_by_norm(grads, grad_norm, self.optim_config.grad_clip) if self.clip_outside else grads
            updates, opt_state = self.tx.update(g, state.opt_state, trainable)
            return optax.apply_updates(trainable, updates), opt_state

        # A non-finite step keeps the state. "branch": one conditional, which skips the update's work (on CPU,
        # cheaper than a select over every leaf of params and moments); "select": the update always, each value
        # chosen elementwise inside the update's own fusion, so XLA writes it over the donated state: the
        # conditional's outputs are buffers of their own (Llama-2-7B at 16k tokens with gradients in place on
        # v5p-8: 1.3 GiB more temporaries per chip with the branch).
        if self.optim_config.finite_guard == "select":
            new_trainable, opt_state = jax.tree_util.tree_map(
                lambda n, o: jnp.where(ok, n, o), update(None), (trainable, state.opt_state))
        else:
            new_trainable, opt_state = jax.lax.cond(ok, update, lambda _: (trainable, state.opt_state), None)
        params = optim.merge_trainable(new_trainable, frozen)
        new_state = TrainState(step=state.step + ok.astype(jnp.int32), params=params,
                               opt_state=opt_state, rng=jax.random.key_data(key))
        lr = optim.schedule(self.optim_config)(state.step // max(1, self.optim_config.grad_accum))
        return new_state, {**metrics, "grad_norm": grad_norm, "finite": ok, "learning_rate": lr}

    def _eval_impl(self, params, batch):
        return self._loss(params, batch, jax.random.key(0))[1]

    def train_step(self, state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict]:
        """One optimizer (micro-)step. A non-finite loss or gradient leaves the state unchanged and
        reports ``metrics["finite"] == False``."""
        batch = self.put_batch(batch)
        with self.scope():
            return self._train_step(state, batch)

    def eval_step(self, params, batch) -> dict:
        batch = self.put_batch(batch)
        with self.scope():
            return self._eval_step(params, batch)

    def put_batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """Host (this process's rows) -> global arrays sharded over the batch axes."""
        out = {}
        for k, v in batch.items():
            if isinstance(v, jax.Array) and getattr(v, "committed", False) and v.sharding.device_set == set(self.mesh.devices.flat):
                out[k] = v
                continue
            out[k] = jax.make_array_from_process_local_data(batch_sharding(self.mesh, jnp.ndim(v)), jax.device_get(v))
        return out
