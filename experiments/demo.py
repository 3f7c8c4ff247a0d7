"""A two-minute tour of what works today, on a CPU, offline.

    python -m experiments.demo [--workdir=/tmp/vjax_demo]

It builds a tiny LLaMA-family decoder, saves it as a vjax checkpoint, exports it to an HF-layout
directory (config.json + sharded safetensors) and loads that back with ``vjax.from_pretrained``,
then streams greedy tokens from a left-padded batch with the KV cache.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

import vjax
from experiments import cli
from vjax.generate import generate
from vjax.models.decoder import CausalLM, DecoderConfig

FLAGS = flags.DEFINE_string("workdir", "/tmp/vjax_demo", "where the demo writes its checkpoints")
_TOKENS = flags.DEFINE_integer("max_new_tokens", 16, "tokens to generate per row")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
    workdir = FLAGS.value
    module = CausalLM(DecoderConfig.tiny(arch="llama"))
    params = vjax.init_params(module, 0)
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"tiny decoder: {n:,} parameters on {jax.devices()[0].platform}")
    ckpt = vjax.save_pretrained(f"{workdir}/vjax_ckpt", module, params)
    hf_dir = vjax.export_hf(f"{workdir}/hf", module, params, max_shard_bytes=100_000)
    module2, params2 = vjax.from_pretrained(hf_dir)
    print(f"saved {ckpt}, exported {hf_dir}, reloaded {len(jax.tree_util.tree_leaves(params2))} tensors")

    ids = jnp.asarray(np.random.default_rng(0).integers(3, 256, (2, 8)), jnp.int32)
    mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8], jnp.int32)  # row 0 left-padded
    t0 = time.perf_counter()
    print("streaming:", end=" ")
    out = generate(module2, params2, ids, mask, max_new_tokens=_TOKENS.value,
                   stream=lambda t: print(np.asarray(t).tolist(), end=" ", flush=True))
    print(f"\ngenerated {out.tokens.shape} in {time.perf_counter() - t0:.1f}s (incl. compile)")
    again = generate(module, params, ids, mask, max_new_tokens=_TOKENS.value)
    same = bool((again.tokens == out.tokens).all())
    print("vjax checkpoint and HF round trip give the same tokens:", same)
    return 0 if same else 1


if __name__ == "__main__":
    cli.run(main)
