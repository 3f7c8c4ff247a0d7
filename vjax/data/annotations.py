"""Annotation formats -> one record shape: ``{"id", "video", "conversations", ...}`` with absolute paths.

* JSON / JSONL conversations (LLaVA / VideoInstruct-100K / Video-ChatGPT style): each record has a
  ``video`` path and ``conversations`` = ``[{"from": "human"|"gpt", "value": str}, ...]``.
* WebVid-style CSV (``videoid``, ``name`` = caption, optional ``page_dir``): one caption record each.
* MVBench-style multiple choice JSON (``video``, ``question``, ``candidates``, ``answer``).
* Open-ended QA JSON/JSONL (MSVD-QA / MSRVTT-QA style: ``video``, ``question``, ``answer``).
* SRT / WebVTT subtitles -> :class:`Cue` (start, end seconds, text).

Unreadable lines / entries are skipped, counted in a :class:`~vjax.data.validate.SkipLog` (logged
once with ``file:line``), and a file whose bad fraction passes ``max_bad_fraction`` raises
:class:`~vjax.data.validate.TooManyBadRecords`.
"""

from __future__ import annotations

import bisect
import csv
import json
import os
import random
import re
from typing import Any, NamedTuple, Sequence

from vjax.data.validate import SkipLog

VIDEO_TOKEN = "<video>"
ROLES = ("human", "gpt", "system")


def _resolve(video: str, root: str) -> str:
    return video if os.path.isabs(video) else os.path.normpath(os.path.join(root, video))


def _check_record(rec: Any) -> str | None:
    """Reason a conversation record is malformed, or None."""
    if not isinstance(rec, dict):
        return f"record is a {type(rec).__name__}, not an object"
    if not isinstance(rec.get("video"), str) or not rec["video"]:
        return "missing 'video' path"
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        return "missing 'conversations' list"
    for turn in conv:
        if not (isinstance(turn, dict) and turn.get("from") in ROLES and isinstance(turn.get("value"), str)):
            return f"bad conversation turn {turn!r:.80}"
    return None


def load_conversations(
    path: str | os.PathLike,
    video_root: str | os.PathLike | None = None,
    max_bad_fraction: float = 0.1,
    skips: SkipLog | None = None,
) -> list[dict]:
    """Read a ``.json`` (a list) or ``.jsonl`` (one object a line) file of conversation records.

    ``video`` paths are made absolute against ``video_root`` (default: the annotation file's folder);
    ``subtitles`` paths likewise. Records without an ``id`` get ``"<file stem>:<line>"``. Malformed
    lines are skipped and counted.
    """
    p = os.fspath(path)
    root = os.fspath(video_root) if video_root is not None else os.path.dirname(os.path.abspath(p))
    log = skips if skips is not None else SkipLog(max_bad_fraction)
    stem = os.path.splitext(os.path.basename(p))[0]
    with open(p, encoding="utf-8") as f:
        text = f.read()
    items: list[tuple[int, Any]] = []
    if p.endswith(".jsonl"):
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append((n, json.loads(line)))
            except ValueError as err:
                log.skip(f"{p}:{n}", f"invalid JSON ({err.msg})")
    else:
        try:
            data = json.loads(text)
        except ValueError as err:
            raise ValueError(f"{p} is not valid JSON: {err}") from None
        if not isinstance(data, list):
            raise ValueError(f"{p} must hold a JSON list of records, got {type(data).__name__}")
        items = list(enumerate(data, start=1))
    out = []
    for n, rec in items:
        reason = _check_record(rec)
        if reason is not None:
            log.skip(f"{p}:{n}", reason)
            continue
        rec = dict(rec)
        rec.setdefault("id", f"{stem}:{n}")
        rec["video"] = _resolve(rec["video"], root)
        if isinstance(rec.get("subtitles"), str):
            rec["subtitles"] = _resolve(rec["subtitles"], root)
        log.ok()
        out.append(rec)
    log.check()
    return out


_PER_QUESTION = ("id", "question_type", "question", "answer", "choices", "answer_index", "conversations")


def merge_turns(records: Sequence[dict], max_turns: int, seed: int = 0) -> list[dict]:
    """Join single-question records about the same clip into multi-turn conversations.

    Records with one human and one gpt turn that share ``video`` and ``subtitles`` are shuffled (seeded by
    ``seed``) and chunked into conversations of up to ``max_turns`` question/answer pairs, the way
    instruction sets such as VideoInstruct-100K hold several questions per video: one forward pass then
    supervises every answer while the clip is decoded and encoded once. A ``<video>`` marker stays on the
    first human turn only; per-question keys (``answer``, ``choices``, ``answer_index``) are dropped
    and ``question_type`` becomes the list ``question_types``. Other records (several turns already, or
    no video) are kept unchanged, where they stood. ``max_turns=1`` returns a copy of ``records``.
    """
    if not isinstance(max_turns, int) or isinstance(max_turns, bool) or max_turns < 1:
        raise ValueError(f"max_turns must be a positive int, got {max_turns!r}")
    if max_turns == 1:
        return list(records)

    def single(rec: dict) -> bool:
        conv = rec.get("conversations") or []
        return (isinstance(rec.get("video"), str) and len(conv) == 2 and conv[0].get("from") == "human"
                and conv[1].get("from") == "gpt")

    groups: dict[tuple, list[dict]] = {}
    order: list[Any] = []  # a group key, or a record kept as it is
    for rec in records:
        if not single(rec):
            order.append(rec)
            continue
        key = (rec.get("video"), rec.get("subtitles"))
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(rec)
    rng = random.Random(seed)
    out: list[dict] = []
    for item in order:
        if isinstance(item, dict):
            out.append(item)
            continue
        recs = groups[item]
        rng.shuffle(recs)
        for s in range(0, len(recs), max_turns):
            chunk = recs[s: s + max_turns]
            if len(chunk) == 1:
                out.append(chunk[0])
                continue
            merged = {k: v for k, v in chunk[0].items() if k not in _PER_QUESTION}
            merged["id"] = "+".join(str(r.get("id")) for r in chunk)
            merged["question_types"] = [r.get("question_type") for r in chunk]
            conv = []
            for i, r in enumerate(chunk):
                human, gpt = r["conversations"]
                q = human["value"] if i == 0 else human["value"].replace(VIDEO_TOKEN, "").strip()
                conv += [{"from": "human", "value": q}, dict(gpt)]
            merged["conversations"] = conv
            out.append(merged)
    return out


def load_webvid_csv(
    path: str | os.PathLike,
    video_root: str | os.PathLike,
    path_template: str = "{videoid}.mp4",
    prompt: str = "Describe this video.",
    max_bad_fraction: float = 0.1,
    skips: SkipLog | None = None,
) -> list[dict]:
    """WebVid-style CSV (columns ``videoid``, ``name`` = caption, others such as ``page_dir``) ->
    caption records ``{"id", "video", "caption", "conversations": [human "<video>\\n" + prompt, gpt
    caption]}``. ``path_template`` formats the row's columns into the video path under
    ``video_root`` (WebVid-2.5M's usual layout is ``"{page_dir}/{videoid}.mp4"``)."""
    p = os.fspath(path)
    log = skips if skips is not None else SkipLog(max_bad_fraction)
    out = []
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"videoid", "name"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{p}: CSV header lacks column(s) {sorted(missing)}; has {reader.fieldnames}")
        for n, row in enumerate(reader, start=2):
            caption = (row.get("name") or "").strip()
            vid = (row.get("videoid") or "").strip()
            if not caption or not vid:
                log.skip(f"{p}:{n}", "empty videoid or caption")
                continue
            try:
                rel = path_template.format(**row)
            except (KeyError, IndexError) as err:
                log.skip(f"{p}:{n}", f"path_template needs column {err}")
                continue
            log.ok()
            out.append({
                "id": vid, "video": _resolve(rel, os.fspath(video_root)), "caption": caption,
                "conversations": [{"from": "human", "value": f"{VIDEO_TOKEN}\n{prompt}"},
                                  {"from": "gpt", "value": caption}],
            })
    log.check()
    return out


# How a multiple-choice answer is written. "letter": the option's letter, then its text, "(B) square" (MVBench's
# style: what the released models answer). "text_letter": the text, then the letter, "square (B)": a model
# decides the answer by writing its text and then copies the letter from the options list (the synthetic
# set's ``mc_answer``, for models too small to map an answer to its letter in the same step).
MC_ANSWER_STYLES = ("letter", "text_letter")
_MC_INSTRUCTIONS = {"letter": "Answer with the option's letter from the given choices directly.",
                    "text_letter": "Answer with the option's text, then its letter."}


def check_mc_style(style: str) -> str:
    """``style`` if it is one of :data:`MC_ANSWER_STYLES`, else a ``ValueError`` naming it."""
    if style not in MC_ANSWER_STYLES:
        raise ValueError(f"multiple-choice answer style {style!r} is not one of {MC_ANSWER_STYLES}")
    return style


def option_answer(choices: Sequence[str], index: int, style: str = "letter") -> str:
    """The answer a multiple-choice record is trained on for option ``index``: ``"(B) square"``, or
    ``"square (B)"`` in the ``"text_letter"`` style (:data:`MC_ANSWER_STYLES`)."""
    letter = f"({chr(65 + index)})"
    return f"{choices[index]} {letter}" if check_mc_style(style) == "text_letter" else f"{letter} {choices[index]}"


def mc_answer_style(answer: str, choices: Sequence[str]) -> str:
    """The style a record's multiple-choice ``answer`` is written in: ``"text_letter"`` when it ends with an
    option's letter in parentheses after that option's text, else ``"letter"``."""
    m = re.fullmatch(r"(.*)\s\(([A-Z])\)", answer.strip(), re.S)
    if m and 0 <= ord(m.group(2)) - 65 < len(choices) and m.group(1).strip() == str(choices[ord(m.group(2)) - 65]):
        return "text_letter"
    return "letter"


def format_multiple_choice(question: str, choices: Sequence[str], style: str = "letter") -> str:
    """``"{question}\\nOptions:\\n(A) c0\\n(B) c1 ...\\nAnswer with the option's letter from the given
    choices directly."`` — the MVBench-style prompt the synthetic set also uses; the ``"text_letter"`` style
    ends with "Answer with the option's text, then its letter." instead."""
    if not 2 <= len(choices) <= 26:
        raise ValueError(f"need 2-26 choices, got {len(choices)}")
    opts = "\n".join(f"({chr(65 + i)}) {c}" for i, c in enumerate(choices))
    return f"{question}\nOptions:\n{opts}\n{_MC_INSTRUCTIONS[check_mc_style(style)]}"


def load_mvbench(
    path: str | os.PathLike,
    video_root: str | os.PathLike,
    max_bad_fraction: float = 0.1,
    skips: SkipLog | None = None,
) -> list[dict]:
    """MVBench-style JSON list of ``{"video", "question", "candidates", "answer"}`` -> records with
    ``choices``, ``answer``, ``answer_index`` and a conversation whose answer is ``"(X) answer"``.
    Extra keys (``start``/``end`` of a segment, ``accurate_start``...) are kept."""
    p = os.fspath(path)
    log = skips if skips is not None else SkipLog(max_bad_fraction)
    with open(p, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{p} must hold a JSON list, got {type(data).__name__}")
    out = []
    stem = os.path.splitext(os.path.basename(p))[0]
    for n, item in enumerate(data, start=1):
        ok = (isinstance(item, dict) and isinstance(item.get("video"), str)
              and isinstance(item.get("question"), str) and isinstance(item.get("candidates"), list)
              and len(item["candidates"]) >= 2 and item.get("answer") in item["candidates"])
        if not ok:
            log.skip(f"{p}:{n}", "needs video, question, >=2 candidates and an answer among them")
            continue
        choices = [str(c) for c in item["candidates"]]
        ai = choices.index(str(item["answer"]))
        rec = {k: v for k, v in item.items() if k != "candidates"}
        rec.update(
            id=item.get("id", f"{stem}:{n}"), video=_resolve(item["video"], os.fspath(video_root)),
            choices=choices, answer=choices[ai], answer_index=ai, question_type=item.get("question_type", "mc"),
            conversations=[
                {"from": "human", "value": f"{VIDEO_TOKEN}\n" + format_multiple_choice(item["question"], choices)},
                {"from": "gpt", "value": option_answer(choices, ai)},
            ],
        )
        log.ok()
        out.append(rec)
    log.check()
    return out


def load_open_qa(
    path: str | os.PathLike,
    video_root: str | os.PathLike | None = None,
    video_ext: str = "",
    max_bad_fraction: float = 0.1,
    skips: SkipLog | None = None,
) -> list[dict]:
    """Open-ended video QA (MSVD-QA / MSRVTT-QA / ActivityNet-QA style): a JSON list or JSONL of
    ``{"video" | "video_name" | "video_id", "question", "answer"}`` (``question_id`` / ``id`` and
    ``question_type`` kept) -> conversation records. ``video_ext`` is appended to names without one
    (``".avi"`` for MSVD); paths resolve against ``video_root`` (default: the file's folder)."""
    p = os.fspath(path)
    root = os.fspath(video_root) if video_root is not None else os.path.dirname(os.path.abspath(p))
    log = skips if skips is not None else SkipLog(max_bad_fraction)
    with open(p, encoding="utf-8") as f:
        text = f.read()
    if p.endswith(".jsonl"):
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"{p} must hold a JSON list of questions, got {type(data).__name__}")
    stem = os.path.splitext(os.path.basename(p))[0]
    out = []
    for n, item in enumerate(data, start=1):
        video = next((item.get(k) for k in ("video", "video_name", "video_id") if isinstance(item, dict)
                      and item.get(k) not in (None, "")), None) if isinstance(item, dict) else None
        if video is None or not isinstance(item.get("question"), str) or item.get("answer") in (None, ""):
            log.skip(f"{p}:{n}", "needs video (or video_name / video_id), question and answer")
            continue
        video = str(video)
        if video_ext and not os.path.splitext(video)[1]:
            video += video_ext
        rec = dict(item)
        rec.update(id=str(item.get("id", item.get("question_id", f"{stem}:{n}"))), video=_resolve(video, root),
                   answer=str(item["answer"]), question_type=str(item.get("question_type", "open")),
                   conversations=[{"from": "human", "value": f"{VIDEO_TOKEN}\n{item['question']}"},
                                  {"from": "gpt", "value": str(item["answer"])}])
        log.ok()
        out.append(rec)
    log.check()
    return out


# ---------------------------------------------------------------------------------------------
# Subtitles
# ---------------------------------------------------------------------------------------------


class Cue(NamedTuple):
    """One subtitle cue: ``start``/``end`` in seconds, ``text`` (lines joined with a space)."""

    start: float
    end: float
    text: str


_TIME = re.compile(
    r"(?:(\d+):)?(\d{1,2}):(\d{2})[,.](\d{1,3})\s*-->\s*(?:(\d+):)?(\d{1,2}):(\d{2})[,.](\d{1,3})")


def _seconds(h, m, s, frac) -> float:
    return int(h or 0) * 3600 + int(m) * 60 + int(s) + int(frac.ljust(3, "0")) / 1000.0


def _parse_blocks(text: str) -> list[Cue]:
    cues = []
    for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")):
        lines = [l.strip() for l in block.strip().split("\n") if l.strip()]
        for i, line in enumerate(lines):
            m = _TIME.search(line)
            if m:
                g = m.groups()
                body = " ".join(re.sub(r"<[^>]+>", "", l) for l in lines[i + 1:]).strip()
                if body:
                    cues.append(Cue(_seconds(*g[:4]), _seconds(*g[4:]), body))
                break
    return sorted(cues, key=lambda c: (c.start, c.end))


def parse_srt(text: str) -> list[Cue]:
    """Parse SRT text (``1\\n00:00:01,000 --> 00:00:02,500\\ntext``) -> cues sorted by start."""
    return _parse_blocks(text)


def parse_vtt(text: str) -> list[Cue]:
    """Parse WebVTT text (``WEBVTT`` header, ``00:01.000 --> 00:02.500 align:start``, optional cue ids,
    NOTE/STYLE blocks, inline ``<c>`` tags stripped) -> cues sorted by start."""
    body = text.lstrip("\ufeff")
    if not body.startswith("WEBVTT"):
        raise ValueError("not a WebVTT file: missing 'WEBVTT' header")
    return _parse_blocks(body)


def load_subtitles(path: str | os.PathLike) -> list[Cue]:
    """Read a ``.srt`` or ``.vtt`` file by extension -> cues."""
    p = os.fspath(path)
    ext = os.path.splitext(p)[1].lower()
    if ext not in (".srt", ".vtt"):
        raise ValueError(f"unknown subtitle format for {p!r}: expected .srt or .vtt")
    with open(p, encoding="utf-8-sig") as f:
        text = f.read()
    return parse_vtt(text) if ext == ".vtt" else parse_srt(text)


def release_ms(seconds: float) -> int:
    """A cue time as MiniGPT4-video's inference script reads it: ``int((h * 3600 + m * 60 + s) * 1000)`` of
    ``hh:mm:ss.mmm`` in float arithmetic, truncated (so ``00:00:01.001`` reads as 1000 ms).

    >>> release_ms(1.001), release_ms(1.5), release_ms(3723.004)
    (1000, 1500, 3723004)
    """
    total = int(round(seconds * 1000))
    h, rest = divmod(total, 3_600_000)
    m, rest = divmod(rest, 60_000)
    return int((h * 3600 + m * 60 + rest / 1000) * 1000)


def _release_cue_at(cues_ms: Sequence[tuple[int, int, str]], t_ms: float) -> str | None:
    """The release's binary search for the cue of one frame: a cue covers ``start <= t <= end`` (both ends
    inclusive); the search moves left when ``t < start`` and right otherwise."""
    lo, hi = 0, len(cues_ms) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        start, end, text = cues_ms[mid]
        if start <= t_ms <= end:
            return text
        if t_ms < start:
            hi = mid - 1
        else:
            lo = mid + 1
    return None


def minigpt4_video_subtitles(cues: Sequence[Cue], frame_indices: Sequence[int], fps: float,
                             max_words: int = 400) -> list[str | None]:
    """The subtitle text shown after each sampled frame, by the rules of MiniGPT4-video's inference script
    (``minigpt4_video_inference.py``: ``match_frames_and_subtitles``).

    The release decodes every frame from the first up to the last sampled one; for each decoded frame ``k``
    (time ``k / fps * 1000`` ms) it looks up the cue covering it (:func:`release_ms` times, both ends
    inclusive) and, if that text was not shown before in this video, appends ``text + " "`` to a buffer. At
    each sampled frame the buffer is shown (and emptied) if it is not empty and fewer than ``max_words``
    words were shown so far (400 for Llama-2, 800 for Mistral); the count then grows by
    ``len(buffer.split(" "))`` (the trailing space counts one). Once the cap is reached no later frame gets
    a subtitle. A repeated index (a clip padded with its last frame) decodes nothing new: its entry is None,
    as the release's padded frames carry no subtitle.

    Returns one entry per ``frame_indices`` entry: the text (with its trailing space) or None.

    >>> cues = [Cue(0.0, 1.0, "Hi."), Cue(1.2, 2.0, "Bye now."), Cue(2.5, 3.0, "Hi.")]
    >>> minigpt4_video_subtitles(cues, [0, 2, 4, 6], fps=2.0)   # frames at 0, 1, 2, 3 s; 0.5 s decoded too
    ['Hi. ', None, 'Bye now. ', None]
    """
    cues_ms = [(release_ms(c.start), release_ms(c.end), c.text) for c in cues]
    shown: set[str] = set()
    buffer, words, next_frame, out = "", 0, 0, []
    for idx in frame_indices:
        for k in range(next_frame, int(idx) + 1):
            text = _release_cue_at(cues_ms, k / fps * 1000) if cues_ms else None
            if text and text not in shown:
                buffer += text + " "
                shown.add(text)
        next_frame = max(next_frame, int(idx) + 1)
        if buffer and words < max_words:
            out.append(buffer)
            words += len(buffer.split(" "))
            buffer = ""
        else:
            out.append(None)
    return out


def cues_at(cues: Sequence[Cue], t: float) -> list[Cue]:
    """The cues covering time ``t`` seconds (start <= t < end), as MiniGPT4-video looks up the
    subtitle of each decoded frame."""
    starts = [c.start for c in cues]
    hi = bisect.bisect_right(starts, t)
    return [c for c in cues[:hi] if c.end > t]
