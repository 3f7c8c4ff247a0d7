"""The serving engine behind ``experiments.serve``: requests in, answer text out, many conversations decoded at
once (:class:`vjax.serving.SlotDecoder`).

``prepare`` (any thread; the heavy part: decoding and preprocessing the video, rendering the conversation with
the model's template) builds what :meth:`Engine.submit` queues. One engine thread owns the accelerator: it
prefills waiting requests into free slots (each video encoded once, by its own prefill) and steps all busy
slots together, one token per step, calling each request's ``on_text`` with the new answer text and ``on_done``
once when it ends (a stop token or string, ``max_tokens``, a cancel, an error).

>>> engine = Engine(config.load_run("workdirs/chat_univi"), slots=8)           # doctest: +SKIP
>>> p = engine.prepare("clip.mp4", [], "What colour is the circle?")             # doctest: +SKIP
>>> engine.submit(p, max_tokens=32, on_text=print, on_done=lambda why, usage: None)  # doctest: +SKIP
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import os
import threading
from typing import Any, Callable

import numpy as np
from absl import logging

from experiments.chat import Chat, TextStream
from vjax import eval as vjax_eval
from vjax.pretrained import Run

DEFAULT_CONTEXT = 4096  # per slot: 8 slots of a 7B LLM's bf16 cache at 4096 tokens take ~17 GB


@dataclasses.dataclass
class Prepared:
    """A request ready to prefill: the prompt's token ids, the visual prefill inputs and the module to prefill
    with (the run's own, or one sized to the video's grid)."""

    ids: list[int]
    inputs: dict[str, Any]
    module: Any


class Ticket:
    """One submitted request; :meth:`cancel` frees its slot at the next step (``on_done("cancelled", ...)``)."""

    def __init__(self, prepared: Prepared, max_tokens: int, temperature: float, top_p: float, seed: int,
                 on_text: Callable[[str], Any], on_done: Callable[[str, dict], Any], text: TextStream):
        self.prepared, self.max_tokens = prepared, max_tokens
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.on_text, self.on_done, self.text = on_text, on_done, text
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.error: str | None = None  # why a request ended with "error"

    def cancel(self) -> None:
        self.cancelled.set()

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": len(self.prepared.ids), "completion_tokens": len(self.tokens)}


class Engine:
    """A loaded :class:`vjax.pretrained.Run`, ``slots`` decode slots and the thread that drives them.

    Args:
      run: ``experiments.config.load_run(...)``.
      slots: conversations decoded at once (one compiled step for all of them).
      max_context: KV-cache length of each slot (0: the LLM's max_position_embeddings, at most 4096).
      max_new_tokens: the longest answer a request may ask for.
      bucket: prompts are left-padded to a multiple of this many tokens (one prefill compile per multiple).
    """

    def __init__(self, run: Run, *, slots: int = 8, max_context: int = 0, max_new_tokens: int = 256,
                 bucket: int = 64):
        from vjax.serving import SlotDecoder  # noqa: PLC0415

        self.run = run
        self.name = run.name
        self.max_new_tokens = int(max_new_tokens)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        context = max_context or min(run.model_config.llm.max_position_embeddings, DEFAULT_CONTEXT)
        self.decoder = SlotDecoder(run.module, run.params, slots=slots, max_length=context, bucket=bucket)
        self.eos = set(vjax_eval.stop_token_ids(run.tokenizer, run.spec))
        self.stops = vjax_eval.stop_strings(run.tokenizer, run.spec)
        self.pad_token_id = run.tokenizer.pad_token_id
        self._queue: collections.deque[Ticket] = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        self._tickets: dict[int, Ticket] = {}  # slot -> ticket
        self._thread = threading.Thread(target=self._loop, name="vjax-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ requests
    def prepare(self, video: str, history: list[tuple[str, str]], question: str, *,
                subtitles: str | None = None) -> Prepared:
        """Decode and preprocess ``video``, render the conversation (``history`` of (question, answer) turns,
        then ``question``) and encode what the model reads before its prefill. Thread-safe; blocking.
        Raises ``vjax.data.video.UnreadableVideo`` and ``ValueError`` (an empty question)."""
        chat = Chat(self.run, max_new_tokens=1, max_context=self.decoder.max_length)
        chat.load_video(video, subtitles)
        chat.history = [(str(q), str(a)) for q, a in history]
        ids, inputs = chat.prompt(question)
        return Prepared(ids=ids, inputs=inputs, module=chat.session.module)

    def submit(self, prepared: Prepared, *, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               seed: int = 0, on_text: Callable[[str], Any] = lambda text: None,
               on_done: Callable[[str, dict], Any] = lambda reason, usage: None) -> Ticket:
        """Queue ``prepared``; raises ``vjax.generate.ContextOverflow`` (prompt + ``max_tokens`` does not fit)
        and ``ValueError`` (a sampling value out of range) before queuing. Callbacks run on the engine thread:
        ``on_text(piece)`` per new piece of answer, then once ``on_done(finish_reason, usage)`` with
        ``finish_reason`` in ``stop | length | cancelled | error``."""
        if not 1 <= max_tokens <= self.max_new_tokens:
            raise ValueError(f"max_tokens must be in [1, {self.max_new_tokens}], got {max_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.decoder.check_fits(len(prepared.ids), max_tokens)
        ticket = Ticket(prepared, int(max_tokens), float(temperature), float(top_p), int(seed) % 2**32, on_text,
                        on_done, TextStream(self.run.tokenizer, self.stops, on_text))
        with self._wake:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._queue.append(ticket)
            self._wake.notify()
        return ticket

    def generate(self, prepared: Prepared, **kw: Any) -> tuple[str, str, dict]:
        """Submit and wait: ``(answer, finish_reason, usage)``."""
        ticket = self.submit(prepared, **kw)
        ticket.done.wait()
        return ticket.text.text(), ticket.finish_reason, ticket.usage()

    # ------------------------------------------------------------------ the page's helpers
    def frames(self, video: str) -> tuple[list[np.ndarray], list[float]]:
        """The sampled frames of ``video`` as decoded for the model (uint8 ``[H, W, 3]``, before normalisation)
        and their timestamps in seconds. Raises ``vjax.data.video.UnreadableVideo``."""
        from vjax.data.video import check_file, read_sampled_frames  # noqa: PLC0415

        check_file(video)
        sampler = self.run.sampler
        if "seed" in inspect.signature(sampler).parameters:
            sampler = functools.partial(sampler, seed=0)
        frames, sample, _ = read_sampled_frames(video, sampler, size=self.run.frames.decode_size)
        return [np.asarray(f, np.uint8) for f in frames], [float(t) for t in sample.timestamps]

    @functools.cached_property
    def _clips(self) -> list[str]:
        from vjax.pretrained import synthetic_paths  # noqa: PLC0415

        try:
            paths = synthetic_paths(self.run.config)
        except Exception as err:  # noqa: BLE001 - the page then offers uploads only
            logging.warning("no synthetic clips to offer: %s", err)
            return []
        folder = os.path.join(paths.root, "videos", "test")
        if not os.path.isdir(folder):
            return []
        return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".mp4"))

    def clips(self) -> list[str]:
        """The synthetic set's test clips (built on first call when the machine has none cached)."""
        return self._clips

    # ------------------------------------------------------------------ the loop
    def close(self) -> None:
        """Stop the engine thread; queued and running requests end with ``cancelled``."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=60)

    def _finish(self, ticket: Ticket, reason: str, slot: int | None = None) -> None:
        if slot is not None:
            self.decoder.release(slot)
            self._tickets.pop(slot, None)
        ticket.finish_reason = reason
        if reason in ("stop", "length"):
            ticket.text.finish()
        try:
            ticket.on_done(reason, ticket.usage())
        except Exception:  # noqa: BLE001 - a callback's failure must not stop the other requests
            logging.exception("on_done failed")
        ticket.done.set()

    def _emit(self, ticket: Ticket, slot: int, token: int) -> None:
        """A new token of ``ticket`` in ``slot``: stream it, end the request when it stops."""
        if token in self.eos:
            self._finish(ticket, "stop", slot)
            return
        ticket.tokens.append(token)
        try:
            ticket.text.add(token)
        except Exception:  # noqa: BLE001
            logging.exception("on_text failed; cancelling the request")
            self._finish(ticket, "cancelled", slot)
            return
        if ticket.text.stopped():
            self._finish(ticket, "stop", slot)
        elif len(ticket.tokens) >= ticket.max_tokens:
            self._finish(ticket, "length", slot)

    def _admit(self) -> None:
        for slot in self.decoder.free_slots():
            with self._wake:
                if not self._queue:
                    return
                ticket = self._queue.popleft()
            if ticket.cancelled.is_set():
                self._finish(ticket, "cancelled")
                continue
            p = ticket.prepared
            try:
                first = self.decoder.admit(slot, p.ids, max_new_tokens=ticket.max_tokens, prefill_inputs=p.inputs,
                                           module=p.module, temperature=ticket.temperature, top_p=ticket.top_p,
                                           seed=ticket.seed, pad_token_id=self.pad_token_id)
            except Exception as err:  # noqa: BLE001 - one bad request must not stop the others
                logging.exception("prefill failed")
                ticket.error = str(err)
                self._finish(ticket, "error")
                continue
            self._tickets[slot] = ticket
            self._emit(ticket, slot, first)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._queue and not self._tickets:
                    self._wake.wait()
                if self._closed:
                    break
            self._admit()
            for slot, ticket in list(self._tickets.items()):
                if ticket.cancelled.is_set():
                    self._finish(ticket, "cancelled", slot)
            if not self._tickets:
                continue
            try:
                tokens = self.decoder.step()
            except Exception as err:  # noqa: BLE001
                logging.exception("decode step failed")
                for slot, ticket in list(self._tickets.items()):
                    ticket.error = str(err)
                    self._finish(ticket, "error", slot)
                continue
            for slot, ticket in list(self._tickets.items()):
                self._emit(ticket, slot, int(tokens[slot]))
        for slot, ticket in list(self._tickets.items()):
            self._finish(ticket, "cancelled", slot)
        while self._queue:
            self._finish(self._queue.popleft(), "cancelled")


__all__ = ["Engine", "Prepared", "Ticket"]
