"""Stage 0's connector (``experiments.pretrain``'s ``connector`` and, for Video-LLaMA, ``audio`` parts) built on a tiny
set: its own file, so that pytest-xdist runs it beside tests/test_pretrain.py rather than after it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from experiments import config as cfg
from experiments import pretrain
from tests.test_pretrain import RUN_SET
from vjax.data import formats
from vjax.data.synthetic import PALETTE, SyntheticConfig, ensure_synthetic_dataset
from vjax.pytree import flatten_params


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Where the tiny set and the parts' cache go, shared by both models' tests."""
    return tmp_path_factory.mktemp("connector")


@pytest.mark.parametrize("model, steps", [("video_llama", 300), ("ma_lmm", 20)])
def test_the_connector_learns_to_name_the_objects_from_its_tokens_and_fits_the_model(model, steps, root, monkeypatch):
    """The Q-Former models' connector, on the stage-0 tower: its loss falls and (Video-LLaMA, 300 steps) its tokens
    name the held-out clips' objects' colours above chance; the modules it returns (each under its own attribute)
    replace the model's, whole (MA-LMM's Q-Former's text embeddings, which frames never reach, at their init).
    Video-LLaMA also builds the audio part (its audio tower learns to hear each window's beeps) and its audio
    connector (tokens that count the clip's beeps), both above chance on held-out clips."""
    from vjax.pretrained import init_params  # noqa: PLC0415

    monkeypatch.setenv("VJAX_CACHE", str(root / "cache"))  # both models' towers are one part: built once
    c = cfg.config_from_file(cfg.config_path(model)[0], "tiny")
    c.data.root = str(root / "synthetic")
    c.data.synthetic.update(RUN_SET)
    heard = model == "video_llama"
    c.stage0.update(parts="vision,audio,connector" if heard else "vision,connector", tower_steps=100, tower_batch=64,
                    connector_steps=steps, connector_batch=16, audio_steps=100, audio_batch=8,
                    audio_connector_steps=100, warmup_steps=10)
    plan = cfg.validate(c)
    paths = ensure_synthetic_dataset(c.data.root, SyntheticConfig(**c.data.synthetic.to_dict()))
    tok = formats.TextTokenizer(paths.tokenizer_dir)
    spec = plan["model"]
    mcfg = cfg.resolve_markers(spec, plan["model_config"], tok)
    lines = []
    got = pretrain.ensure_parts(c, spec, mcfg, cfg.data_format(spec, mcfg, c), tok, paths, progress=False,
                                log=lines.append)
    want = ("vision", *spec.connector) + ((spec.audio_tower, *spec.audio_connector) if heard else ())
    assert sorted(got) == sorted(want) and len(lines) == 2 + heard
    assert "stage 0 connector" in lines[-1]
    recipe = pretrain.Recipe.from_config(c.stage0)
    syn_hash = SyntheticConfig(**c.data.synthetic.to_dict()).params_hash()
    key = pretrain.part_key("connector", mcfg, recipe, syn_hash, "", audio=heard)
    figures = json.loads((Path(pretrain.part_dir(key)) / "manifest.json").read_text())["figures"]
    assert figures["loss_curve"][-1] < 0.9 * figures["loss_curve"][0], figures
    if heard:
        # slots that hold an object: colour right more often than 1.5x a guess among the palette
        assert figures["colour_accuracy"] > 1.5 / len(PALETTE), figures
        # 0-3 beeps a clip: saying the commonest count scores about a quarter
        assert figures["beep_count_accuracy"] > 0.45 and figures["audio_loss_curve"][-1] < figures["audio_loss_curve"][0]
        audio = pretrain.part_key("audio", mcfg, recipe, syn_hash, "")
        tower = json.loads((Path(pretrain.part_dir(audio)) / "manifest.json").read_text())["figures"]
        assert tower["count_accuracy"] > 0.6 and tower["pitch_accuracy"] > 0.6, tower  # chance: ~0.3 and 0.5
    init = init_params(spec.module(mcfg), 0)
    params = pretrain.with_parts(init, got)
    if model == "ma_lmm":
        words = "qformer/word_embeddings/embedding"
        assert np.array_equal(flatten_params(params)[words], flatten_params(init)[words])
        assert not np.array_equal(flatten_params(params)["qformer/query_tokens"],
                                  flatten_params(init)["qformer/query_tokens"])
    # trained on that tower: another tower recipe is another connector (and another audio tower, with audio)
    other = pretrain.part_key("connector", mcfg, pretrain.Recipe(**{**recipe.__dict__, "tower_steps": 7}), syn_hash, "",
                              audio=heard)
    assert pretrain.part_dir(key) != pretrain.part_dir(other)
    if heard:
        deaf = pretrain.part_key("connector", mcfg, pretrain.Recipe(**{**recipe.__dict__, "audio_steps": 7}), syn_hash,
                                 "", audio=True)
        assert pretrain.part_dir(key) != pretrain.part_dir(deaf)
