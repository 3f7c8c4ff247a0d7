"""Continuous batching (``vjax.serving.SlotDecoder``) and the serving engine (``experiments.engine.Engine``).

The reference for every answer is the same request decoded alone: :func:`vjax.generate.generate` (batch 1,
no padding) for the slot decoder, and :class:`experiments.chat.Chat` / the engine with one request at a time
for the engine. Greedy tokens must be identical while other slots join, decode and leave around them.
"""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import config
from experiments.chat import Chat
from experiments.engine import Engine
from vjax.data.synthetic import write_mp4
from vjax.generate import ContextOverflow, generate
from vjax.models import registry
from vjax.models.decoder import CausalLM, DecoderConfig
from vjax.models.video_llm import VISUAL_KEYS
from vjax.serving import SlotDecoder, select_rows

from tests.models.tiny import random_params
from tests.serve_common import tiny_checkpoint

NEW = 8


def _video_model(name):
    cfg_cls, module_cls = registry.get(name)
    module = module_cls(cfg_cls.tiny())
    params = random_params(module, seed=1, std=0.2)
    b = module.example_batch(1)
    vis = {k: b[k] for k in VISUAL_KEYS if k in b}
    vis["frames"] = jnp.asarray(np.random.default_rng(0).normal(size=vis["frames"].shape), jnp.float32)
    return module, params, b["input_ids"][0].tolist(), vis


# Qwen2-VL: M-RoPE positions after the video differ from the slot index; CogVLM2: visual experts + shared
# vision positions. (Chat-UniVi, the plain case, runs through the engine below.)
@pytest.mark.parametrize("name", ["qwen2_vl", "cogvlm2_video"])
def test_each_slot_decodes_as_if_alone_while_others_join_and_leave(name):
    module, params, prompt, vis = _video_model(name)
    prompts = [prompt, prompt + [21, 23, 27], prompt + [5] * 11]
    alone = [np.asarray(generate(module, params, jnp.asarray([p], jnp.int32), prefill_inputs=vis,
                                 max_new_tokens=NEW).tokens[0]).tolist() for p in prompts]
    dec = SlotDecoder(module, params, slots=4, max_length=len(prompt) + 64, bucket=16)
    where = {0: 2, 1: 0, 2: 3}  # request -> slot
    joins = {0: -1, 1: 2, 2: 3}  # request -> the step before which it joins
    out: dict[int, list[int]] = {r: [] for r in where}
    for t in range(-1, 3 + NEW):
        for r, at in joins.items():
            if at == t:
                out[r].append(dec.admit(where[r], prompts[r], max_new_tokens=NEW, prefill_inputs=vis))
        for r in where:  # a request that is done leaves: its slot is freed mid-run
            if len(out[r]) == NEW and dec.state[where[r]] is not None:
                dec.release(where[r])
        if dec.active():
            toks = dec.step()
            for r, s in where.items():
                if out[r] and len(out[r]) < NEW:
                    out[r].append(int(toks[s]))
    assert out == dict(enumerate(alone))
    assert dec.free_slots() == [0, 1, 2, 3]


@pytest.fixture(scope="module")
def decoder():
    module = CausalLM(DecoderConfig.tiny())
    return module, random_params(module, seed=2, std=0.3)


def test_a_sampled_slot_does_not_depend_on_its_neighbours(decoder):
    module, params = decoder
    dec = SlotDecoder(module, params, slots=3, max_length=48, bucket=8)

    def run(slot, seed, others):
        for s in others:
            dec.admit(s, [3, 1, 4, 1, 5, 9, 2][: 2 + s], max_new_tokens=NEW, temperature=1.0, seed=100 + s)
        toks = [dec.admit(slot, [2, 7, 1, 8], max_new_tokens=NEW, temperature=0.9, top_p=0.9, seed=seed)]
        while len(toks) < NEW:
            toks.append(int(dec.step()[slot]))
        for s in dec.active():
            dec.release(s)
        return toks

    alone = run(1, 7, [])
    assert run(1, 7, [0, 2]) == alone  # beside two sampling neighbours
    assert run(2, 7, [0]) == alone  # in another slot
    assert run(1, 8, []) != alone  # the seed matters


def test_select_rows_is_greedy_at_zero_temperature_and_samples_inside_the_nucleus():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, 11)), jnp.float32)
    temperature = jnp.asarray([0.0, 0.7, 1.3], jnp.float32)
    top_p = jnp.asarray([1.0, 0.6, 0.9], jnp.float32)
    draws = np.stack([np.asarray(select_rows(logits, temperature, top_p, jax.random.split(jax.random.key(i), 3)))
                      for i in range(300)])
    assert (draws[:, 0] == np.argmax(logits[0])).all()
    for row in (1, 2):
        z = np.asarray(logits[row], np.float64) / float(temperature[row])
        p = np.exp(z - z.max())
        p /= p.sum()
        order = np.argsort(-p)
        before = np.cumsum(p[order]) - p[order]
        nucleus = set(order[before < float(top_p[row])].tolist())
        seen = set(draws[:, row].tolist())
        assert seen <= nucleus and 1 < len(nucleus) < 11 and len(seen) > 1, (row, seen, nucleus)


def test_the_decoder_refuses_what_does_not_fit(decoder):
    module, params = decoder
    dec = SlotDecoder(module, params, slots=1, max_length=32, bucket=8)
    with pytest.raises(ContextOverflow, match="9 tokens .16 as prefilled.; with max_tokens=18 that is 33"):
        dec.admit(0, list(range(1, 10)), max_new_tokens=18)
    assert dec.free_slots() == [0]
    dec.admit(0, list(range(1, 10)), max_new_tokens=17)
    for _ in range(16):  # the whole cache row: the 17th token is never written
        dec.step()
    with pytest.raises(ValueError, match="slot 0 is busy"):
        dec.admit(0, [1], max_new_tokens=1)
    with pytest.raises(ValueError, match="slots must be >= 1, got 0"):
        SlotDecoder(module, params, slots=0, max_length=32)


# ------------------------------------------------------------------------------------------------ engine
@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A tiny random-weight Chat-UniVi saved as a converted checkpoint, loaded as a run; three clips."""
    d = tmp_path_factory.mktemp("serving")
    paths = tiny_checkpoint(d)
    rng = np.random.default_rng(1)
    clips = [paths["clip"]]
    for name, n in (("b.mp4", 40), ("c.mp4", 16)):
        write_mp4(str(d / name), rng.integers(0, 255, (n, 48, 48, 3), dtype=np.uint8), fps=8)
        clips.append(str(d / name))
    run = config.load_run(paths["ckpt"], tokenizer=paths["tokenizer"])
    eng = Engine(run, slots=4, max_context=256, max_new_tokens=24, bucket=32)
    yield eng, run, clips
    eng.close()


REQUESTS = [(0, [], "What colour is the circle?"), (1, [], "How many objects?"),
            (2, [("What colour is the circle?", "red")], "And how many?"), (0, [], "two three"),
            (1, [("How many objects?", "two")], "What colour?"), (2, [], "blue green red circle")]


def test_concurrent_requests_get_the_answers_they_get_alone(engine):
    eng, run, clips = engine
    prepared = [eng.prepare(clips[i], h, q) for i, h, q in REQUESTS]
    alone = [eng.generate(p, max_tokens=12) for p in prepared]
    assert any(u["completion_tokens"] > 1 for _, _, u in alone)

    chat = Chat(run, max_new_tokens=12, max_context=256)  # the terminal chat, same question
    chat.load_video(clips[0])
    assert chat.ask(REQUESTS[0][2]) == alone[0][0]

    results: dict[int, tuple] = {}
    pieces: dict[int, list[str]] = {i: [] for i in range(len(prepared))}
    done = threading.Event()

    def finished(i):
        def on_done(reason, usage):
            results[i] = (reason, usage)
            if len(results) == len(prepared):
                done.set()
        return on_done

    tickets = [eng.submit(p, max_tokens=12, on_text=pieces[i].append, on_done=finished(i))
               for i, p in enumerate(prepared)]  # 6 requests, 4 slots: two wait for a free slot
    assert done.wait(300)
    for i, (text, reason, usage) in enumerate(alone):
        assert (tickets[i].text.text(), results[i]) == (text, (reason, usage)), i
        assert "".join(pieces[i]) == text


def test_a_cancelled_request_frees_its_slot_and_bad_values_are_refused(engine):
    eng, _, clips = engine
    p = eng.prepare(clips[1], [], "What colour is the circle?")
    reasons = []
    ticket = eng.submit(p, max_tokens=24, temperature=1.0, on_done=lambda r, u: reasons.append((r, u)))
    ticket.cancel()
    assert ticket.done.wait(120) and reasons[0][0] == "cancelled"
    text, reason, usage = eng.generate(p, max_tokens=3)
    assert reason in ("stop", "length") and usage["completion_tokens"] <= 3
    assert eng.decoder.free_slots() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"max_tokens must be in \[1, 24\], got 25"):
        eng.submit(p, max_tokens=25)
    with pytest.raises(ValueError, match="top_p must be in"):
        eng.submit(p, max_tokens=2, top_p=0.0)
    with pytest.raises(ContextOverflow, match="more than the context of 256 tokens"):  # no room for any answer
        eng.prepare(clips[1], [("red green blue " * 40, "two three " * 40)], "What colour is the circle?")
    for k in range(1, 80):  # a prompt with room for a short answer but not for 24 tokens
        long = eng.prepare(clips[1], [("red green blue " * k, "two")], "What colour is the circle?")
        if eng.decoder.padded_length(len(long.ids)) + 24 > 256:
            break
    with pytest.raises(ContextOverflow, match="with max_tokens=24 that is .*more than the context of 256 tokens"):
        eng.submit(long, max_tokens=24)
    assert eng.generate(long, max_tokens=1)[1] in ("stop", "length")
    with pytest.raises(ValueError, match="the question is empty"):
        eng.prepare(clips[1], [], "  ")
