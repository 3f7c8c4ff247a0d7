"""The PyTorch side of the comparisons: transformers models built at the suite's size with the same
weights as vjax's (converted by ``vjax.convert``), their batches, their optimizer step, FLOP counts, and
the thread settings PyTorch runs under."""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.sizes import OPTIM, SIZES, Size, VLSize


# ------------------------------------------------------------------------------------------ LLaMA pair
def _hf_llama(s: Size, seed: int = 0):
    import torch
    import transformers
    cfg = transformers.LlamaConfig(
        vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
        num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
        max_position_embeddings=max(2048, s.seq, s.prompt_len + s.new_tokens), rms_norm_eps=1e-6,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).float()


@functools.lru_cache(maxsize=None)
def llama_pair(size_name: str, workdir: str):
    """The same random Llama weights twice: transformers' model and vjax's (saved by HF as
    safetensors, loaded with ``vjax.from_pretrained``)."""
    import vjax
    hf = _hf_llama(SIZES[size_name])
    d = os.path.join(workdir, f"llama_{size_name}")
    hf.save_pretrained(d)
    module, params = vjax.from_pretrained(d)
    return hf, module, params


def param_counts(module, params) -> dict[str, int]:
    leaves = jax.tree_util.tree_leaves_with_path(params)
    total = sum(int(x.size) for _, x in leaves)
    embed = sum(int(x.size) for p, x in leaves if "embed_tokens" in jax.tree_util.keystr(p))
    return {"total": total, "embedding": embed, "non_embedding": total - embed}


def decoder_train_flops(module, params, batch: int, seq: int) -> dict[str, Any]:
    """Model FLOPs of one training step (forward + backward), PaLM-style (Chowdhery et al. 2022, App. B):

        FLOPs = tokens * (6 * N + 12 * n_layers * n_heads * head_dim * seq)

    ``N`` = parameters that multiply (all but the input embedding table, a gather; the LM head
    counts), ``tokens = batch * seq``; the second term is the q·k and p·v matmuls without the causal
    saving. Norms, softmax, RoPE and the optimizer are not counted."""
    c = module.config
    n = param_counts(module, params)
    tokens = batch * seq
    dense = 6 * n["non_embedding"] * tokens
    attn = 12 * c.num_layers * c.num_heads * c.resolved_head_dim * seq * tokens
    return {"params": n, "tokens": tokens, "dense_flops": dense, "attention_flops": attn,
            "flops": dense + attn,
            "formula": "tokens * (6 * N_non_embedding + 12 * n_layers * n_heads * head_dim * seq)"}


def torch_adamw_step(hf, inputs: dict[str, Any]):
    """A step of ``hf(**inputs).loss`` (``inputs`` holds torch tensors, ``labels`` included) with
    global-norm clipping and ``torch.optim.AdamW`` (decay on matrices, as vjax's optimizer)."""
    import torch
    hf.train()
    params = [p for p in hf.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": OPTIM["weight_decay"]},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=OPTIM["learning_rate"], betas=(OPTIM["b1"], OPTIM["b2"]),
                            eps=OPTIM["eps"])

    def step():
        opt.zero_grad(set_to_none=True)
        loss = hf(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, OPTIM["grad_clip"])
        opt.step()
        return loss

    first = float(step().detach())
    return step, first


# ------------------------------------------------------------------------------------------ Qwen2-VL pair
def _hf_qwen2_vl(v: VLSize, seed: int = 0):
    """A random transformers ``Qwen2VLForConditionalGeneration`` of size ``v`` (special tokens at the
    top of the vocabulary; biases and norm scales perturbed so they are not trivially 0 / 1)."""
    import torch
    import transformers
    ids = vl_special_ids(v)
    cfg = transformers.Qwen2VLConfig(
        text_config=dict(vocab_size=v.vocab, hidden_size=v.hidden, intermediate_size=v.intermediate,
                         num_hidden_layers=v.layers, num_attention_heads=v.heads, num_key_value_heads=v.kv_heads,
                         max_position_embeddings=max(2048, 2 * v.seq), rms_norm_eps=1e-6, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "mrope_section": list(v.mrope_section),
                                          "rope_theta": 1e6}),
        vision_config=dict(depth=v.vision_depth, embed_dim=v.vision_width, hidden_size=v.hidden,
                           num_heads=v.vision_heads, mlp_ratio=v.vision_mlp_ratio, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["image"], video_token_id=ids["video"], vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.Qwen2VLForConditionalGeneration(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.add_(0.05 * torch.randn_like(p))
    return model


def vl_special_ids(v: VLSize) -> dict[str, int]:
    return {"image": v.vocab - 4, "video": v.vocab - 3, "vision_start": v.vocab - 2, "vision_end": v.vocab - 1}


def qwen2_vl_pair(v: VLSize, workdir: str):
    """The same random Qwen2-VL weights twice: transformers' model, and vjax's ``Qwen2VL`` converted from
    its ``save_pretrained`` safetensors through :func:`vjax.convert.qwen2_vl.qwen2_vl_table` (the
    config read back with ``Qwen2VLConfig.from_hf``, clip geometry ``frames x image_size^2``)."""
    from vjax.convert.io import open_checkpoint
    from vjax.convert.mapping import convert
    from vjax.convert.qwen2_vl import detect_layout, qwen2_vl_table
    from vjax.models.qwen2_vl import Qwen2VL, Qwen2VLConfig
    from vjax.pretrained import abstract_params
    hf = _hf_qwen2_vl(v)
    d = os.path.join(workdir, f"qwen2_vl_{v.hidden}x{v.layers}")
    hf.save_pretrained(d)
    config = Qwen2VLConfig.from_hf(hf.config.to_dict(), num_frames=v.frames, image_size=v.image_size)
    module = Qwen2VL(config)
    src = open_checkpoint(d)
    layout = detect_layout(src.keys())
    params = convert(src, qwen2_vl_table(config, layout), abstract_params(module))
    return hf, module, jax.tree_util.tree_map(jnp.asarray, params), layout


def qwen2_vl_batch(v: VLSize, seed: int = 0) -> dict[str, np.ndarray]:
    """Random text around one clip per row (see :class:`VLSize`) and random normalised frames
    ``[B, frames, image_size, image_size, 3]``; loss on the answer tokens."""
    rng = np.random.default_rng(seed)
    ids = vl_special_ids(v)
    text = lambda n: rng.integers(3, v.vocab - 4, (v.batch, n))  # noqa: E731
    col = lambda tok, n: np.full((v.batch, n), tok)  # noqa: E731
    input_ids = np.concatenate([text(v.prompt), col(ids["vision_start"], 1), col(ids["video"], v.visual_tokens),
                                col(ids["vision_end"], 1), text(v.question), text(v.answer)], 1).astype(np.int32)
    loss_mask = np.zeros_like(input_ids)
    loss_mask[:, -v.answer:] = 1
    frames = rng.normal(size=(v.batch, v.frames, v.image_size, v.image_size, 3)).astype(np.float32)
    return {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids), "loss_mask": loss_mask,
            "frames": frames, "frame_mask": np.ones((v.batch, v.frames), bool)}


def qwen2_vl_train_flops(module, params, v: VLSize) -> dict[str, Any]:
    """Model FLOPs of one Qwen2-VL training step (forward + backward), the PaLM rule of
    :func:`decoder_train_flops` applied to both towers:

        decoder: T * (6 * N_llm + 12 * n_layers * n_heads * head_dim * L),   T = batch * L
        vision:  P * (6 * N_vit + 12 * depth * width * S) + (P / 4) * 6 * N_merger

    ``N_llm`` = decoder parameters but the input embedding (the LM head counts); ``P = batch * t*h*w``
    patches; ``N_vit`` = patch embedding + blocks; ``S = h * w`` patches per attention segment (the
    reference attends within each temporal slice, and so does vjax when every slice has the same
    ``h * w``, as here; mixed grids fall back to one block-masked ``[P, P]`` attention, which would
    execute ``P / S`` times the counted attention FLOPs, recorded as ``vision_attention_executed_flops``
    for that case); the merger runs on ``P / 4`` merged tokens. The input pixels
    need no gradient, and norms, softmax, RoPE and the optimizer are not counted."""
    flat = {jax.tree_util.keystr(p): int(x.size) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    count = lambda pred: sum(n for k, n in flat.items() if pred(k))  # noqa: E731
    n_llm = count(lambda k: k.startswith("['llm']") and "embed_tokens" not in k)
    n_merger = count(lambda k: k.startswith("['merger']"))
    n_vit = count(lambda k: k.startswith("['vision']"))
    c = module.config.llm
    t, h, w = v.grid
    tokens, patches, seg = v.batch * v.seq, v.batch * t * h * w, h * w
    llm_dense = 6 * n_llm * tokens
    llm_attn = 12 * c.num_layers * c.num_heads * c.resolved_head_dim * v.seq * tokens
    vit_dense = 6 * n_vit * patches + 6 * n_merger * (patches // 4)
    vit_attn = 12 * v.vision_depth * v.vision_width * seg * patches
    return {"params": {"llm_non_embedding": n_llm, "vision": n_vit, "merger": n_merger,
                       "embedding": sum(flat.values()) - n_llm - n_vit - n_merger, "total": sum(flat.values())},
            "tokens": tokens, "patches": patches, "attention_segment": seg,
            "decoder_dense_flops": llm_dense, "decoder_attention_flops": llm_attn,
            "vision_dense_flops": vit_dense, "vision_attention_flops": vit_attn,
            "vision_attention_executed_flops": 12 * v.vision_depth * v.vision_width * patches * patches,
            "dense_flops": llm_dense + vit_dense, "attention_flops": llm_attn + vit_attn,
            "flops": llm_dense + llm_attn + vit_dense + vit_attn,
            "formula": "T * (6 N_llm + 12 layers heads head_dim L) + P * (6 N_vit + 12 depth width S) "
                       "+ P/4 * 6 N_merger"}


def torch_compiled_adamw_step(hf, inputs: dict[str, Any]):
    """:func:`torch_adamw_step` on a copy of ``hf`` whose forward runs under ``torch.compile`` (inductor; the
    backward is compiled with it). Returns ``(step, first loss, error)``: ``step`` None and ``error`` the
    exception's one line where it does not compile on this machine (no C++ compiler, an unsupported op)."""
    import copy

    import torch
    model = copy.deepcopy(hf)
    try:
        model.forward = torch.compile(model.forward)
        step, first = torch_adamw_step(model, inputs)  # compiles here, outside the timed rounds
        step()  # and a second time if the first call's inputs specialised differently
    except Exception as err:  # noqa: BLE001 — a contender "where it runs"
        return None, None, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return step, first, None


def torch_contenders(fn: Callable[[], Any], compiled: Callable[[], Any] | None = None
                     ) -> dict[str, Callable[[], Any]]:
    """``fn`` under PyTorch's default intra-op thread count (``torch``) and under one thread
    (``torch_1t``), and ``compiled`` (``torch_compile``, the same step under ``torch.compile``) when given.
    On a loaded host, OpenMP's barrier after every op stalls whenever one of its threads is
    descheduled, and one thread can be several times faster; the fastest configuration (by median) is
    the reference every speedup is computed against."""
    import torch
    default = torch.get_num_threads()

    def one_thread():
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(default)

    return {"torch": fn, "torch_1t": one_thread, **({"torch_compile": compiled} if compiled is not None else {})}
