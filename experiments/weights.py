r"""Weight memory of recipes' models in bf16 and int8: ``python -m experiments.weights --config=qwen2_vl:7b[,...]``.

    --config=NAME[:VARIANT],...   experiment configs, as ``experiments.train`` names them

For each recipe the parameter tree is built with ``jax.eval_shape`` (no weights are read or allocated) and
printed as one Markdown row: parameters, bytes in bfloat16, bytes after ``--quantize=int8``
(:func:`vjax.layers.quant.quantize_params`: int8 Dense kernels and embedding tables with float32 per-channel
scales, every other leaf in bf16), their ratio, and how many parameters stay in float. An unknown config is
one line and exit code 2.
"""

from __future__ import annotations

from typing import Any

from absl import flags

from experiments import cli, config

FLAGS = flags.FLAGS


def weight_memory(spec: str) -> dict[str, Any]:
    """``{"config", "parameters", "bf16", "int8", "float_left"}`` (bytes; parameters left in float) of one recipe."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from vjax.layers.quant import param_bytes, quantize_params  # noqa: PLC0415
    from vjax.pretrained import abstract_params  # noqa: PLC0415
    from vjax.pytree import flatten_params  # noqa: PLC0415

    path, _, variant = config.config_path(spec)
    model, mcfg = config.model_config(config.config_from_file(path, variant))
    params = abstract_params(model.module(mcfg))
    quantized = jax.eval_shape(quantize_params, params)
    left = sum(int(np.prod(v.shape)) for k, v in flatten_params(quantized).items()
               if v.dtype != jnp.int8 and not k.endswith("_scale"))
    count = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(params))
    return {"config": spec, "parameters": count, "bf16": param_bytes(params, jnp.bfloat16),
            "int8": param_bytes(quantized, jnp.bfloat16), "float_left": left}


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of :func:`weight_memory` rows."""
    def size(n: int) -> str:
        return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"

    lines = ["| config | parameters | bf16 | int8 + scales | int8 / bf16 | parameters left in bf16 |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['config']}` | {r['parameters']:,} | {size(r['bf16'])} | {size(r['int8'])} | "
                     f"{r['int8'] / r['bf16']:.3f} | {r['float_left']:,} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}")
    if not FLAGS.config:
        cli.fail("--config is required, e.g. --config=qwen2_vl:7b,chat_univi:7b")
    rows = []
    for spec in FLAGS.config.split(","):
        try:
            rows.append(weight_memory(spec.strip()))
        except (config.ConfigError, ValueError, KeyError, FileNotFoundError) as err:
            cli.fail(f"--config {spec!r}: {err}")
    print(table(rows), flush=True)
    return 0


if __name__ == "__main__":
    flags.DEFINE_string("config", None, "comma-separated experiment configs NAME[:VARIANT]")
    cli.run(main)
