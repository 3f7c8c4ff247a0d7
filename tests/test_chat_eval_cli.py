"""``experiments.chat`` and ``experiments.eval`` on a converted checkpoint (``vjax_config.json`` +
``--tokenizer``), their one-line exit-2 errors, the evaluation's annotation formats, and its scoring.

(Every registry name is chatted with and evaluated after training in tests/train/test_train_cli.py.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import eval as eval_cmd
from experiments import config
from vjax.data.synthetic import NUMBER_WORDS, SyntheticConfig, ensure_synthetic_dataset, write_mp4

from tests.serve_common import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny Chat-UniVi saved as a converted checkpoint, its tokenizer, two short clips."""
    d = tmp_path_factory.mktemp("chat_eval")
    tok = tiny_checkpoint(d, clip_shape=(24, 48, 48))["tokenizer"]  # ckpt/, tok/, a.mp4
    write_mp4(str(d / "b.mp4"), np.random.default_rng(1).integers(0, 255, (40, 48, 48, 3), dtype=np.uint8), fps=8)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return d, tok, env


def _run(name, args, env, stdin=None):
    return subprocess.run([sys.executable, "-m", f"experiments.{name}", *args], cwd=ROOT, env=env, input=stdin,
                          capture_output=True, text=True, timeout=600)


def _one_error_line(r, *needles):
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.stderr[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]


def test_chat_with_a_converted_checkpoint_samples_and_streams(converted):
    d, tok, env = converted
    r = _run("chat", [f"--workdir={d / 'ckpt'}", f"--tokenizer={tok}", f"--video={d / 'a.mp4'}",
                      "--question=What colour is the circle?", "--temperature=0.8", "--top_p=0.9", "--top_k=20",
                      "--max_new_tokens=5", "--seed=3"], env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.endswith("\n") and "error" not in r.stderr


@pytest.mark.parametrize("case", ["not_a_checkpoint", "missing_tokenizer", "unreadable_video", "too_long"])
def test_chat_errors_are_one_line_with_exit_code_2(converted, case, tmp_path):
    d, tok, env = converted
    args = {"workdir": d / "ckpt", "tokenizer": tok, "video": d / "a.mp4", "question": "What colour?"}
    needles = ()
    if case == "not_a_checkpoint":
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))  # an HF folder, not vjax
        args["workdir"], needles = tmp_path, ("not a vjax checkpoint", "experiments.train")
    elif case == "missing_tokenizer":
        del args["tokenizer"]
        needles = ("--tokenizer",)
    elif case == "unreadable_video":
        (tmp_path / "bad.mp4").write_bytes(b"not a video at all")
        args["video"], needles = tmp_path / "bad.mp4", ("bad.mp4",)
    else:
        args["question"] = "red " * 600
        needles = ("context of 256 tokens", "shorten the question")
    r = _run("chat", [f"--{k}={v}" for k, v in args.items()] + ["--max_context=256"], env)
    _one_error_line(r, *needles)
    report = ("preprocessing:", "video:")  # what chat prints about the frames once the video is read
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith(report)]
    assert len(lines) == 1, r.stderr  # no FFmpeg/decord log lines before it


def test_eval_reads_mvbench_and_open_qa_files_and_writes_its_report(converted, tmp_path):
    d, tok, env = converted
    mv = [{"video": "a.mp4", "question": "What colour is the circle?", "candidates": ["red", "blue", "green"],
           "answer": "blue", "question_type": "colour"},
          {"video": "missing.mp4", "question": "How many?", "candidates": ["one", "two"], "answer": "two"}]
    oqa = [{"video_name": "a", "question": "When does the circle appear?", "answer": "at 1.5 s",
            "question_type": "appear_time"},
           {"video_name": "b", "question": "What is shown?", "answer": "a circle"}]
    (d / "mv.json").write_text(json.dumps(mv))
    (d / "oqa.jsonl").write_text("\n".join(json.dumps(x) for x in oqa))
    r = _run("eval", [f"--workdir={d / 'ckpt'}", f"--tokenizer={tok}", f"--data={d / 'mv.json'}",
                      f"--out={tmp_path / 'mv.json'}", "--batch_size=2", "--max_new_tokens=3", "--noprogress",
                      "--max_bad_fraction=0.5"], env)  # 1 of 2 unreadable: allowed here
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "mv.json").read_text())
    assert rep["accuracy"]["task/colour"]["n"] == 1 and rep["accuracy"]["kind/multiple_choice"]["n"] == 1
    assert rep["evaluated"] == 1 and rep["skipped_unreadable"] == 1  # the missing video is skipped and counted
    r = _run("eval", [f"--workdir={d / 'ckpt'}", f"--tokenizer={tok}", f"--data={d / 'oqa.jsonl'}",
                      "--video_ext=.mp4", f"--out={tmp_path / 'oqa.json'}", "--batch_size=2", "--max_new_tokens=3",
                      "--noprogress"], env)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "oqa.json").read_text())
    assert rep["evaluated"] == 2 and rep["timestamp"]["n"] == 1 and rep["accuracy"]["kind/open"]["n"] == 1
    assert "timestamps within 0.5 s" in r.stdout  # the default tolerance


def test_eval_refuses_a_missing_file_and_a_non_checkpoint(converted, tmp_path):
    d, tok, env = converted
    _one_error_line(_run("eval", [f"--workdir={d / 'ckpt'}", f"--tokenizer={tok}", "--data=/no/such.json"], env),
                    "/no/such.json")
    _one_error_line(_run("eval", [f"--workdir={tmp_path}"], env), "not a vjax checkpoint")


@pytest.mark.parametrize("bad,good", [(3, 0), (7, 6)], ids=["all_unreadable", "7_of_13_unreadable"])
def test_eval_fails_when_too_few_records_were_evaluated(converted, tmp_path, bad, good):
    """Whatever the number of records: nothing evaluated, or more than --max_bad_fraction unreadable, is exit 2
    with one line (the per-record check only starts after 20 records)."""
    d, tok, env = converted
    recs = [{"video": f"missing_{i}.mp4", "question": "What colour?", "answer": "red"} for i in range(bad)]
    recs += [{"video": str(d / "a.mp4"), "question": "What colour?", "answer": "red"} for _ in range(good)]
    (tmp_path / "qa.json").write_text(json.dumps(recs[::2] + recs[1::2]))  # bad and good interleaved
    r = _run("eval", [f"--workdir={d / 'ckpt'}", f"--tokenizer={tok}", f"--data={tmp_path / 'qa.json'}",
                      f"--out={tmp_path / 'report.json'}", "--batch_size=8", "--max_new_tokens=1", "--noprogress"], env)
    what = "nothing was evaluated" if not good else "too many bad records (limit 10%)"
    _one_error_line(r, what, f"{bad} of {bad + good} records bad", "missing_0.mp4 (file does not exist)")
    assert not (tmp_path / "report.json").exists()


@pytest.mark.parametrize("name,args,needle", [
    ("chat", ["--question= ", "--video=x.mp4"], "--question is empty"),
    ("chat", ["--vidoe=x.mp4"], "Unknown command line flag 'vidoe'"),
    ("eval", ["--max_bad_fraction=2"], "--max_bad_fraction must be in [0, 1]"),
    ("chat", ["--step=3", "--video=x.mp4"], "is a converted checkpoint, which has no steps: leave out step (3)"),
], ids=["empty_question", "chat_unknown_flag", "eval_bad_fraction", "converted_has_no_step"])
def test_usage_errors_exit_2_in_one_line(converted, name, args, needle, tmp_path):
    d, tok, env = converted
    data = [f"--data={tmp_path / 'none.json'}"] if name == "eval" else []  # never the default synthetic set
    r = _run(name, [f"--workdir={d / 'ckpt'}", f"--tokenizer={tok}", *data, *args], env)
    _one_error_line(r, needle)
    assert r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr


def test_scoring_per_task_kind_and_timestamp():
    recs = [
        {"id": 1, "question_type": "colour", "choices": ["red", "blue"], "answer_index": 1, "answer": "blue",
         "conversations": [{"from": "human", "value": "<video>\nQ"}]},
        {"id": 2, "question_type": "colour", "answer": "red", "conversations": [{"from": "human", "value": "Q"}]},
        {"id": 3, "question_type": "appear_time", "answer": "at 2.5 s",
         "conversations": [{"from": "human", "value": "Q"}]},
        {"id": 4, "question_type": "appear_time", "answer": "at 4 s", "conversations": [{"from": "human", "value": "Q"}]},
    ]
    rep = eval_cmd.summarize(recs, ["(B)", "The Red.", "at 2.0 s", "soon"], tolerance=1.0)
    acc = rep["accuracy"]
    # option letter; normalised exact match; chance: a random letter of two, the one open answer
    assert acc["task/colour"] == {"accuracy": 1.0, "n": 2, "chance": 0.75}
    assert acc["kind/multiple_choice"]["n"] == 1 and acc["kind/open"]["n"] == 1
    assert acc["kind/timestamp"] == {"accuracy": 0.0, "n": 2, "chance": 0.5}  # neither is an exact match ...
    assert rep["timestamp"]["within_tolerance"] == 0.5  # ... but 2.0 s is within 1 s of 2.5 s
    assert rep["timestamp"]["mean_abs_error_s"] == 0.5 and rep["timestamp"]["answers_without_time"] == 1
    # chance level: 2.5 s and 4 s are 1.5 s apart, so one constant answer is within 1 s of only one of them
    assert rep["timestamp"]["best_constant_s"] == 2.5 and rep["timestamp"]["best_constant_within"] == 0.5
    wide = eval_cmd.summarize(recs, ["(B)", "The Red.", "at 2.0 s", "soon"], tolerance=1.5)["timestamp"]
    assert wide["best_constant_within"] == 1.0  # within 1.5 s, "2.5 s" covers both
    assert acc["all"] == {"accuracy": 0.5, "n": 4, "chance": 0.625}  # (1/2 + 1 + 1) / 4
    cross = rep["task_by_kind"]
    assert cross["colour"] == {"multiple_choice": {"accuracy": 1.0, "n": 1, "chance": 0.5},
                               "open": {"accuracy": 1.0, "n": 1, "chance": 1.0}}
    assert cross["appear_time"] == {"timestamp": {"accuracy": 0.0, "n": 2, "chance": 0.5}}
    lines = eval_cmd.table(rep).splitlines()
    assert "chance level: answering 2.5 s to every one scores 0.500" in [line.strip() for line in lines]
    colour = next(line for line in lines if line.startswith("colour "))
    assert colour.split() == ["colour", "1.000", "[0.50]", "(", "1)", "1.000", "[1.00]", "(", "1)", "-"]


def test_scoring_per_object_count_of_the_clip():
    recs = [{"id": i, "question_type": t, "answer": "red", "num_objects": n,
             "conversations": [{"from": "human", "value": "Q"}]}
            for i, (t, n) in enumerate([("colour", 1), ("colour", 1), ("colour", 3), ("shape", 2)])]
    rep = eval_cmd.summarize(recs, ["red", "red", "blue", "red"])
    assert rep["task_by_objects"] == {"colour": {"1": {"accuracy": 1.0, "n": 2, "chance": 1.0},
                                                 "3": {"accuracy": 0.0, "n": 1, "chance": 1.0}},
                                      "shape": {"2": {"accuracy": 1.0, "n": 1, "chance": 1.0}}}
    assert [row["num_objects"] for row in rep["predictions"]] == [1, 1, 3, 2]
    lines = eval_cmd.table(rep).splitlines()
    header = next(line for line in lines if line.startswith("objects in the clip"))
    assert header.split()[-3:] == ["1", "2", "3"]
    colour = [line for line in lines if line.startswith("colour ")][-1]
    assert colour.split() == ["colour", "1.000", "[1.00]", "(", "2)", "-", "0.000", "[1.00]", "(", "1)"]
    # records without the field (real annotation files) get no such section
    plain = eval_cmd.summarize([{k: v for k, v in r.items() if k != "num_objects"} for r in recs], ["red"] * 4)
    assert "task_by_objects" not in plain and "objects in the clip" not in eval_cmd.table(plain)


def test_synthetic_records_carry_the_object_count_of_their_clip(tmp_path):
    cfg = SyntheticConfig(seed=3, num_train=0, num_val=1, num_test=6, long_every=0, questions_per_clip=20,
                          show_progress=False)
    paths = ensure_synthetic_dataset(tmp_path / "set", cfg)
    recs = eval_cmd.synthetic_records(paths, "test")
    assert recs and all(os.path.isabs(r["video"]) and os.path.exists(r["video"]) for r in recs)
    counts = [r for r in recs if r["question_type"] == "count"]
    assert len(counts) == 6  # every clip is asked its object count: the generator's answer must agree
    for r in counts:
        assert r["answer"] == NUMBER_WORDS[r["num_objects"]], r
    assert {r["num_objects"] for r in recs} <= {1, 2, 3}
    # a record whose clip is not in the ground truth is named, not given a count
    rows = Path(paths.annotations["test"]).read_text().splitlines()
    stray = json.loads(rows[0]) | {"video": "videos/test/999999.mp4"}
    (tmp_path / "test.jsonl").write_text("\n".join([json.dumps(stray), *rows[1:]]) + "\n")
    bad = dataclasses.replace(paths, annotations={**paths.annotations, "test": str(tmp_path / "test.jsonl")})
    with pytest.raises(ValueError, match="999999.mp4"):
        eval_cmd.synthetic_records(bad, "test")


@pytest.mark.parametrize("frames", [24, 8], ids=["4_frames", "2_of_4_frames"])
def test_each_chat_turn_equals_a_fresh_prefill_of_the_conversation(converted, frames, tmp_path):
    """The invariant behind "the count question got 'two' after other turns, 'one' alone": every turn of an
    interactive chat (the KV cache kept, only the new text written) produces exactly the tokens that greedy
    decoding of the whole conversation so far, prefilled afresh with the video, produces. (A question asked
    after other turns is a different prompt from the same question asked alone: its answer may differ.)"""
    from experiments.chat import Chat  # noqa: PLC0415
    from vjax.generate import generate  # noqa: PLC0415

    d, tok, _ = converted
    video = tmp_path / "clip.mp4"  # 8 frames at 8 fps: the sampler finds 2 of the model's 4 frames
    write_mp4(str(video), np.random.default_rng(frames).integers(0, 255, (frames, 48, 48, 3), dtype=np.uint8), fps=8)
    run = config.load_run(d / "ckpt", tokenizer=str(tok))
    chat = Chat(run, max_new_tokens=6)
    chat.load_video(str(video))
    said, prefills = [], []
    respond, prefill = chat.session.respond, chat.session._prefill
    chat.session.respond = lambda *a, **k: said.append(respond(*a, **k)) or said[-1]
    chat.session._prefill = lambda *a: prefills.append(1) or prefill(*a)
    stops = set(chat.sampling.eos_token_ids)
    for question in ["What colour is the circle?", "How many objects?", "How many objects?"]:
        batch = chat.format(chat._conversation(question), chat._frames, chat._audio)  # the whole conversation
        visual = {k: np.asarray(batch[k])[None] for k in config.VISUAL_BATCH_KEYS if k in batch}
        fresh = np.asarray(generate(run.module, run.params, np.asarray(batch["input_ids"])[None],
                                    prefill_inputs=visual, config=chat.sampling).tokens[0]).tolist()
        end = next((i + 1 for i, t in enumerate(fresh) if t in stops), len(fresh))
        chat.ask(question)
        assert said[-1] == fresh[:end], (question, len(chat.history))
    assert len(chat.history) == 3 and len(prefills) == 1  # turns 2 and 3 only wrote their text into the cache
