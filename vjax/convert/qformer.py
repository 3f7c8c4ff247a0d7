"""Weight layouts of the Q-Former: transformers (BLIP-2 / InstructBLIP) and LAVIS (Video-LLaMA, MA-LMM).

Both layouts name the same BERT blocks (spec_qformer_family.md §1.3, §5):

    vjax                                  transformers (``qformer.``)               LAVIS (``Qformer.bert.``)
    query_tokens                          query_tokens                              query_tokens
    embed_norm                            layernorm | embeddings.layernorm (*)      embeddings.LayerNorm
    word_embeddings, position_embeddings  embeddings.{word,position}_embeddings     (same)
    layers_i/self_attn/{q,k,v}_proj       encoder.layer.i.attention.attention.{query,key,value}
                                                                                    encoder.layer.i.attention.self.{...}
    layers_i/self_attn/o_proj             encoder.layer.i.attention.output.dense
    layers_i/self_attn_norm               encoder.layer.i.attention.output.LayerNorm
    layers_i/cross_attn/...               encoder.layer.i.crossattention.{attention|self, output}...
    layers_i/query_mlp/{fc1,fc2}          encoder.layer.i.{intermediate_query.dense, output_query.dense}
    layers_i/query_mlp_norm               encoder.layer.i.output_query.LayerNorm
    layers_i/text_mlp/{fc1,fc2}           encoder.layer.i.{intermediate.dense, output.dense}
    layers_i/text_mlp_norm                encoder.layer.i.output.LayerNorm

(*) ``layernorm`` in ``Blip2QFormerModel``, ``embeddings.layernorm`` in ``InstructBlipQFormerModel``.
torch ``nn.Linear.weight [out, in]`` is transposed into a Dense kernel ``[in, out]`` (``"T"``).
"""

from __future__ import annotations

from vjax.convert.mapping import Rule, Skip
from vjax.layers.qformer import QFormerConfig

_ATTN = (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"))


def _linear(src: str, dst: str) -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}/kernel", "T"), Rule(f"{src}.bias", f"{dst}/bias")]


def _norm(src: str, dst: str) -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}/scale"), Rule(f"{src}.bias", f"{dst}/bias")]


def _layer_rules(config: QFormerConfig, p: str, d: str, attn_name: str) -> list[Rule | Skip]:
    """Rules of every block; ``attn_name`` is ``attention`` (transformers) or ``self`` (LAVIS)."""
    L, D = f"{p}encoder.layer.{{i}}.", f"{d}layers_{{i}}/"
    rules: list[Rule | Skip] = []
    for kind, dst in (("attention", "self_attn"), ("crossattention", "cross_attn")):
        for torch_name, proj in _ATTN:
            rules += _linear(f"{L}{kind}.{attn_name}.{torch_name}", f"{D}{dst}/{proj}")
        rules += _linear(f"{L}{kind}.output.dense", f"{D}{dst}/o_proj")
        rules += _norm(f"{L}{kind}.output.LayerNorm", f"{D}{dst}_norm")
    rules += _linear(f"{L}intermediate_query.dense", f"{D}query_mlp/fc1")
    rules += _linear(f"{L}output_query.dense", f"{D}query_mlp/fc2")
    rules += _norm(f"{L}output_query.LayerNorm", f"{D}query_mlp_norm")
    text = [*_linear(f"{L}intermediate.dense", f"{D}text_mlp/fc1"), *_linear(f"{L}output.dense", f"{D}text_mlp/fc2"),
            *_norm(f"{L}output.LayerNorm", f"{D}text_mlp_norm")]
    rules += text if config.text_input else [Skip(r.src) for r in text]
    return rules


def _text_embedding_rules(config: QFormerConfig, p: str, d: str) -> list[Rule | Skip]:
    rules = [Rule(f"{p}embeddings.word_embeddings.weight", f"{d}word_embeddings/embedding"),
             Rule(f"{p}embeddings.position_embeddings.weight", f"{d}position_embeddings/embedding")]
    if not config.text_input:  # a query-only Q-Former loaded from a checkpoint that was trained with text
        rules = [Skip(r.src) for r in rules]
    return rules + [Skip(f"{p}embeddings.position_ids")]


def qformer_hf_table(config: QFormerConfig, prefix: str = "qformer.", query_tokens: str = "query_tokens",
                     dst_prefix: str = "") -> list[Rule | Skip]:
    """Rules for transformers' ``Blip2*`` / ``InstructBlip*`` checkpoints (``qformer.*`` + ``query_tokens``).

    The embedding LayerNorm is ``qformer.layernorm`` (BLIP-2) or ``qformer.embeddings.layernorm``
    (InstructBLIP): both are accepted. ``prefix``/``dst_prefix`` place the Q-Former inside larger trees.

    >>> from vjax.convert.mapping import plan_conversion
    >>> cfg = QFormerConfig.tiny(num_layers=1)
    >>> plan = plan_conversion({"qformer.encoder.layer.0.attention.attention.query.weight": (64, 64)},
    ...                        qformer_hf_table(cfg), {"layers_0/self_attn/q_proj/kernel": (64, 64)})
    >>> plan.missing, plan.unexpected, plan.mismatched, len(plan.assignments)
    ([], [], [], 1)
    """
    p, d = prefix, dst_prefix
    rules: list[Rule | Skip] = [Rule(query_tokens, f"{d}query_tokens")]
    norms = [f"{p}layernorm", f"{p}embeddings.layernorm"]  # a checkpoint has one of the two
    if config.text_input:  # export writes the first: InstructBLIP's name for a text Q-Former
        norms.reverse()
    for name in norms:
        rules += _norm(name, f"{d}embed_norm")
    rules += _text_embedding_rules(config, p, d)
    rules += _layer_rules(config, p, d, "attention")
    return rules


def qformer_lavis_table(config: QFormerConfig, prefix: str = "Qformer.bert.", query_tokens: str = "query_tokens",
                        dst_prefix: str = "", image_pe: str | None = None) -> list[Rule | Skip]:
    """Rules for LAVIS checkpoints (BLIP-2, InstructBLIP, Video-LLaMA, MA-LMM): ``Qformer.bert.encoder.layer.{i}
    .attention.self.query.weight`` ...

    For a query-only config the text parts of a BLIP-2 pre-training checkpoint (word/position
    embeddings, text FFN, the ``Qformer.cls`` MLM head) are accepted and dropped. ``image_pe`` names
    MA-LMM's frame position table (``"image_pe.weight"``) for :class:`vjax.layers.qformer.MemoryQFormer`.
    Video-LLaMA's video/audio Q-Formers use ``prefix="video_Qformer.bert."``,
    ``query_tokens="video_query_tokens"`` (``audio_...`` likewise).

    >>> from vjax.convert.mapping import plan_conversion      # the text FFN is accepted and dropped
    >>> key = "Qformer.bert.encoder.layer.0.crossattention.self.key.weight"
    >>> names = {key: (64, 48), "Qformer.bert.encoder.layer.0.output.dense.weight": (64, 128)}
    >>> plan = plan_conversion(names, qformer_lavis_table(QFormerConfig.tiny()),
    ...                        {"layers_0/cross_attn/k_proj/kernel": (48, 64)})
    >>> plan.missing, plan.unexpected, [type(rule).__name__ for _, rule, _ in plan.assignments]
    ([], [], ['Rule', 'Skip'])
    """
    p, d = prefix, dst_prefix
    rules: list[Rule | Skip] = [Rule(query_tokens, f"{d}query_tokens")]
    rules += _norm(f"{p}embeddings.LayerNorm", f"{d}embed_norm")
    rules += _text_embedding_rules(config, p, d)
    rules += _layer_rules(config, p, d, "self")
    if image_pe is not None:
        rules.append(Rule(image_pe, f"{d}frame_position/embedding"))
    if not config.text_input and p.endswith("bert."):
        head = p[: -len("bert.")] + "cls.predictions."
        rules += [Skip(f"{head}{k}") for k in ("bias", "transform.dense.weight", "transform.dense.bias",
                                               "transform.LayerNorm.weight", "transform.LayerNorm.bias",
                                               "decoder.weight", "decoder.bias")]
    return rules
