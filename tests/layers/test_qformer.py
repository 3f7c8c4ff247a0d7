"""Q-Former parity: transformers ``Blip2QFormerModel`` / ``InstructBlipQFormerModel`` (HF layout), the
official LAVIS/MA-LMM ``BertModel`` (golden vectors, LAVIS layout), export round trip, NNX bridge.
Tolerance: max |Δ| <= 1e-4 in float32, with padded encoder tokens and padded text masked."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from vjax.convert import ConversionError, convert, export
from vjax.convert.mapping import flatten_params, plan_conversion
from vjax.convert.qformer import qformer_hf_table, qformer_lavis_table
from vjax.layers.qformer import QFormer, QFormerConfig
from vjax.pretrained import abstract_params

from tests.layers.golden import DictSource, load_case, with_prefix

TOL = 1e-4
B, S, LT = 2, 7, 5
ENC_PAD = 3  # sample 1: last 3 encoder tokens are padding
TEXT_PAD = 2  # sample 1: last 2 text tokens are padding

# name -> (config kwargs, HF config class, HF model class)
CASES = {
    # BLIP-2 form, cross-attention every 2nd layer (Video-LLaMA's image Q-Former, shrunk)
    "blip2_freq2": (dict(hidden_size=64, num_layers=3, num_heads=4, intermediate_size=96, encoder_width=48,
                         cross_attention_freq=2, num_query_tokens=6),
                    transformers.Blip2QFormerConfig, transformers.Blip2QFormerModel),
    # Video-LLaMA's video/audio Q-Former form: 2 layers, cross-attention in every layer, encoder = hidden
    "blip2_freq1": (dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, encoder_width=32,
                         cross_attention_freq=1, num_query_tokens=4),
                    transformers.Blip2QFormerConfig, transformers.Blip2QFormerModel),
    # InstructBLIP form (MA-LMM without memory): queries + instruction text
    "instructblip": (dict(hidden_size=64, num_layers=4, num_heads=4, intermediate_size=128, encoder_width=40,
                          cross_attention_freq=2, num_query_tokens=8, text_input=True, vocab_size=60,
                          max_position_embeddings=24),
                     transformers.InstructBlipQFormerConfig, transformers.InstructBlipQFormerModel),
}


def hf_qformer(name: str, seed: int = 0):
    kw, cfg_cls, model_cls = CASES[name]
    cfg = cfg_cls(hidden_size=kw["hidden_size"], num_hidden_layers=kw["num_layers"],
                  num_attention_heads=kw["num_heads"], intermediate_size=kw["intermediate_size"],
                  encoder_hidden_size=kw["encoder_width"], cross_attention_frequency=kw["cross_attention_freq"],
                  vocab_size=kw.get("vocab_size", 30522),
                  max_position_embeddings=kw.get("max_position_embeddings", 512))
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases so that every parameter matters
        for pname, p in model.named_parameters():
            if "LayerNorm.weight" in pname or "layernorm.weight" in pname:
                p.add_(0.1 * torch.randn_like(p))
            elif pname.endswith(".bias"):
                p.copy_(0.05 * torch.randn_like(p))
    queries = torch.randn(1, kw["num_query_tokens"], kw["hidden_size"])
    return model, queries, QFormerConfig(**kw)


def inputs(config: QFormerConfig, seed: int = 1):
    rng = np.random.default_rng(seed)
    enc = rng.normal(size=(B, S, config.encoder_width)).astype(np.float32)
    enc_mask = np.ones((B, S), np.int64)
    enc_mask[1, S - ENC_PAD:] = 0
    enc[1, S - ENC_PAD:] = 100.0  # padding must not leak into the result
    ids = rng.integers(1, config.vocab_size, size=(B, LT)).astype(np.int64)
    text_mask = np.ones((B, LT), np.int64)
    text_mask[1, LT - TEXT_PAD:] = 0
    ids[1, LT - TEXT_PAD:] = 0
    return enc, enc_mask, ids, text_mask


def reference(model, queries, config, enc, enc_mask, ids, text_mask):
    with torch.no_grad():
        if config.text_input:
            full_mask = np.concatenate([np.ones((B, config.num_query_tokens), np.int64), text_mask], axis=1)
            out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(full_mask),
                        query_embeds=queries.expand(B, -1, -1), encoder_hidden_states=torch.tensor(enc),
                        encoder_attention_mask=torch.tensor(enc_mask))
        else:
            out = model(query_embeds=queries.expand(B, -1, -1), encoder_hidden_states=torch.tensor(enc),
                        encoder_attention_mask=torch.tensor(enc_mask))
    return out.last_hidden_state.numpy()


def hf_state(model, queries) -> dict[str, np.ndarray]:
    sd = {f"qformer.{k}": v.numpy() for k, v in model.state_dict().items()}
    sd["query_tokens"] = queries.numpy()
    return sd


def run(module, params, config, enc, enc_mask, ids, text_mask):
    kw = dict(input_ids=jnp.asarray(ids), text_mask=jnp.asarray(text_mask)) if config.text_input else {}
    return np.asarray(jax.jit(module.apply)({"params": params}, jnp.asarray(enc), jnp.asarray(enc_mask), **kw))


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_transformers(name):
    model, queries, config = hf_qformer(name)
    module = QFormer(config)
    params = convert(DictSource(hf_state(model, queries)), qformer_hf_table(config), abstract_params(module))
    enc, enc_mask, ids, text_mask = inputs(config)
    ref = reference(model, queries, config, enc, enc_mask, ids, text_mask)
    out = run(module, params, config, enc, enc_mask, ids, text_mask)
    assert out.shape == ref.shape == (B, config.num_query_tokens + (LT if config.text_input else 0), config.hidden_size)
    err = np.abs(out - ref).max()
    print(f"{name}: max |Δ last_hidden_state| = {err:.2e}")
    assert err <= TOL
    # the mask matters: unmasking the padded encoder tokens changes sample 1 only
    unmasked = run(module, params, config, enc, np.ones_like(enc_mask), ids, text_mask)
    assert np.abs(unmasked[1] - out[1]).max() > 1e-2 and np.abs(unmasked[0] - out[0]).max() <= 1e-6


@pytest.mark.parametrize("name", ["blip2_freq2", "instructblip"])
def test_export_round_trip_loads_into_transformers(name):
    model, queries, config = hf_qformer(name)
    module = QFormer(config)
    params = convert(DictSource(hf_state(model, queries)), qformer_hf_table(config), abstract_params(module))
    exported = dict(export(params, qformer_hf_table(config)))
    assert np.array_equal(exported.pop("query_tokens"), queries.numpy())
    fresh = hf_qformer(name, seed=5)[0]
    missing, unexpected = fresh.load_state_dict({k[len("qformer."):]: torch.tensor(v) for k, v in exported.items()},
                                                strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    enc, enc_mask, ids, text_mask = inputs(config, seed=3)
    a = reference(model, queries, config, enc, enc_mask, ids, text_mask)
    b = reference(fresh, queries, config, enc, enc_mask, ids, text_mask)
    np.testing.assert_array_equal(a, b)


def test_conversion_names_missing_and_mismatched_tensors():
    model, queries, config = hf_qformer("blip2_freq2")
    sd = hf_state(model, queries)
    del sd["qformer.encoder.layer.2.crossattention.attention.key.weight"]
    with pytest.raises(ConversionError, match=r"encoder\.layer\.2\.crossattention\.attention\.key\.weight"):
        convert(DictSource(sd), qformer_hf_table(config), abstract_params(QFormer(config)))
    wrong = config.replace(encoder_width=40)  # a checkpoint for another vision tower
    with pytest.raises(ConversionError, match="shape mismatches"):
        convert(DictSource(hf_state(model, queries)), qformer_hf_table(wrong), abstract_params(QFormer(wrong)))


# ---------------------------------------------------------------------------------------------------
# LAVIS layout: the official MA-LMM BertModel. Frame 0 of its frame loop has empty memory banks, so its
# output is the plain (InstructBLIP / BLIP-2) Q-Former on frame_embeds[:, 0] + image_pe[0].


@pytest.mark.parametrize("case", ["qformer_text", "qformer_notext"])
def test_lavis_layout_matches_official_first_frame(case):
    t, meta = load_case("ma_lmm_memory", case)
    c = meta["config"]
    config = QFormerConfig(hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
                           num_heads=c["num_attention_heads"], intermediate_size=c["intermediate_size"],
                           encoder_width=c["encoder_width"], cross_attention_freq=c["cross_attention_freq"],
                           num_query_tokens=c["num_query_tokens"], text_input=meta["with_text"],
                           vocab_size=c["vocab_size"], max_position_embeddings=c["max_position_embeddings"])
    module = QFormer(config)
    sd = {k: v for k, v in with_prefix(t, "param/").items() if k != "image_pe.weight"}  # MA-LMM's, not the Q-Former's
    params = convert(DictSource(sd), qformer_lavis_table(config), abstract_params(module))
    enc = t["in/frame_embeds"][:, 0] + t["param/image_pe.weight"][0]
    kw = {}
    if meta["with_text"]:
        kw = dict(input_ids=jnp.asarray(t["in/input_ids"]), text_mask=jnp.asarray(t["in/text_attention_mask"]))
    out = np.asarray(module.apply({"params": params}, jnp.asarray(enc), **kw))
    ref = t["out/step0/last_hidden_state"].astype(np.float32)
    err = np.abs(out - ref).max()
    print(f"{case}: max |Δ| = {err:.2e}")
    assert err <= TOL


def test_lavis_table_drops_text_parts_for_query_only_config():
    """A BLIP-2 pre-training checkpoint holds text parts; the query-only Q-Former loads it strictly."""
    t, meta = load_case("ma_lmm_memory", "qformer_text")
    c = meta["config"]
    config = QFormerConfig(hidden_size=64, num_layers=c["num_hidden_layers"], num_heads=4, intermediate_size=128,
                           encoder_width=48, num_query_tokens=8)
    sd = {k: v for k, v in with_prefix(t, "param/").items() if k != "image_pe.weight"}
    sd["Qformer.cls.predictions.bias"] = np.zeros(c["vocab_size"], np.float32)
    params = convert(DictSource(sd), qformer_lavis_table(config), abstract_params(QFormer(config)))
    assert "text_mlp" not in params["layers_0"] and "word_embeddings" not in params


def test_abstract_params_have_logical_axes_and_example_inputs():
    for cfg in (QFormerConfig.tiny(), QFormerConfig.tiny(text_input=True, vocab_size=30)):
        boxed = jax.eval_shape(lambda: QFormer(cfg).init(jax.random.key(0), **QFormer(cfg).example_inputs()))
        leaves = jax.tree_util.tree_leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
        assert leaves and all(isinstance(x, nn.LogicallyPartitioned) and len(x.names) == x.value.ndim for x in leaves)


@pytest.mark.parametrize("variant", ["blip2", "instructblip", "video_llama_video", "video_llama_audio"])
def test_published_sizes_match_transformers_meta_model(variant):
    """Every published configuration has exactly the parameters of the transformers model (+ query tokens)."""
    config = getattr(QFormerConfig, variant)()
    cls = transformers.InstructBlipQFormerModel if config.text_input else transformers.Blip2QFormerModel
    cfg_cls = transformers.InstructBlipQFormerConfig if config.text_input else transformers.Blip2QFormerConfig
    hf_cfg = cfg_cls(hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
                     num_attention_heads=config.num_heads, intermediate_size=config.intermediate_size,
                     encoder_hidden_size=config.encoder_width, cross_attention_frequency=config.cross_attention_freq,
                     vocab_size=config.vocab_size)
    with torch.device("meta"):
        hf = cls(hf_cfg)
    names_shapes = {f"qformer.{k}": tuple(v.shape) for k, v in hf.state_dict().items()}
    names_shapes["query_tokens"] = (1, config.num_query_tokens, config.hidden_size)
    expected = {k: tuple(v.shape) for k, v in flatten_params(abstract_params(QFormer(config))).items()}
    plan = plan_conversion(names_shapes, qformer_hf_table(config), expected)
    assert not (plan.missing or plan.unexpected or plan.mismatched), plan
    assert sum(int(np.prod(s)) for s in expected.values()) == sum(
        int(np.prod(s)) for k, s in names_shapes.items() if not k.endswith("position_ids"))


@pytest.mark.parametrize("text", [False, True])
def test_nnx_bridge(text):
    cfg = QFormerConfig.tiny(text_input=text, vocab_size=30, num_layers=2)
    rng = np.random.default_rng(0)
    kw = dict(encoder_hidden_states=jnp.asarray(rng.normal(size=(2, 5, 48)), jnp.float32),
              encoder_mask=jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))
    if text:
        kw.update(input_ids=jnp.array([[3, 4, 5], [6, 7, 0]]), text_mask=jnp.array([[1, 1, 1], [1, 1, 0]]))
    with nnx.use_eager_sharding(False):
        bridged = nnx.bridge.ToNNX(QFormer(cfg), rngs=nnx.Rngs(0))
        nnx.bridge.lazy_init(bridged, **kw)
    out_nnx = bridged(**kw)
    params = nn.meta.unbox(nnx.to_pure_dict(nnx.state(bridged, nnx.Param)))
    out_linen = QFormer(cfg).apply({"params": params}, **kw)
    np.testing.assert_allclose(out_nnx, out_linen, atol=1e-6)
