"""vjax: composable functional JAX for video large language models.

Public entry points::

    module, params = vjax.from_pretrained("path/to/hf_or_vjax_dir")
    out = module.apply({"params": params}, input_ids=ids, attention_mask=mask)
    out.logits  # [B, L, vocab]
"""

__version__ = "0.1.0"


def __getattr__(name):  # lazy: importing vjax does not import the converters
    if name in ("from_pretrained", "save_pretrained", "export_hf", "init_params", "abstract_params"):
        from vjax import pretrained  # noqa: PLC0415

        return getattr(pretrained, name)
    raise AttributeError(f"module 'vjax' has no attribute {name!r}")
