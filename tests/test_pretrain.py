"""Stage 0 and stage 1 of the tiny runs (``experiments.pretrain``, ``align.*``): the per-patch labels and the texts
they learn from, the cache of the pretrained parts, and a staged training command end to end."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import config as cfg
from experiments import pretrain
from experiments.configs import chat_univi, video_llama
from vjax.data import formats
from vjax.data.synthetic import (
    PALETTE,
    SHAPES,
    SyntheticConfig,
    _sample_scene,
    caption,
    caption_records,
    description,
    ensure_synthetic_dataset,
    every_question,
    patch_labels,
    render_frames,
)
from vjax.data.synthetic.questions import _candidates, sound_description
from vjax.data.synthetic.scene import _clip_rng
from vjax.data.templates import VIDEO_LLAMA_AUDIO_MIDDLE, VIDEO_LLAMA_AUDIO_PREFIX, VIDEO_LLAMA_AUDIO_SUFFIX
from vjax.pytree import flatten_params

ROOT = Path(__file__).resolve().parents[1]
PALETTE_NAMES = list(PALETTE)
TINY_SET = dict(num_train=4, num_val=2, num_test=0, long_every=0, show_progress=False)
RUN_SET = dict(TINY_SET, num_train=40, num_val=4)  # the tower sees every colour and shape in 40 clips


def _scene_with_objects(n: int) -> dict:
    cfg_ = SyntheticConfig(texture_std=0.0)
    for i in range(200):
        s = _sample_scene(cfg_, "train", i)
        if len(s["objects"]) == n and all(o["appear_s"] == 0 and o["vanish_s"] is None for o in s["objects"]):
            return s
    raise AssertionError(f"no scene with {n} objects from the start")


@pytest.mark.parametrize("n", [1, 3])
def test_patch_labels_name_the_colour_and_shape_seen_in_the_rendered_cell(n):
    """Reference: the rendered frame's pixels. A cell whose pixels are an object's palette colour for >= 40 % of it
    is labelled with that colour and shape; a cell with no such pixel is background."""
    scene = _scene_with_objects(n)
    frame = render_frames(scene, 7, indices=[0])[0].astype(int)  # [64, 64, 3]
    colour, shape = patch_labels(scene, 0, 8)
    by_colour = {name: o for o in scene["objects"] for name in [o["colour"]]}
    checked = 0
    for i in range(8):
        for j in range(8):
            cell = frame[8 * i:8 * i + 8, 8 * j:8 * j + 8].reshape(-1, 3)
            shares = {name: np.mean(np.all(cell == rgb, axis=1)) for name, rgb in PALETTE.items()}
            best = max(shares, key=shares.get)
            if shares[best] >= 0.4:
                assert colour[i, j] == 1 + list(PALETTE).index(best)
                assert shape[i, j] == 1 + SHAPES.index(by_colour[best]["shape"])
                checked += 1
            elif shares[best] == 0:
                assert colour[i, j] == 0 and shape[i, j] == 0
    assert checked >= n  # every object covers at least one cell


def test_render_frames_of_chosen_indices_start_as_the_whole_clip():
    scene = _sample_scene(SyntheticConfig(), "train", 3)
    whole = render_frames(scene, 11)
    assert np.array_equal(render_frames(scene, 11, indices=[0])[0], whole[0])
    assert render_frames(scene, 11, indices=[5, 9]).shape == (2,) + whole.shape[1:]


def test_every_question_asks_every_candidate_and_the_caption():
    syn = SyntheticConfig()
    scene = _sample_scene(syn, "train", 12)
    want = [c["type"] for c in _candidates(scene, _clip_rng(syn, "train", 12))]
    recs = every_question(scene, syn, np.random.default_rng(0), "videos/train/000012.mp4")
    assert [r["question_type"] for r in recs] == want + ["caption"]
    assert recs[-1]["answer"] == caption(scene)
    for r in recs:
        answer = r["conversations"][1]["value"]
        assert answer == r["answer"] or answer.endswith(f") {r['answer']}")  # open, or "(B) red"


def test_description_states_caption_beeps_and_subtitle():
    syn = SyntheticConfig(subtitle_fraction=1.0)
    scene = next(s for s in (_sample_scene(syn, "train", i) for i in range(50)) if len(s["beeps"]) == 2)
    text = description(scene)
    assert text.startswith(caption(scene))
    assert f"It beeps two times: {scene['beeps'][0]['pitch']}, then {scene['beeps'][1]['pitch']}." in text
    assert scene["subtitle"]["text"] in text


def test_caption_records_equal_the_ones_the_generator_writes(tmp_path):
    """Reference: a set generated with ``train_captions=True`` holds the caption records in its annotations."""
    with_captions = ensure_synthetic_dataset(tmp_path / "a", SyntheticConfig(train_captions=True, **TINY_SET))
    plain = ensure_synthetic_dataset(tmp_path / "b", SyntheticConfig(**TINY_SET))
    written = [r for r in cfg.read_jsonl(with_captions.annotations["train"]) if r["question_type"] == "caption"]
    assert len(written) == 4 and caption_records(plain, "train") == written


# --------------------------------------------------------------------------------------------- the parts
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A chat_univi config on a tiny set with a short stage-0 recipe, and what ``ensure_parts`` needs."""
    d = tmp_path_factory.mktemp("pretrain")
    c = chat_univi.get_config()
    c.data.root = str(d / "synthetic")
    c.data.synthetic.update(RUN_SET)
    c.stage0.update(parts="vision,llm", tower_steps=100, tower_batch=64, tower_position_weight=1.0, lm_steps=40,
                    lm_batch=4, lm_scenes=40, lm_turns=3, warmup_steps=10)
    plan = cfg.validate(c)
    paths = ensure_synthetic_dataset(c.data.root, SyntheticConfig(**c.data.synthetic.to_dict()))
    tok = formats.TextTokenizer(paths.tokenizer_dir)
    model = plan["model"]
    mcfg = cfg.resolve_markers(model, plan["model_config"], tok)
    return d, c, (model, mcfg, cfg.data_format(model, mcfg, c), tok, paths)


def test_parts_are_built_once_then_read_from_the_cache(tiny_run, monkeypatch):
    d, c, args = tiny_run
    monkeypatch.setenv("VJAX_CACHE", str(d / "cache"))
    lines = []
    first = pretrain.ensure_parts(c, *args, progress=False, log=lines.append)
    assert sorted(first) == ["llm", "vision"] and len(lines) == 2
    manifests = sorted((d / "cache" / "pretrained").glob("*/manifest.json"))
    assert [m.parent.name.split("-")[0] for m in manifests] == ["llm", "vision"]
    vision = json.loads(manifests[1].read_text())["figures"]
    # the tower learns in 100 steps: colour of the patches objects cover (chance 1/7), empty patches called empty
    assert vision["colour_accuracy"] > 0.75 and vision["background"] > 0.9, vision
    # and each patch's feature says where the patch is (a linear head's error in patches; the centre guess: 2.0)
    assert vision["position_error"] < 1.0, vision
    llm = json.loads(manifests[0].read_text())["figures"]
    assert llm["loss_curve"][-1] < 0.5 * llm["loss_curve"][0], llm

    def no_training(*a, **k):
        raise AssertionError("a cached part was trained again")

    monkeypatch.setattr(pretrain, "pretrain_tower", no_training)
    monkeypatch.setattr(pretrain, "pretrain_lm", no_training)
    again = pretrain.ensure_parts(c, *args, progress=False, log=lambda _: None)
    for part in first:
        a, b = flatten_params(first[part]), flatten_params(again[part])
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # a manifest missing (a build that crashed before the end) is rebuilt; another recipe is another directory
    os.remove(manifests[1])
    c2 = c.copy_and_resolve_references()
    c2.stage0.parts = "vision"
    with pytest.raises(AssertionError, match="trained again"):
        pretrain.ensure_parts(c2, *args, progress=False, log=lambda _: None)
    key = pretrain.part_key("vision", args[1], pretrain.Recipe.from_config(c.stage0), "h", "")
    other = pretrain.part_key("vision", args[1], pretrain.Recipe(tower_steps=61), "h", "")
    assert pretrain.part_dir(key) != pretrain.part_dir(other)


def test_the_slots_layout_describes_the_sound_and_the_sight_where_their_tokens_go(tiny_run):
    """``stage0.lm_layout=slots``: Video-LLaMA's LLM reads the beeps in the audio sentence and the objects between
    <Video> and </Video>, where stage 2 puts the audio and video tokens; the text after the last slot (the rest of
    the prompt, the question, the answer) is stage 2's, token for token. The default layout writes the whole
    description after the prompt, before the question."""
    tok = tiny_run[2][3]
    c = video_llama.get_config()
    plan = cfg.validate(c)
    spec = plan["model"]
    fmt = formats.VideoQAFormat(cfg.data_format(spec, cfg.resolve_markers(spec, plan["model_config"], tok), c), tok)
    syn = SyntheticConfig(subtitle_fraction=0.0)
    index = next(i for i in range(50) if len(_sample_scene(syn, "train", i)["beeps"]) == 2)
    scene = _sample_scene(syn, "train", index)
    record = every_question(scene, syn, np.random.default_rng(0), f"videos/train/{index:06d}.mp4")[0]
    (ids, mask), = pretrain.lm_texts([record], {index: scene}, fmt, "slots")
    (old_ids, _), = pretrain.lm_texts([record], {index: scene}, fmt)
    stage2, stage2_mask = fmt.text(record, fmt.spec.num_frames)
    placeholders = [pid for _, pid, _ in fmt.spec.visual]
    assert not np.isin(ids, placeholders).any() and np.isin(stage2, placeholders).any()
    tail = stage2[np.flatnonzero(np.isin(stage2, placeholders))[-1] + 1:]
    assert ids[-len(tail):].tolist() == tail.tolist()
    assert ids[mask > 0].tolist() == stage2[stage2_mask > 0].tolist()
    text, old_text = tok.decode(ids.tolist()), tok.decode(old_ids.tolist())
    heard = text.split(VIDEO_LLAMA_AUDIO_PREFIX.strip())[1].split(VIDEO_LLAMA_AUDIO_MIDDLE.strip())[0]
    seen = text.split("<Video>")[1].split("</Video>")[0]
    assert heard.strip(" .") == sound_description(scene).rstrip(".") and "It beeps two times" in heard
    assert seen.strip() == caption(scene)
    question = record["conversations"][0]["value"].replace("<video>", "").strip()
    assert old_text.split(VIDEO_LLAMA_AUDIO_SUFFIX.strip())[1].strip().startswith(description(scene))
    assert description(scene) not in text and question.splitlines()[0] in text.split("</Video>")[1]
    with pytest.raises(ValueError, match="lm_layout='words'"):
        pretrain.lm_texts([record], {index: scene}, fmt, "words")
    # another layout is another LLM; the default's key is the one it had before the field existed
    recipe = pretrain.Recipe.from_config(c.stage0)
    keys = [pretrain.part_key("llm", plan["model_config"], dataclasses.replace(recipe, lm_layout=x), "h", "t")
            for x in ("question", "slots")]
    assert "lm_layout" not in keys[0]["recipe"] and pretrain.part_dir(keys[0]) != pretrain.part_dir(keys[1])


def test_qwen2_vl_tower_learns_the_patches_it_packs(tmp_path, monkeypatch):
    """Qwen2-VL's ViT (packed patches, 2-D RoPE) pretrains as the other towers: a frame is a still image."""
    c = cfg.config_from_file(cfg.config_path("qwen2_vl")[0], "tiny")
    with c.unlocked():
        c.data.root = str(tmp_path / "synthetic")
        c.data.synthetic.update(RUN_SET)
        c.stage0.update(parts="vision", tower_steps=80, tower_batch=32, warmup_steps=10)
    plan = cfg.validate(c)
    paths = ensure_synthetic_dataset(c.data.root, SyntheticConfig(**c.data.synthetic.to_dict()))
    tok = formats.TextTokenizer(paths.tokenizer_dir)
    model = plan["model"]
    mcfg = cfg.resolve_markers(model, plan["model_config"], tok)
    monkeypatch.setenv("VJAX_CACHE", str(tmp_path / "cache"))
    parts = pretrain.ensure_parts(c, model, mcfg, cfg.data_format(model, mcfg, c), tok, paths, progress=False,
                                  log=lambda _: None)
    manifest = json.loads(next((tmp_path / "cache" / "pretrained").glob("vision-*/manifest.json")).read_text())
    assert manifest["figures"]["colour_accuracy"] > 0.75 and manifest["figures"]["background"] > 0.9, manifest
    from vjax.pretrained import abstract_params  # noqa: PLC0415

    want = {k: v.shape for k, v in flatten_params(abstract_params(model.module(mcfg))["vision"]).items()}
    assert {k: np.shape(v) for k, v in flatten_params(parts["vision"]).items()} == want  # the model's own tower


def test_patch_positions_are_row_major_rows_and_columns_in_minus_one_to_one():
    p = pretrain.patch_positions(3)
    assert p.shape == (9, 2) and p.dtype == np.float32
    np.testing.assert_array_equal(p[[0, 2, 6, 8]], [[-1, -1], [-1, 1], [1, -1], [1, 1]])
    np.testing.assert_array_equal(p[4], [0, 0])
    # the position weight is part of the tower's recipe (another weight, another cached tower), not of the LLM's
    keys = [pretrain.part_key(part, _tiny_model_config(), pretrain.Recipe(tower_position_weight=w), "h", "t")
            for part in ("vision", "llm") for w in (1.0, 0.0)]
    assert pretrain.part_dir(keys[0]) != pretrain.part_dir(keys[1])
    assert pretrain.part_dir(keys[2]) == pretrain.part_dir(keys[3])
    # at 0 (the default) the key is the one towers were cached under before the weight existed
    assert "tower_position_weight" not in keys[1]["recipe"] and keys[0]["recipe"]["tower_position_weight"] == 1.0


def test_how_the_decoder_runs_is_not_part_of_a_parts_key():
    """``grads_in_place`` and ``mlp_chunks`` change the LLM's memory, not its values: another setting finds the same
    cached LLM, and the key is the one parts were cached under before the fields existed (none of their names)."""
    mc = _tiny_model_config()
    recipe = pretrain.Recipe()
    base = pretrain.part_key("llm", mc, recipe, "h", "t")
    assert not {"grads_in_place", "mlp_chunks"} & set(base["config"]) and "num_layers" in base["config"]
    def key(**changed):
        return pretrain.part_dir(pretrain.part_key("llm", dataclasses.replace(mc, llm=dataclasses.replace(
            mc.llm, **changed)), recipe, "h", "t"))

    assert key(mlp_chunks=4) == pretrain.part_dir(base)
    # (scan_layers and remat_policy were in the key before: they stay in it)
    assert key(scan_layers=True, remat_policy="full", grads_in_place=True) == \
        key(scan_layers=True, remat_policy="full") != pretrain.part_dir(base)
    wider = dataclasses.replace(mc, llm=dataclasses.replace(mc.llm, hidden_size=2 * mc.llm.hidden_size))
    assert pretrain.part_dir(pretrain.part_key("llm", wider, recipe, "h", "t")) != pretrain.part_dir(base)


def _tiny_model_config(model: str = "chat_univi"):
    c = cfg.config_from_file(cfg.config_path(model)[0], "tiny")
    return cfg.validate(c)["model_config"]


def test_with_parts_replaces_subtrees_and_names_a_misfit():
    params = {"vision": {"w": np.zeros((2, 3))}, "llm": {"w": np.zeros(4)}, "proj": {"b": np.zeros(1)}}
    out = pretrain.with_parts(params, {"vision": {"w": np.ones((2, 3))}})
    assert out["vision"]["w"].sum() == 6 and out["llm"] is params["llm"] and params["vision"]["w"].sum() == 0
    with pytest.raises(ValueError, match=r"'vision' does not fit the model at vision/w \(model \(2, 3\), part \(3,"):
        pretrain.with_parts(params, {"vision": {"w": np.ones((3, 2))}})


def test_parse_parts_names_an_unknown_part():
    assert pretrain.parse_parts(" vision , llm") == ("vision", "llm") and pretrain.parse_parts("") == ()
    # built in PARTS order whatever the order given: the connector trains on the tower built before it
    assert pretrain.parse_parts("connector,llm,vision") == ("vision", "llm", "connector")
    with pytest.raises(ValueError, match=r"unknown part\(s\) \['tower'\]; known: vision, audio, llm, connector"):
        pretrain.parse_parts("vision,tower")
    with pytest.raises(ValueError, match="connector part is trained on the stage-0 tower: list 'vision' too"):
        pretrain.parse_parts("llm,connector")


def test_object_slots_name_the_objects_in_order_of_appearance_then_none():
    """Reference: the scene's ground truth read directly (``PALETTE``/``SHAPES`` order, MOTIONS index)."""
    from vjax.data.synthetic import MOTIONS  # noqa: PLC0415

    syn = SyntheticConfig()
    scene = next(s for s in (_sample_scene(syn, "train", i) for i in range(300))
                 if len(s["objects"]) == 3 and len({o["appear_s"] for o in s["objects"]}) == 3)
    scene = dict(scene, objects=scene["objects"][::-1])  # listed out of order: the slots still follow time
    slots = pretrain.object_slots(scene, 4)
    ordered = sorted(scene["objects"], key=lambda o: o["appear_s"])
    assert slots["present"].tolist() == [1, 1, 1, 0]
    assert [PALETTE_NAMES[c - 1] for c in slots["colour"][:3]] == [o["colour"] for o in ordered]
    assert [SHAPES[s - 1] for s in slots["shape"][:3]] == [o["shape"] for o in ordered]
    assert [MOTIONS[m] for m in slots["motion"][:3]] == [o["motion"] for o in ordered]
    assert slots["colour"][3] == slots["shape"][3] == 0 and not slots["place"][3].any()
    duration = scene["num_frames"] / scene["fps"]
    first = ordered[0]
    np.testing.assert_allclose(slots["place"][0], [first["appear_s"] / duration, first["start_xy"][0] / 64,
                                                   first["start_xy"][1] / 64, first["end_xy"][0] / 64,
                                                   first["end_xy"][1] / 64], rtol=1e-6)
    assert pretrain.object_slots(scene, 2)["present"].tolist() == [1, 1]  # more objects than tokens: the first ones


def test_beep_slots_name_the_beeps_of_a_window_in_time_order_then_none():
    """Reference: the scene's beeps read directly (a beep belongs to the window its middle lies in)."""
    beeps = [{"start_s": 2.6, "duration_s": 0.2, "pitch": "low"}, {"start_s": 0.1, "duration_s": 0.2, "pitch": "high"},
             {"start_s": 1.85, "duration_s": 0.2, "pitch": "low"}]
    assert pretrain.beep_slots(beeps, 0.0, 2.0, 4).tolist() == [2, 1, 0, 0]  # high at 0.2 s, low at 1.95 s
    assert pretrain.beep_slots(beeps, 1.0, 3.0, 4).tolist() == [1, 1, 0, 0]
    assert pretrain.beep_slots(beeps, 2.0, 4.0, 4).tolist() == [1, 0, 0, 0]  # 1.95 s is the previous window's
    assert pretrain.beep_slots(beeps, 0.0, float("inf"), 2).tolist() == [2, 1]  # more beeps than slots: the first
    assert pretrain.beep_slots([], 0.0, 2.0, 3).tolist() == [0, 0, 0]


@pytest.mark.parametrize("model, parts, audio, match", [
    ("chat_univi", "vision,llm,connector", True, "chat_univi has no connector to pretrain"),
    ("chat_univi", "vision,audio,llm", True, "chat_univi has none"),
    ("video_llama", "vision,audio,llm", False, "needs model_overrides.audio_branch=True and data.load_audio=True")])
def test_a_part_is_refused_for_a_model_without_it(model, parts, audio, match):
    """A connector or an audio tower the model lacks, or an audio part without the run's audio."""
    c = cfg.config_from_file(cfg.config_path(model)[0], "tiny")
    c.stage0.parts, c.data.load_audio = parts, audio
    with pytest.raises(cfg.ConfigError, match=match) as err:
        cfg.validate(c)
    assert err.value.key == "stage0.parts"


def test_a_tower_the_recipe_cannot_build_is_refused_naming_the_key(monkeypatch):
    c = cfg.config_from_file(cfg.config_path("qwen2_vl")[0], "tiny")
    with c.unlocked():
        c.stage0.parts = "vision,llm"
    monkeypatch.setattr(pretrain, "TOWERS", ("clip", "eva"))
    with pytest.raises(cfg.ConfigError, match=r"tower 'qwen2_vl' is not one of \('clip', 'eva'\)") as err:
        cfg.validate(c)
    assert err.value.key == "stage0.parts"


def test_qwen2_vl_packed_patches_come_back_in_row_major_order():
    """Reference: ``qwen2_vl_patchify`` (the release's patch layout) of a frame whose every pixel holds its patch's
    row-major index; the first value of each packed patch, reordered, counts 0 .. g*g - 1."""
    import jax.numpy as jnp  # noqa: PLC0415

    from vjax.models.qwen2_vl import qwen2_vl_patchify  # noqa: PLC0415

    g, p, m = 8, 7, 2
    index = np.arange(g * g, dtype=np.float32).reshape(g, g)
    frame = np.repeat(np.repeat(index, p, 0), p, 1)[None, :, :, None].repeat(3, -1)  # [1, 56, 56, 3]
    packed = np.asarray(qwen2_vl_patchify(jnp.asarray(np.concatenate([frame, frame])), p, 2, m))  # [64, 294]
    assert not np.array_equal(packed[:, 0], np.arange(g * g))  # merge blocks: not row-major as packed
    rows = pretrain.rows_from_merge_order(packed[None], (g, g), m)[0]
    np.testing.assert_array_equal(rows[:, 0], np.arange(g * g))
    assert pretrain.tower_grid(_tiny_model_config("qwen2_vl").vision, 56) == (8, 8)


def test_an_llm_with_visual_experts_gets_them_as_copies_of_the_text_trained_language_experts(tmp_path, monkeypatch):
    """Text trains only the language experts; the part handed to the model has the vision experts equal to them
    (CogVLM's init), while the cached part keeps what the recipe trained."""
    c = cfg.config_from_file(cfg.config_path("cogvlm2_video")[0], "tiny")
    with c.unlocked():
        c.data.root = str(tmp_path / "synthetic")
        c.data.synthetic.update(TINY_SET)
        c.stage0.update(parts="llm", lm_scenes=4, lm_turns=2)
    plan = cfg.validate(c)
    paths = ensure_synthetic_dataset(c.data.root, SyntheticConfig(**c.data.synthetic.to_dict()))
    tok = formats.TextTokenizer(paths.tokenizer_dir)
    model = plan["model"]
    mcfg = cfg.resolve_markers(model, plan["model_config"], tok)
    assert mcfg.llm.visual_experts
    trained = {}

    def fake_lm(llm_config, train, held_out, recipe, progress=True, held_out_kinds=None):  # random, not trained
        from vjax.models.decoder import CausalLM  # noqa: PLC0415
        from vjax.pretrained import init_params  # noqa: PLC0415

        trained.update(flatten_params(init_params(CausalLM(llm_config), 0)))
        return init_params(CausalLM(llm_config), 0), {"answer_exact": 0.0}

    monkeypatch.setenv("VJAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrain, "pretrain_lm", fake_lm)
    for _ in range(2):  # built, then read from the cache
        llm = flatten_params(pretrain.ensure_parts(c, model, mcfg, cfg.data_format(model, mcfg, c), tok, paths,
                                                   progress=False, log=lambda _: None)["llm"])
        experts = [k for k in llm if "/vision_" in k]
        assert len(experts) == 10 * mcfg.llm.num_layers  # q, k, v (kernel, bias), o; gate, up, down per layer
        for k in experts:
            twin = k.replace("/vision_", "/language_")
            want = np.asarray(trained[twin]) if twin in trained else np.zeros_like(trained[k])
            np.testing.assert_array_equal(np.asarray(llm[k]), want, err_msg=k)
            assert twin in trained or k.endswith("/bias")
        cached = pretrain.load_part(str(next((tmp_path / "cache" / "pretrained").glob("llm-*"))))[0]
        some = next(k for k in experts if k.endswith("/kernel"))
        np.testing.assert_array_equal(np.asarray(flatten_params(cached)[some]), np.asarray(trained[some]))


def test_bad_recipe_values_are_refused_naming_the_key():
    c = chat_univi.get_config()
    c.stage0.text_weight = -0.1
    with pytest.raises(cfg.ConfigError, match="must be >= 0") as err:
        cfg.validate(c)
    assert err.value.key == "stage0.text_weight"
    c = chat_univi.get_config()
    c.stage0.lm_layout = "after"
    with pytest.raises(cfg.ConfigError, match="must be one of") as err:
        cfg.validate(c)
    assert err.value.key == "stage0.lm_layout"


# --------------------------------------------------------------------------------------------- end to end
def _flat_params(workdir: Path) -> dict:
    from vjax.pretrained import load_run  # noqa: PLC0415

    return flatten_params(load_run(workdir).params)


@pytest.mark.slow
def test_staged_training_command(tiny_run, tmp_path):
    """stage 0 (cached parts), stage 1 (the projector on captions), stage 2 (projector and LLM on the questions):
    the tower is the pretrained one throughout, the LLM leaves stage 1 as stage 0 made it, stage 2 changes it; the
    rerun resumes stage 2 without running stage 1 again."""
    d, c, _ = tiny_run
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VJAX_CACHE": str(d / "cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    s0 = c.stage0
    args = ["--config=chat_univi", f"--workdir={tmp_path / 'run'}", f"--config.data.root={c.data.root}",
            *[f"--config.data.synthetic.{k}={v}" for k, v in RUN_SET.items()],
            *[f"--config.stage0.{k}={s0[k]}" for k in ("parts", "tower_steps", "tower_batch",
                                                        "tower_position_weight", "lm_steps", "lm_batch", "lm_scenes",
                                                        "lm_turns", "warmup_steps")],
            "--config.align.steps=2", "--config.align.stage=pretrain", "--config.stage=finetune",
            "--config.data.batch_size=2", "--config.data.text_buckets=(256,)", "--config.log_every=1",
            "--config.eval.records=0", "--config.eval.test_records=0",
            "--config.data.worker_count=0",  # 2 + 2 steps: a Grain worker's start-up costs more than it saves
            "--config.total_steps=2"]  # last: the rerun below replaces it
    r = subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "stage 0 vision: " in r.stdout and "stage 0 llm: " in r.stdout
    assert "stage 1 (alignment): 2 steps of 'pretrain' on 40 captions" in r.stdout
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert (summary["model"], summary["align_steps"], summary["steps"], summary["resumed"]) == ("chat_univi", 2, 2,
                                                                                                False)
    assert 0 < summary["train_seconds"] < summary["command_seconds"], summary
    assert 0 < summary["stage0_seconds"] < summary["train_seconds"], summary  # stage 0: a part of the training time

    cache = d / "cache" / "pretrained"
    parts = {p.name.split("-")[0]: pretrain.load_part(str(p))[0] for p in cache.iterdir()}
    stage0 = {f"{name}/{k}": v for name, tree in parts.items() for k, v in flatten_params(tree).items()}
    aligned, final = _flat_params(tmp_path / "run" / "align"), _flat_params(tmp_path / "run")
    for k, v in stage0.items():
        assert np.array_equal(aligned[k], v), k  # neither part trains in the alignment stage
        if k.startswith("vision/"):
            assert np.array_equal(final[k], v), k  # the tower stays frozen in stage 2
    assert any(not np.array_equal(aligned[k], final[k]) for k in stage0 if k.startswith("llm/"))
    projector = [k for k in final if k.startswith("mm_projector/")]
    assert projector and all(k not in stage0 for k in projector)

    # the pretrain command finds the same parts in the cache (nothing is trained again)
    r = subprocess.run([sys.executable, "-m", "experiments.pretrain", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    found = sorted(line.split(" (built")[0] for line in r.stdout.splitlines() if line.startswith("stage 0 "))
    assert found == sorted(f"stage 0 {p.name.split('-')[0]}: {p}" for p in cache.iterdir()), r.stdout

    r = subprocess.run([sys.executable, "-m", "experiments.train", *args[:-1], "--config.total_steps=3"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from step 2" in r.stdout and "stage 1" not in r.stdout and "stage 0" not in r.stdout
    assert json.loads((tmp_path / "run" / "run_summary.json").read_text())["resumed"] is True


TINY_MODELS = ("chat_univi", "video_chatgpt", "minigpt4_video", "qwen2_vl", "cogvlm2_video", "ma_lmm", "video_llama")


@pytest.mark.parametrize("model", TINY_MODELS)
def test_every_tiny_default_is_staged_and_its_stage_1_trains_the_connector_with_the_llm_frozen(model):
    """The papers' recipe at tiny size for all seven: pretrained parts, then an alignment stage on captions that
    trains the modules between them with the LLM frozen (the tower too, but where the paper trains it), then the
    main stage, which trains at least what stage 1 did."""
    from vjax.pretrained import abstract_params  # noqa: PLC0415
    from vjax.train.optim import trainable_mask  # noqa: PLC0415

    c = cfg.config_from_file(cfg.config_path(model)[0], "tiny")
    plan = cfg.validate(c)
    parts = pretrain.parse_parts(c.stage0.parts)
    assert "llm" in parts and c.align.steps > 0
    # the Q-Former models' connector is pretrained too (untrained, their tokens carry a 1e-5 trace of the frames)
    assert ("connector" in parts) == bool(plan["model"].connector), parts
    parts = [p for p in parts if p != "connector"] + list(plan["model"].connector if "connector" in parts else ())
    cfg_cls = type(plan["model_config"])
    params = abstract_params(plan["model"].module(plan["model_config"]))
    mask = trainable_mask(params, cfg_cls.STAGES[c.align.stage])
    trained = {k.split("/")[0] for k, m in mask.items() if m}
    assert trained - set(parts), (c.align.stage, trained)
    # of the pretrained parts: never the LLM; of the tower, MA-LMM's ln_vision (the LayerNorm after the tower, in its
    # paper's trainable set) and Qwen2-VL's whole ViT (its paper's first stage trains the ViT with the LLM frozen).
    # A pretrained connector goes on training (as the papers' Q-Formers and projections in their stage 1).
    in_parts = {k for k, m in mask.items() if m and k.split("/")[0] in ("vision", "llm")}
    allowed = {"ma_lmm": lambda k: k.startswith("vision/ln_vision/"), "qwen2_vl": lambda k: k.startswith("vision/")}
    assert all(allowed.get(model, lambda k: False)(k) for k in in_parts), (c.align.stage, sorted(in_parts)[:5])
    assert {k.split("/")[0] for k, m in trainable_mask(params, cfg_cls.STAGES[c.stage]).items() if m} >= trained
