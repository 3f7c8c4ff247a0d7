"""Annotation formats: conversations JSON/JSONL, WebVid CSV, MVBench multiple choice, SRT/VTT."""

import json

import pytest

from vjax.data import annotations as A
from vjax.data.validate import TooManyBadRecords

CONV = [{"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "A dog runs."}]


def test_json_list_and_relative_paths(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([
        {"id": "x", "video": "clips/x.mp4", "conversations": CONV},
        {"video": "/abs/y.mp4", "conversations": CONV, "subtitles": "subs/y.srt"},
    ]))
    recs = A.load_conversations(tmp_path / "a.json")
    assert [r["id"] for r in recs] == ["x", "a:2"]
    assert recs[0]["video"] == str(tmp_path / "clips" / "x.mp4")
    assert recs[1]["video"] == "/abs/y.mp4" and recs[1]["subtitles"] == str(tmp_path / "subs" / "y.srt")
    assert recs[0]["conversations"] == CONV
    recs = A.load_conversations(tmp_path / "a.json", video_root="/data")
    assert recs[0]["video"] == "/data/clips/x.mp4"


def test_jsonl_skips_bad_lines_and_enforces_fraction(tmp_path):
    good = json.dumps({"video": "v.mp4", "conversations": CONV})
    bad_turn = json.dumps({"video": "v.mp4", "conversations": [{"from": "robot", "value": "x"}]})
    (tmp_path / "a.jsonl").write_text("\n".join([good, "{oops", good, "", bad_turn, "[1, 2]", good]) + "\n")
    with pytest.raises(TooManyBadRecords, match=r"3 of 6 records bad.*a\.jsonl:2 \(invalid JSON"):
        A.load_conversations(tmp_path / "a.jsonl", max_bad_fraction=0.25)
    recs = A.load_conversations(tmp_path / "a.jsonl", max_bad_fraction=0.5)
    assert [r["id"] for r in recs] == ["a:1", "a:3", "a:7"]


def test_webvid_csv(tmp_path):
    (tmp_path / "w.csv").write_text(
        "videoid,contentUrl,duration,page_dir,name\n"
        "1001,http://x/1.mp4,PT00H00M10S,000001_000050,\"A cat, sleeping on a sofa\"\n"
        "1002,http://x/2.mp4,PT00H00M05S,000001_000050,\n"
        "1003,http://x/3.mp4,PT00H00M12S,000051_000100,Waves at sunset\n")
    recs = A.load_webvid_csv(tmp_path / "w.csv", "/webvid", path_template="{page_dir}/{videoid}.mp4",
                             max_bad_fraction=0.5)
    assert [r["id"] for r in recs] == ["1001", "1003"]
    assert recs[0]["video"] == "/webvid/000001_000050/1001.mp4"
    assert recs[0]["caption"] == "A cat, sleeping on a sofa"
    assert recs[1]["conversations"] == [{"from": "human", "value": "<video>\nDescribe this video."},
                                       {"from": "gpt", "value": "Waves at sunset"}]
    (tmp_path / "bad.csv").write_text("id,caption\n1,x\n")
    with pytest.raises(ValueError, match="videoid"):
        A.load_webvid_csv(tmp_path / "bad.csv", "/webvid")


def test_mvbench(tmp_path):
    (tmp_path / "action.json").write_text(json.dumps([
        {"video": "a.mp4", "question": "What is the man doing?", "candidates": ["running", "sitting", "jumping"],
         "answer": "sitting", "start": 1.0, "end": 4.0},
        {"video": "b.mp4", "question": "?", "candidates": ["x", "y"], "answer": "z"},
    ]))
    recs = A.load_mvbench(tmp_path / "action.json", "/mv", max_bad_fraction=0.5)
    assert len(recs) == 1
    r = recs[0]
    assert r["video"] == "/mv/a.mp4" and r["choices"] == ["running", "sitting", "jumping"]
    assert r["answer_index"] == 1 and r["answer"] == "sitting" and r["start"] == 1.0
    assert r["conversations"][0]["value"] == (
        "<video>\nWhat is the man doing?\nOptions:\n(A) running\n(B) sitting\n(C) jumping\n"
        "Answer with the option's letter from the given choices directly.")
    assert r["conversations"][1]["value"] == "(B) sitting"


SRT = """1
00:00:01,000 --> 00:00:02,500
Hello <i>there</i>

2
00:00:02,500 --> 00:00:04,000
Second cue
on two lines

3
01:02:03,040 --> 01:02:04,000
Late
"""

VTT = """WEBVTT
Kind: captions

NOTE this is a comment

intro
00:01.000 --> 00:02.500 align:start position:0%
Hello <c.colorE5E5E5>there</c>

00:00:02.500 --> 00:00:04.000
Second cue
on two lines
"""


def test_srt_and_vtt():
    srt = A.parse_srt(SRT)
    assert srt == [A.Cue(1.0, 2.5, "Hello there"), A.Cue(2.5, 4.0, "Second cue on two lines"),
                   A.Cue(3723.04, 3724.0, "Late")]
    assert A.parse_vtt(VTT) == srt[:2]
    with pytest.raises(ValueError, match="WEBVTT"):
        A.parse_vtt(SRT)
    assert [c.text for c in A.cues_at(srt, 2.5)] == ["Second cue on two lines"]
    assert A.cues_at(srt, 0.5) == [] and A.cues_at(srt, 1.0)[0].text == "Hello there"


def test_load_subtitles_by_extension(tmp_path):
    (tmp_path / "a.srt").write_text(SRT)
    (tmp_path / "a.vtt").write_text(VTT)
    assert len(A.load_subtitles(tmp_path / "a.srt")) == 3 and len(A.load_subtitles(tmp_path / "a.vtt")) == 2
    with pytest.raises(ValueError, match=r"\.srt or \.vtt"):
        A.load_subtitles(tmp_path / "a.txt")


def _qa(i, video, q, a, **extra):
    return {"id": f"q{i}", "video": video, "question_type": f"t{i}", "answer": a,
            "conversations": [{"from": "human", "value": f"<video>\n{q}"}, {"from": "gpt", "value": a}], **extra}


def test_merge_turns_joins_a_clips_questions_into_conversations():
    recs = [_qa(0, "/v/a.mp4", "Q0", "A0"), _qa(1, "/v/b.mp4", "Q1", "A1"), _qa(2, "/v/a.mp4", "Q2", "A2"),
            _qa(3, "/v/a.mp4", "Q3", "A3", choices=["x", "A3"], answer_index=1),
            {"id": "multi", "video": "/v/c.mp4", "conversations": [
                {"from": "human", "value": "<video>\nM0"}, {"from": "gpt", "value": "N0"},
                {"from": "human", "value": "M1"}, {"from": "gpt", "value": "N1"}]},
            _qa(5, "/v/a.mp4", "Q5", "A5", subtitles="/v/a.srt")]
    out = A.merge_turns(recs, 2, seed=3)
    assert out == A.merge_turns(recs, 2, seed=3)  # seeded
    by_video = {}
    for r in out:
        by_video.setdefault((r["video"], r.get("subtitles")), []).append(r)
    # a.mp4 (no subtitles): 3 questions -> a 2-turn and a 1-turn record; b.mp4 and a.mp4 + srt stay single
    a = by_video[("/v/a.mp4", None)]
    assert sorted(len(r["conversations"]) for r in a) == [2, 4]
    asked = []
    for r in a:
        conv = r["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert conv[0]["value"].startswith("<video>\n") and all("<video>" not in t["value"] for t in conv[1:])
        pairs = [(conv[i]["value"].replace("<video>\n", ""), conv[i + 1]["value"]) for i in range(0, len(conv), 2)]
        asked += pairs
        if len(conv) == 4:
            assert "choices" not in r and "answer" not in r and len(r["question_types"]) == 2
            assert r["id"].count("+") == 1
    assert sorted(asked) == [("Q0", "A0"), ("Q2", "A2"), ("Q3", "A3")]  # every question once, answer with it
    assert by_video[("/v/a.mp4", "/v/a.srt")] == [recs[5]] and by_video[("/v/b.mp4", None)] == [recs[1]]
    assert by_video[("/v/c.mp4", None)] == [recs[4]]  # already a conversation: unchanged
    assert A.merge_turns(recs, 1) == recs
    with pytest.raises(ValueError, match="max_turns must be a positive int, got 0"):
        A.merge_turns(recs, 0)


def test_merged_conversation_supervises_every_answer():
    from vjax.data import formats, templates

    recs = A.merge_turns([_qa(0, "/v/a.mp4", "What colour?", "red"), _qa(1, "/v/a.mp4", "What shape?", "circle")], 2)
    history, question, answer = formats.question_answer(recs[0])
    assert len(history) == 1 and {history[0][1], answer} == {"red", "circle"}
    pieces = templates.render("video_chatgpt", question, answer, history=history,
                              context=templates.VisualContext(num_frames=4))
    assert sorted(v for kind, v in pieces if kind == "target") == ["circle</s>", "red</s>"]


# MiniGPT4-video's subtitle rules, as its inference script applies them (minigpt4_video_inference.py,
# match_frames_and_subtitles): every frame up to the last sampled one is decoded; each decoded frame's cue
# (start <= t <= end, in ms) is buffered once per video with a trailing space; a sampled frame shows the
# buffer while fewer than max_words words were shown; the count adds len(buffer.split(" ")).
def test_minigpt4_video_subtitles_collect_between_sampled_frames_once_each():
    cues = [A.Cue(0.0, 0.4, "one"), A.Cue(0.45, 0.55, "two"), A.Cue(0.9, 1.0, "three four"), A.Cue(1.2, 1.5, "one")]
    # fps 10: sampled frames 0, 5, 10, 15 (0 s, 0.5 s, 1.0 s, 1.5 s); frames 1-4, 6-9, 11-14 decoded too
    subs = A.minigpt4_video_subtitles(cues, [0, 5, 10, 15], fps=10.0)
    # frame 5 (0.5 s) shows "two"; frame 9 (0.9 s) buffers "three four", frame 10 (1.0 s, the cue's end:
    # inclusive) adds nothing new; "one" again at 1.2-1.5 s is not shown twice
    assert subs == ["one ", "two ", "three four ", None]


def test_minigpt4_video_subtitles_cue_shorter_than_the_sampling_interval_is_kept():
    # a 0.1 s cue between two sampled frames 1 s apart: the release still shows it (it decodes every frame)
    cues = [A.Cue(0.3, 0.4, "quick")]
    assert A.minigpt4_video_subtitles(cues, [0, 30], fps=30.0) == [None, "quick "]
    # the old rule (the cue covering the sampled time, end exclusive) shows nothing at 0 s and 1 s
    assert A.cues_at(cues, 0.0) == [] and A.cues_at(cues, 1.0) == []


def test_minigpt4_video_subtitles_word_cap_and_padding():
    words = " ".join(["w"] * 9)  # 9 words + the trailing space: the count grows by 10 per shown line
    cues = [A.Cue(float(i), i + 0.5, f"{words} {i}") for i in range(6)]
    subs = A.minigpt4_video_subtitles(cues, [0, 25, 50, 75, 100, 100, 100], fps=25.0, max_words=30)
    # shown at 0 (count 11), 1 s (22), 2 s (33: the line that crosses the cap is shown whole), then none;
    # the repeated index 100 (a padded clip) decodes nothing new
    assert [s is not None for s in subs] == [True, True, True, False, False, False, False]
    assert subs[2] == f"{words} 2 "
    unlimited = A.minigpt4_video_subtitles(cues, [0, 25, 50, 75, 100, 100, 100], fps=25.0, max_words=400)
    assert unlimited[3:] == [f"{words} 3 ", f"{words} 4 ", None, None]


def test_release_ms_truncates_like_the_release():
    # int((h * 3600 + m * 60 + float("SS.mmm")) * 1000): 1.001 s is 1000.9999999999999 -> 1000
    assert A.release_ms(1.001) == 1000 and A.release_ms(61.25) == 61250
    cues = [A.Cue(1.001, 2.0, "edge")]
    # the cue starts at 1000 ms as the release reads it, so the frame at exactly 1000 ms (fps 1000) is covered
    assert A.minigpt4_video_subtitles(cues, [1000], fps=1000.0) == ["edge "]
    assert A.minigpt4_video_subtitles(cues, [999], fps=1000.0) == [None]
