"""Questions a model can answer from its inputs: a model without an audio branch cannot hear the synthetic set's
beeps, one whose template shows no subtitles cannot read the subtitle facts. Training leaves those questions out
(``data.train_questions``) and evaluation reports them apart (the ``answerable`` group)."""

from __future__ import annotations

import importlib

import pytest

from experiments import config as cfg
from experiments import eval as eval_cmd
from experiments.build import answerable_only
from vjax.data.formats import FormatSpec
from vjax.data.synthetic import QUESTION_INPUTS, answerable


def _spec(**kw) -> FormatSpec:
    return FormatSpec(template="vicuna", visual=(("video", 5, 4),), num_frames=4, **kw)


def test_inputs_follow_the_format():
    assert _spec().inputs() == {"frames"}
    assert _spec(audio_clips=2).inputs() == {"frames", "audio"}
    assert _spec(subtitles=True).inputs() == {"frames", "subtitles"}


@pytest.mark.parametrize("model,hears,reads", [("chat_univi", False, False), ("video_llama", True, False),
                                               ("minigpt4_video", False, True), ("qwen2_vl", False, False)])
def test_each_tiny_default_perceives_what_its_paper_gives_it(model, hears, reads):
    c = importlib.import_module(f"experiments.configs.{model}").get_config()
    inputs = cfg.validate(c)["spec"].inputs()
    assert ("audio" in inputs, "subtitles" in inputs) == (hears, reads)


def test_a_question_is_answerable_when_the_model_has_the_input_it_needs():
    assert set(QUESTION_INPUTS) == {"beep_count", "beep_pitch", "subtitle"}
    frames = frozenset({"frames"})
    assert answerable({"question_type": "colour"}, frames) and answerable({"question_type": "caption"}, frames)
    assert not answerable({"question_type": "beep_pitch"}, frames)
    assert answerable({"question_type": "beep_pitch"}, frames | {"audio"})
    assert not answerable({"question_type": "subtitle"}, frames | {"audio"})
    assert answerable({"question_type": "subtitle"}, frames | {"subtitles"})
    # a multi-turn record (annotations.merge_turns) needs every one of its questions answerable
    assert not answerable({"question_types": ["colour", "beep_count"]}, frames)
    assert answerable({"question_types": ["colour", "shape"]}, frames)


def test_training_leaves_out_what_the_model_cannot_perceive_and_says_so(capsys):
    types = ["colour"] * 5 + ["beep_count"] * 3 + ["beep_pitch"] * 2 + ["subtitle"] * 4 + ["motion"]
    recs = [{"id": i, "question_type": t} for i, t in enumerate(types)]
    kept = answerable_only(recs, _spec(), "training")
    assert [r["id"] for r in kept] == [*range(5), 14]
    out = capsys.readouterr().out
    assert "training questions: 6 of 15" in out
    assert "beep_count 3 (needs audio), beep_pitch 2 (needs audio), subtitle 4 (needs subtitles)" in out
    assert len(answerable_only(recs, _spec(audio_clips=1), "validation")) == 11
    assert answerable_only(recs, _spec(audio_clips=1, subtitles=True)) == recs
    assert capsys.readouterr().out.count("validation questions: 11 of 15") == 1


def test_the_answerable_group_holds_only_what_the_model_can_answer():
    recs = [{"question_type": t, "answer": a, "conversations": [{"from": "human", "value": "<video>\nQ?"},
                                                                 {"from": "gpt", "value": a}]} for t, a in
            [("colour", "red"), ("colour", "blue"), ("beep_count", "two"), ("beep_count", "one"), ("subtitle", "Olga")]]
    preds = ["red", "green", "two", "three", "Olga"]
    rep = eval_cmd.summarize(recs, preds, inputs=frozenset({"frames"}))
    assert rep["accuracy"]["all"]["accuracy"] == pytest.approx(3 / 5)
    assert rep["accuracy"]["answerable"] == {"accuracy": 0.5, "n": 2, "chance": 0.5}
    assert [r["answerable"] for r in rep["predictions"]] == [True, True, False, False, False]
    with_audio = eval_cmd.summarize(recs, preds, inputs=frozenset({"frames", "audio"}))
    assert with_audio["accuracy"]["answerable"]["n"] == 4
    # a model that perceives every question's input (or no inputs given): no separate group
    for rep in (eval_cmd.summarize(recs, preds, inputs=frozenset({"frames", "audio", "subtitles"})),
                eval_cmd.summarize(recs, preds)):
        assert "answerable" not in rep["accuracy"] and "answerable" not in rep["predictions"][0]
    lines = eval_cmd.table(eval_cmd.summarize(recs, preds, inputs=frozenset({"frames"}))).splitlines()
    order = [ln.split()[0] for ln in lines[1:] if ln.split() and ln.split()[0] in ("answerable", "all")]
    assert order == ["all", "answerable"]  # the two totals last

