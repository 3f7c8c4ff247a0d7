"""Every registered model declares itself in one spec that the rest of vjax reads: its conversion module
returns the layout of that name, its Hugging Face architectures resolve to it, and its format (template,
placeholders, counts) builds from the spec and any of its presets."""

from __future__ import annotations

import pytest

from vjax.convert import hf_entry, layout
from vjax.data import sampling
from vjax.data.formats import format_spec
from vjax.data.templates import RENDERERS
from vjax.models import registry


@pytest.mark.parametrize("name", registry.names())
def test_spec_is_complete_and_consistent(name):
    spec = registry.spec(name)
    cfg_cls, module_cls = registry.get(name)
    assert (spec.name, spec.config, spec.module) == (name, cfg_cls, module_cls)
    if spec.conversion:
        assert layout(name).model == name
    for arch in spec.hf_architectures:
        assert hf_entry({"architectures": [arch]}).model == name
    for mt in spec.hf_model_types:
        assert hf_entry({"architectures": ["SomethingElseForCausalLM"], "model_type": mt}).model == name
    if name == "decoder":  # the shared LLM: no prompt format of its own
        return
    assert spec.template in RENDERERS
    assert callable(getattr(sampling, spec.sampler))
    presets = [k for k, v in vars(cfg_cls).items() if isinstance(v, classmethod) and k not in ("from_hf",)]
    for preset in presets:
        config = getattr(cfg_cls, preset)()
        fmt = format_spec(spec, config, load_audio=True)
        # a clip of T real frames: as many placeholders as the config says it makes tokens
        assert fmt.tokens_per_clip(config.num_frames) == config.num_visual_tokens, preset
        assert set(spec.placeholder_ids(config)) == {pid for _, pid, _ in fmt.visual}


def test_generic_decoder_model_types_need_no_architecture():
    assert hf_entry({"model_type": "llama"}).model == "decoder"
    with pytest.raises(ValueError, match="unsupported architecture.*GPT2LMHeadModel"):
        hf_entry({"architectures": ["GPT2LMHeadModel"], "model_type": "llama"})
