"""The tokenizer trained on the set's text, one clip's files, and the whole set with its manifest."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

from vjax.data.synthetic.config import (
    GENERATOR_VERSION,
    SPECIAL_TOKENS,
    SPLITS,
    TEMPLATE_TEXT,
    TEMPLATE_TOKENS,
    SyntheticConfig,
    SyntheticPaths,
)
from vjax.data.synthetic.questions import _make_records, caption_record
from vjax.data.synthetic.render import render_audio, render_frames, write_mp4, write_srt
from vjax.data.synthetic.scene import _clip_rng, _sample_scene


def train_tokenizer(texts: list[str], out_dir: str, vocab_size: int = 1024) -> str:
    """Train a byte-level BPE on ``texts`` and save it as an HF tokenizer directory.

    Specials ``<pad> <s> </s> <unk> <video> <image> <audio>`` get ids 0-6, then the chat-template
    markers in ``TEMPLATE_TOKENS``. Loadable with ``transformers.AutoTokenizer.from_pretrained(out_dir)``.
    Returns ``out_dir``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=list(SPECIAL_TOKENS) + list(TEMPLATE_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(texts) + list(TEMPLATE_TEXT) * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=list(SPECIAL_TOKENS[4:]) + list(TEMPLATE_TOKENS),
    )
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def _paths(root: str) -> SyntheticPaths:
    return SyntheticPaths(
        root=root,
        annotations={s: os.path.join(root, f"{s}.jsonl") for s in SPLITS},
        scenes={s: os.path.join(root, f"scenes_{s}.jsonl") for s in SPLITS},
        tokenizer_dir=os.path.join(root, "tokenizer"),
        manifest=os.path.join(root, "manifest.json"),
    )


def _manifest_valid(paths: SyntheticPaths, cfg: SyntheticConfig) -> bool:
    try:
        with open(paths.manifest, encoding="utf-8") as f:
            man = json.load(f)
    except (OSError, ValueError):
        return False
    if man.get("params_hash") != cfg.params_hash():
        return False
    for rel, size in man.get("files", {}).items():
        p = os.path.join(paths.root, rel)
        if not os.path.isfile(p) or os.path.getsize(p) != size:
            return False
    return bool(man.get("files"))


def generate_clip(cfg: SyntheticConfig, split: str, index: int, root: str) -> tuple[dict, list[dict]]:
    """Generate one clip (mp4 + optional srt) under ``root/videos/<split>/``; returns (scene, records)."""
    scene = _sample_scene(cfg, split, index)
    base = f"videos/{split}/{index:06d}"
    render_seed = int(_clip_rng(cfg, split, index).integers(2**31))
    frames = render_frames(scene, render_seed)
    audio = render_audio(scene, cfg.audio_sample_rate, render_seed + 1)
    write_mp4(os.path.join(root, base + ".mp4"), frames, cfg.fps, audio, cfg.audio_sample_rate, cfg.crf)
    srt_rel = None
    if scene["subtitle"] is not None:
        s = scene["subtitle"]
        duration = scene["num_frames"] / scene["fps"]
        cues = [(0.0, min(0.8, s["start_s"] - 0.1), "Watch closely.")] if s["start_s"] >= 0.5 else []
        cues.append((s["start_s"], s["end_s"], s["text"]))
        if s["end_s"] + 0.3 < duration:
            cues.append((s["end_s"] + 0.1, duration, "That is all."))
        srt_rel = base + ".srt"
        write_srt(os.path.join(root, srt_rel), cues)
    return scene, _make_records(scene, cfg, base + ".mp4", srt_rel)


def default_root(config: SyntheticConfig | None = None) -> str:
    """``~/.cache/vjax/synthetic/<first 12 hex digits of the parameters' hash>``: one directory per set."""
    h = (config or SyntheticConfig()).params_hash()[:12]
    return os.path.join(os.path.expanduser("~/.cache/vjax/synthetic"), h)


def ensure_synthetic_dataset(root: str | os.PathLike, config: SyntheticConfig | None = None) -> SyntheticPaths:
    """Generate the synthetic video-QA set under ``root`` unless a valid one is already there.

    Valid = ``root/manifest.json`` exists, its ``params_hash`` equals ``config.params_hash()`` and every
    listed file exists with the recorded size. Otherwise the set is (re)generated: ``videos/<split>/``,
    ``<split>.jsonl`` (QA records), ``scenes_<split>.jsonl`` (ground truth), ``tokenizer/``, and the
    manifest last. Returns the :class:`SyntheticPaths`.
    """
    cfg = config or SyntheticConfig()
    root = os.path.abspath(os.fspath(root))
    paths = _paths(root)
    if _manifest_valid(paths, cfg):
        return paths
    from tqdm.auto import tqdm

    os.makedirs(root, exist_ok=True)
    if os.path.exists(paths.manifest):
        os.remove(paths.manifest)
    for split in SPLITS:  # remove only what this generator owns
        shutil.rmtree(os.path.join(root, "videos", split), ignore_errors=True)
        os.makedirs(os.path.join(root, "videos", split))
    shutil.rmtree(paths.tokenizer_dir, ignore_errors=True)

    texts: list[str] = []
    total = sum(cfg.num_clips(s) for s in SPLITS)
    bar = tqdm(total=total, desc="synthetic video-QA", unit="clip", disable=not cfg.show_progress)
    for split in SPLITS:
        scenes, records = [], []
        for i in range(cfg.num_clips(split)):
            scene, recs = generate_clip(cfg, split, i, root)
            scenes.append(scene)
            records.extend(recs)
            bar.update(1)
        _write_jsonl(paths.annotations[split], records)
        _write_jsonl(paths.scenes[split], scenes)
        if split == "train":
            for r in records:
                texts.extend(c["value"].replace("<video>\n", "") for c in r["conversations"])
            texts.extend(s["subtitle"]["text"] for s in scenes if s["subtitle"])
    bar.close()
    train_tokenizer(texts, paths.tokenizer_dir, cfg.vocab_size)

    files = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            if rel != "manifest.json" and not name.endswith(".tmp"):
                files[rel] = os.path.getsize(p)
    man = {"params_hash": cfg.params_hash(), "config": dataclasses.asdict(cfg),
           "generator_version": GENERATOR_VERSION, "files": dict(sorted(files.items()))}
    with open(paths.manifest + ".tmp", "w", encoding="utf-8") as f:
        json.dump(man, f, indent=1)
    os.replace(paths.manifest + ".tmp", paths.manifest)
    return paths


def read_scenes(paths: SyntheticPaths, split: str) -> list[dict]:
    """The ground truth of a generated split (``scenes_<split>.jsonl``), one dict per clip in index order."""
    with open(paths.scenes[split], encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def caption_records(paths: SyntheticPaths, split: str = "train") -> list[dict]:
    """One ``caption`` record per clip of a generated split, built from its ground truth (the records that
    ``train_captions`` writes, for a set generated without them): the papers' first-stage video-caption pairs.
    Video paths are relative to the set's root, as in its annotation files."""
    out = []
    for scene in read_scenes(paths, split):
        base = f"videos/{split}/{scene['index']:06d}"
        out.append(caption_record(scene, base + ".mp4", base + ".srt" if scene["subtitle"] is not None else None))
    return out


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(path + ".tmp", path)
