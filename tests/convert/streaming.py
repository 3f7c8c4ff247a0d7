"""Peak host memory of ``experiments.convert`` on a generated sharded decoder checkpoint.

By hand (the issue's ~2 GB case; writes to a temp dir, prints one JSON line):

    python -m tests.convert.streaming --mb=2048 --shards=5

The conversion runs in a fresh subprocess. After the imports (jax, vjax, orbax) the kernel's high-water
mark is reset (``echo 5 > /proc/self/clear_refs``) after a warm-up save of a tiny model (so the
writer's library code pages count in the baseline, not as conversion memory); ``VmHWM`` after the conversion, minus ``VmRSS`` at
that point, is the memory the conversion itself added (``peak_growth``). ``peak_total`` is the raw VmHWM.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from vjax.convert.io import save_safetensors

ROOT = Path(__file__).resolve().parents[2]


def decoder_hf_config(target_mb: float) -> dict:
    """A LLaMA config.json whose float32 weights total about ``target_mb`` MiB (hidden 1024)."""
    h, f = 1024, 2816
    per_layer = 4 * h * h + 3 * h * f + 2 * h
    vocab = 8000 if target_mb < 800 else 32000
    layers = max(1, round((target_mb * 2**20 / 4 - 2 * vocab * h) / per_layer))
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=vocab, hidden_size=h,
                intermediate_size=f, num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
                rms_norm_eps=1e-6, max_position_embeddings=2048, tie_word_embeddings=False)


def write_sharded_checkpoint(d: Path, target_mb: float, shards: int) -> dict:
    """Random float32 LLaMA weights in ``shards`` safetensors files + index + config.json; one shard in memory."""
    cfg = decoder_hf_config(target_mb)
    h, f, v, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for i in range(n):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       **{p + f"self_attn.{x}_proj.weight": (h, h) for x in "qkvo"},
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    total = sum(4 * int(np.prod(s)) for s in shapes.values())
    budget = total / shards
    groups, size = [[]], 0
    for k, s in shapes.items():
        b = 4 * int(np.prod(s))
        if groups[-1] and size + b > budget * 1.02 and len(groups) < shards:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += b
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    weight_map, sizes = {}, []
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: (rng.random(shapes[k], dtype=np.float32) - 0.5) * 0.02 for k in keys}
        save_safetensors(tensors, d / name)
        del tensors
        sizes.append((d / name).stat().st_size)
        weight_map.update({k: name for k in keys})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                 "weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps(cfg))
    return {"total_bytes": total, "largest_shard": max(sizes), "shards": len(sizes)}


_MEASURE = r"""
import json, sys
import jax, jax.numpy as jnp, orbax.checkpoint, numpy
import vjax.pretrained, vjax.models.decoder, vjax.convert.decoder
from experiments.convert import run
jnp.zeros(1).block_until_ready()
import tempfile
from vjax.models.decoder import CausalLM, DecoderConfig
with tempfile.TemporaryDirectory() as warm:  # fault in the code pages of the writer (TensorStore) first
    tiny = CausalLM(DecoderConfig.tiny())
    vjax.pretrained.save_pretrained(warm, tiny, jax.tree_util.tree_map(numpy.asarray, vjax.pretrained.init_params(tiny)))
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
base = status("VmRSS")
run("decoder", [sys.argv[1]], sys.argv[2], progress=False)
print(json.dumps({"base_rss": base, "peak_total": status("VmHWM"), "peak_growth": status("VmHWM") - base}))
"""


def measure(src: Path, dst: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(src), str(dst)], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=3000)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["output_bytes"] = sum(f.stat().st_size for f in (dst / "params").rglob("*") if f.is_file())
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=2048)
    ap.add_argument("--shards", type=int, default=5)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        info = write_sharded_checkpoint(Path(tmp) / "src", args.mb, args.shards)
        res = {**info, **measure(Path(tmp) / "src", Path(tmp) / "dst")}
        res["bound"] = 1.5 * res["largest_shard"] + res["total_bytes"]
        res["ratio_growth_to_bound"] = res["peak_growth"] / res["bound"]
        print(json.dumps(res))


if __name__ == "__main__":
    main()
