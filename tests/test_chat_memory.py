"""MA-LMM chat streams every frame of a video through its memory bank: the compiled memory of what runs
does not grow from a 60-frame to a 600-frame video, while the whole-clip encoder's does (so the
measurement can tell them apart)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from experiments import config
from experiments.chat import Chat
from experiments.configs import ma_lmm as ma_lmm_config
from vjax.data import formats
from vjax.data.synthetic import train_tokenizer, write_mp4
from vjax.models.ma_lmm import MALMM
from vjax.pretrained import Run

from tests.models.tiny import random_params


def _run(tmp_path) -> Run:
    c = ma_lmm_config.get_config("tiny")
    model, mcfg = config.model_config(c)
    tok = formats.TextTokenizer(train_tokenizer(["what colour is the circle", "red green blue"] * 20,
                                                str(tmp_path / "tok"), c.data.synthetic.vocab_size))
    mcfg = config.resolve_markers(model, mcfg, tok)  # the placeholder ids are the tokenizer's
    module = model.module(mcfg)
    return Run(name="ma_lmm", config=c, module=module, params=random_params(module, seed=0, std=0.2),
               spec=config.data_format(model, mcfg, c), tokenizer=tok, sampler=config.make_sampler(c, model),
               step=None, workdir=str(tmp_path))


def _video(path, n: int) -> str:
    t = np.arange(n)[:, None, None, None]
    frames = ((t * 7 + np.arange(32)[None, :, None, None] * 5) % 256).astype(np.uint8).repeat(3, axis=3)
    frames = np.broadcast_to(frames, (n, 32, 32, 3)).copy()
    write_mp4(str(path), frames, fps=30)
    return str(path)


def test_ma_lmm_chat_memory_is_flat_in_video_length(tmp_path):
    run = _run(tmp_path)
    seen, memory, answers = {}, {}, {}
    for n in (60, 600):
        chat = Chat(run, max_new_tokens=3, measure_memory=True)
        chat.load_video(_video(tmp_path / f"v{n}.mp4", n))
        answers[n] = chat.ask("What colour is the circle?")
        seen[n], memory[n] = chat.frames_seen, chat.memory["stream_step"]
    assert seen == {60: 60, 600: 600}  # every frame went through the memory bank
    assert memory[600] <= memory[60]
    assert all(isinstance(a, str) for a in answers.values())

    # the alternative — all frames in one call — grows with the length
    module, c = run.module, run.config
    s = c.data.image_size

    def whole_clip_bytes(t: int) -> int:
        frames = jax.ShapeDtypeStruct((1, t, s, s, 3), jnp.float32)
        q = jax.ShapeDtypeStruct((1, run.spec.qformer_text_len), jnp.int32)
        fn = jax.jit(lambda p, f, qi: MALMM(module.config.replace(num_frames=t)).apply(
            {"params": p}, f, None, qi, None, method="encode"))
        m = fn.lower(run.params, frames, q).compile().memory_analysis()
        return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes

    whole = {t: whole_clip_bytes(t) for t in (60, 600)}
    print(f"MA-LMM chat compiled bytes: stream step {memory}; whole clip {whole}")
    assert whole[600] > 2 * whole[60]
