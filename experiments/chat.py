r"""Chat about a video: ``python -m experiments.chat --workdir=DIR --video=FILE [--question=TEXT]``.

    --workdir=DIR        a training run (python -m experiments.train) or a converted checkpoint
                         (python -m experiments.convert --dst=DIR; then also --tokenizer=DIR)
    --video=FILE         any video decord reads
    --question=TEXT      answer once and exit; without it: an interactive multi-turn chat
    --temperature=0 --top_p=1 --top_k=0 --max_new_tokens=256 --seed=0    sampling, as in transformers
                         (temperature 0: greedy)
    --quantize=int8      int8 weights with per-channel scales (vjax.layers.quant), about half of bf16's memory
    --step=N             a training run's checkpoint of step N (default: the newest that restores)

The model, its config, the frame sampler, the chat template and the tokenizer come from the checkpoint's
saved config; frames are preprocessed as the model's release does (``vjax.data.preprocess``; a converted
Qwen2-VL at its native resolution and aspect, with the fps and pixel bounds stored at conversion), and the
preprocessing, the frame count and size and the visual tokens are printed on stderr.
The answer streams token by token. In a multi-turn chat the video is decoded and encoded
once: the first turn prefills the KV cache with it, and each later turn writes only the new text into the
same cache (:class:`vjax.generate.ChatSession`).

MA-LMM streams the whole video (every frame, or ``--stream_fps`` frames per second) through its memory
bank, ``num_frames`` frames at a time, so memory does not grow with the video's length; its Q-Former
reads the first question.

A video that cannot be read, a directory that is not a vjax checkpoint (or none of whose checkpoints
restores), an empty question, or a question that does not fit the context: one line on stderr saying what
to do, exit code 2 (:mod:`experiments.cli`). A latest checkpoint that does not restore is passed over for the
newest one that does, with a one-line warning naming both.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from typing import Any, Callable

import numpy as np
from absl import flags

from experiments import cli, config
from vjax import eval as vjax_eval
from vjax.models import registry
from vjax.pretrained import NotACheckpoint, Run

FLAGS = flags.FLAGS
DEFAULT_CONTEXT = 8192  # the KV cache of a 32k-context 7B LLM would take ~9 GB in float32
REENCODE = "re-encode the file (e.g. ffmpeg -i IN -c:v libx264 OUT.mp4)"


def define_flags() -> None:
    """The command's flags (defined when run as a command, so chat and eval import side by side)."""
    config.define_checkpoint_flags()
    flags.DEFINE_string("video", None, "video file to talk about")
    flags.DEFINE_string("question", None, "ask once and exit (default: interactive chat)")
    flags.DEFINE_string("subtitles", None, "SRT/VTT subtitles of the video (MiniGPT4-video interleaves them)")
    flags.DEFINE_float("temperature", 0.0, "softmax temperature; 0 = greedy")
    flags.DEFINE_float("top_p", 1.0, "nucleus sampling: smallest token set with this probability mass")
    flags.DEFINE_integer("top_k", 0, "sample among the k most likely tokens (0 = all)")
    flags.DEFINE_integer("max_new_tokens", 256, "longest answer in tokens")
    flags.DEFINE_integer("max_context", 0, f"context in tokens; the KV cache holds this many (0 = the LLM's "
                         f"max_position_embeddings, at most {DEFAULT_CONTEXT})")
    flags.DEFINE_integer("seed", 0, "sampling seed")
    flags.DEFINE_float("stream_fps", 0.0, "MA-LMM: frames per second streamed through the memory bank (0 = every frame)")


class Chat:
    """A conversation about one video with a loaded :class:`vjax.pretrained.Run`.

    >>> chat = Chat(config.load_run("workdirs/chat_univi_tiny"))          # doctest: +SKIP
    >>> chat.load_video("clip.mp4"); chat.ask("What colour is the circle?")  # doctest: +SKIP
    """

    def __init__(self, run: Run, *, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int = 0, max_context: int = 0, stream_fps: float = 0.0,
                 measure_memory: bool = False):
        import jax  # noqa: PLC0415

        from vjax.data import formats  # noqa: PLC0415
        from vjax.generate import ChatSession, SamplingConfig  # noqa: PLC0415

        self.run = run
        tok, spec = run.tokenizer, run.spec
        self.sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                       top_k=top_k, eos_token_ids=vjax_eval.stop_token_ids(tok, spec),
                                       pad_token_id=tok.pad_token_id)
        self.stops = vjax_eval.stop_strings(tok, spec)
        self.format = formats.VideoQAFormat(spec, tok, prompt_only=True)
        llm = run.model_config.llm
        self.max_context = max_context or min(llm.max_position_embeddings, DEFAULT_CONTEXT)
        self._session = functools.partial(ChatSession, params=run.params, max_length=self.max_context,
                                          visual_ids={pid for _, pid, _ in spec.visual})
        self.session = self._session(run.module)
        self.frame_shape: tuple[int, ...] = ()  # [T, H, W] of the processed frames of the loaded video
        self.rng = jax.random.key(seed)
        self.stream_fps = stream_fps
        self.streaming = registry.spec(run.name).can_stream(run.model_config)
        self.measure_memory = measure_memory
        self.memory: dict[str, int] = {}  # compiled function -> bytes (with measure_memory)
        self.frames_seen = 0
        self.history: list[tuple[str, str]] = []
        self.record: dict[str, Any] | None = None
        self._visual: dict[str, Any] | None = None  # prefill inputs of the first turn

    # ------------------------------------------------------------------ video
    def load_video(self, path: str, subtitles: str | None = None) -> None:
        """Decode the sampled frames (and audio) once; raises ``UnreadableVideo`` with the reason."""
        from vjax.data.video import check_file, probe_video, read_audio, read_sampled_frames  # noqa: PLC0415

        c = self.run.config
        proc = self.run.frames  # the model's release preprocessing (vjax.data.preprocess)
        check_file(path)
        rec: dict[str, Any] = {"id": "chat", "video": os.path.abspath(path)}
        if subtitles:
            rec["subtitles"] = os.path.abspath(subtitles)
        self.history, self._visual = [], None
        self.session.cache, self.session.ids = None, []
        if self.streaming:
            info = probe_video(path)
            step = 1 if not self.stream_fps else max(1, round(info.fps / self.stream_fps))
            self._indices = np.arange(0, info.num_frames, step)
            rec.update(timestamps=self._indices / info.fps, fps=info.fps, num_frames=info.num_frames)
            self._frames, self._audio = None, None
        else:
            sampler = self.run.sampler
            if "seed" in inspect.signature(sampler).parameters:  # random samplers: a fixed draw
                sampler = functools.partial(sampler, seed=0)
            frames, sample, info = read_sampled_frames(path, sampler, size=proc.decode_size)
            frames = proc(frames)
            rec.update(frame_indices=sample.indices, timestamps=sample.timestamps, fps=info.fps,
                       num_frames=info.num_frames)
            self._frames = frames
            self.frame_shape = frames.shape[:3]
            if proc.per_video:  # the model sized to this video's frames: one compile per grid, cached by the run
                module, spec = self.run.sized(frames.shape[0], frames.shape[1:3])
                self.format = type(self.format)(spec, self.run.tokenizer, prompt_only=True)
                self.session = self._session(module)
            self._audio = read_audio(path, duration=info.duration)[0] if c.data.load_audio else None
        self.record = rec

    def _conversation(self, question: str) -> dict[str, Any]:
        turns = []
        for i, (q, a) in enumerate(self.history):
            turns += [{"from": "human", "value": ("<video>\n" if i == 0 else "") + q}, {"from": "gpt", "value": a}]
        turns.append({"from": "human", "value": ("" if self.history else "<video>\n") + question})
        return {**self.record, "conversations": turns}

    # ------------------------------------------------------------------ MA-LMM streaming
    def _compiled_bytes(self, name: str, fn, *args) -> None:
        if self.measure_memory and name not in self.memory:
            m = fn.lower(*args).compile().memory_analysis()
            self.memory[name] = int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                                    - m.alias_size_in_bytes)

    def _stream_tokens(self, batch: dict) -> Any:
        """MA-LMM: every selected frame through EVA and the memory banks, ``T`` frames a step."""
        import jax  # noqa: PLC0415
        import jax.numpy as jnp  # noqa: PLC0415

        from vjax.data.video import read_frames  # noqa: PLC0415

        run = self.run
        module, params = run.module, run.params
        t = run.spec.num_frames
        proc = run.frames
        qids = jnp.asarray(batch["qformer_input_ids"])[None]
        qmask = jnp.asarray(batch["qformer_attention_mask"])[None]
        state = module.apply({"params": params}, 1, qids.shape[1], method="stream_init")
        step = jax.jit(lambda p, s, f, m, q, qm: module.apply({"params": p}, s, f, m, q, qm, method="stream_step"),
                       donate_argnums=(1,))
        tokens = None
        self.frames_seen = 0
        for s in range(0, len(self._indices), t):
            raw = proc(read_frames(self.record["video"], self._indices[s: s + t], size=proc.decode_size))
            x, mask, n = self.format.frames(raw)
            args = (params, state, jnp.asarray(x)[None], jnp.asarray(mask)[None], qids, qmask)
            self._compiled_bytes("stream_step", step, *args)
            state, tokens = step(*args)
            self.frames_seen += n
        return tokens

    # ------------------------------------------------------------------ asking
    def prompt(self, question: str) -> tuple[list[int], dict[str, Any]]:
        """The token ids of the conversation so far plus ``question`` (ending where the assistant speaks) and the
        visual prefill inputs (the video is encoded on the first call only; MA-LMM streams it through its memory
        bank here). Raises ``ValueError`` (no video, empty question) and :class:`vjax.generate.ContextOverflow`."""
        import jax.numpy as jnp  # noqa: PLC0415

        if self.record is None:
            raise ValueError("load_video first")
        if not question.strip():
            raise ValueError("the question is empty")
        rec = self._conversation(question)
        if self._visual is None:
            frames = self._frames
            if self.streaming:  # the first chunk only formats the text and the Q-Former instruction
                from vjax.data.video import read_frames  # noqa: PLC0415

                proc = self.run.frames
                frames = proc(read_frames(rec["video"], self._indices[:1], size=proc.decode_size))
            batch = self.format(rec, frames, self._audio)
            ids = batch["input_ids"]
            self.session.check_fits(len(ids), self.sampling)  # before any encoding work
            if self.streaming:
                self._visual = {"visual_tokens": self._stream_tokens(batch)}
            else:
                self._visual = {k: jnp.asarray(batch[k])[None] for k in vjax_eval.VISUAL_BATCH_KEYS if k in batch}
                self.frames_seen = int(batch["frame_mask"].sum())
        else:
            ids, _ = self.format.text(rec, self.frames_seen if not self.streaming else 1)
        return [int(t) for t in ids], self._visual

    def ask(self, question: str, stream: Callable[[str], Any] | None = None) -> str:
        """Answer ``question`` (the conversation so far as context); ``stream(text)`` gets each new piece.
        Raises :class:`vjax.generate.ContextOverflow` (the conversation is unchanged)."""
        import jax  # noqa: PLC0415

        ids, visual = self.prompt(question)
        text = TextStream(self.run.tokenizer, self.stops, stream)
        self.rng, sub = jax.random.split(self.rng)
        out = self.session.respond(ids, config=self.sampling, prefill_inputs=visual, rng=sub, stream=text.add)
        answer = text.finish(out)
        self.history.append((question, answer))
        return answer


class TextStream:
    """Token ids in, answer text out piece by piece: the text is cut at the first stop string, and a tail that
    may still become one (``"#"`` before ``"###"``) or an incomplete character is held back until it cannot.

    >>> class Chars:  # a tokenizer whose token ids are character codes
    ...     def decode(self, ids): return "".join(map(chr, ids))
    >>> pieces = []
    >>> s = TextStream(Chars(), ("###",), pieces.append)
    >>> for c in "red ##": s.add(ord(c))
    >>> s.finish([ord(c) for c in "red ###"]), pieces
    ('red', ['r', 'e', 'd'])
    """

    def __init__(self, tokenizer: Any, stops: tuple[str, ...], on_text: Callable[[str], Any] | None = None):
        self.tokenizer, self.stops, self.on_text = tokenizer, tuple(stops), on_text
        self.ids: list[int] = []
        self.raw = ""  # the decoded ids, before the cut at a stop string (decoded once per token)
        self.shown = ""

    def _emit(self, text: str) -> None:
        if self.on_text is not None and text.startswith(self.shown) and len(text) > len(self.shown):
            self.on_text(text[len(self.shown):])
            self.shown = text

    def text(self) -> str:
        """The answer so far, cut at a stop string."""
        from vjax.data import formats  # noqa: PLC0415

        return formats.cut_at_stop(self.raw, self.stops)

    def stopped(self) -> bool:
        """Whether a stop string has appeared in the decoded text."""
        return any(s and s in self.raw for s in self.stops)

    def add(self, token: int) -> None:
        """Append one token; emit the text that can no longer change."""
        self.ids.append(int(token))
        self.raw = self.tokenizer.decode(self.ids)
        text = self.text()
        hold = max([k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])], default=0)
        self._emit(text[: len(text) - hold].rstrip("\ufffd").rstrip())  # the final answer is stripped too

    def finish(self, ids: list[int] | None = None) -> str:
        """The final answer (of ``ids`` when given, else of the tokens added); emits what was held back."""
        if ids is not None:
            self.ids = [int(t) for t in ids]
            self.raw = self.tokenizer.decode(self.ids)
        answer = self.text()
        self._emit(answer)
        return answer


def main(argv: list[str]) -> int:
    cli.start_checkpoint_command(argv, "workdir", "video")
    if FLAGS.question is not None and not FLAGS.question.strip():
        cli.fail("--question is empty: ask something, or leave --question out for an interactive chat")
    from vjax.data.video import UnreadableVideo  # noqa: PLC0415
    from vjax.generate import ContextOverflow  # noqa: PLC0415

    try:
        run = config.load_run_from_flags()
    except (NotACheckpoint, config.ConfigError) as err:
        cli.fail(str(err))
    try:
        chat = Chat(run, max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_p=FLAGS.top_p,
                    top_k=FLAGS.top_k, seed=FLAGS.seed, max_context=FLAGS.max_context, stream_fps=FLAGS.stream_fps)
    except ValueError as err:  # sampling flags out of range
        cli.fail(str(err))
    try:
        chat.load_video(FLAGS.video, FLAGS.subtitles)
    except UnreadableVideo as err:
        cli.fail(f"{err}: check the path, or {REENCODE}")
    print(run.describe_preprocessing(), file=sys.stderr, flush=True)
    if run.quantize:
        print(run.describe_weights(), file=sys.stderr, flush=True)
    if chat.frame_shape:
        t, h, w = chat.frame_shape
        print(f"video: {t} frames of {w}x{h} -> {chat.format.spec.tokens_per_clip(t)} visual tokens", file=sys.stderr,
              flush=True)

    def show(text: str) -> None:
        print(text, end="", flush=True)

    if FLAGS.question is not None:
        try:
            chat.ask(FLAGS.question, stream=show)
        except ContextOverflow as err:
            cli.fail(f"{err}: shorten the question or lower --max_new_tokens")
        except UnreadableVideo as err:  # MA-LMM decodes while it streams
            cli.fail(f"{err}: {REENCODE}")
        print(flush=True)
        return 0
    step = f" step {run.step}" if run.step is not None else ""
    print(f"{run.name}{step}: ask about {FLAGS.video} (empty line or Ctrl-D ends)", flush=True)
    while True:
        try:
            question = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not question or question in ("exit", "quit"):
            return 0
        print("model> ", end="", flush=True)
        try:
            chat.ask(question, stream=show)
        except ContextOverflow as err:
            print(f"\nerror: {err}: start a new chat or lower --max_new_tokens", file=sys.stderr, flush=True)
            continue
        except UnreadableVideo as err:
            cli.fail(f"{err}: {REENCODE}")
        print(flush=True)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
