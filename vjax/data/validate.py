"""Bad input is skipped and counted, never fatal — until there is too much of it.

:class:`SkipLog` records each skipped item (a video path or an ``annotation-file:line``) with a reason,
logs each one once, and :meth:`SkipLog.check` raises :class:`TooManyBadRecords` naming examples when the
bad fraction passes a limit. :func:`scan_videos` and :func:`validate_records` probe videos up front
(open + decode the first and last frame, which catches missing, empty, truncated, non-video and
video-less files in milliseconds per file); the Grain pipeline keeps a per-worker SkipLog for
failures that only show at decode time.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable, Sequence

from vjax.data.video import UnreadableVideo, native_logs_filtered, open_video

logger = logging.getLogger("vjax.data")

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".mpg", ".mpeg", ".m4v", ".flv")


class TooManyBadRecords(RuntimeError):
    """More than the allowed fraction of records is unreadable; the message names examples."""


class SkipLog:
    """Counts skipped items by reason and logs each item once (``logging`` warning, logger ``vjax.data``).

    ``max_bad_fraction`` in [0, 1] is the limit :meth:`check` enforces; ``max_examples`` how many
    (item, reason) pairs the error message names.
    """

    def __init__(self, max_bad_fraction: float = 0.1, max_examples: int = 5):
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction!r}")
        self.max_bad_fraction = max_bad_fraction
        self.max_examples = max_examples
        self.skipped: dict[str, str] = {}  # item -> reason, insertion-ordered
        self.seen = 0
        self.num_bad = 0  # skipped records (a bad video shared by several records counts each time)

    def ok(self) -> None:
        """Count one good item."""
        self.seen += 1

    def skip(self, item: str, reason: str) -> None:
        """Count one bad item; the first time an item is skipped it is logged with its reason."""
        self.seen += 1
        self.num_bad += 1
        if item not in self.skipped:
            self.skipped[item] = reason
            logger.warning("skipping %s: %s", item, reason)

    def summary(self) -> str:
        """One line: 'N of M bad; e.g. item (reason); ...'."""
        ex = "; ".join(f"{k} ({v})" for k, v in list(self.skipped.items())[: self.max_examples])
        return f"{self.num_bad} of {self.seen} records bad" + (f"; e.g. {ex}" if ex else "")

    def check(self, min_seen: int = 1) -> None:
        """Raise :class:`TooManyBadRecords` if at least ``min_seen`` items were seen and the bad
        fraction exceeds ``max_bad_fraction``."""
        if self.seen >= max(1, min_seen) and self.num_bad > self.max_bad_fraction * self.seen:
            raise TooManyBadRecords(
                f"too many bad records (limit {self.max_bad_fraction:.0%}): {self.summary()}")


def probe(path: str | os.PathLike) -> None:
    """Raise :class:`UnreadableVideo` unless ``path`` opens and its first and last frames decode."""
    p = os.fspath(path)
    vr = open_video(p)
    try:
        last = len(vr) - 1
        try:
            with native_logs_filtered():
                frames = vr.get_batch([0, last] if last > 0 else [0]).asnumpy()
        except Exception as err:
            raise UnreadableVideo(p, f"decoding failed ({type(err).__name__}: "
                                     f"{str(err).strip().splitlines()[-1][:160]})") from None
        if frames.shape[0] != (2 if last > 0 else 1):
            raise UnreadableVideo(p, "could not decode the first and last frames")
    finally:
        del vr


def scan_videos(
    folder_or_paths: str | os.PathLike | Iterable[str | os.PathLike],
    max_bad_fraction: float = 0.1,
    extensions: Sequence[str] = VIDEO_EXTENSIONS,
    skips: SkipLog | None = None,
) -> tuple[list[str], SkipLog]:
    """Probe every video (a folder is searched recursively for ``extensions``) -> (good paths, SkipLog).

    Bad files are skipped, logged once and counted; raises :class:`TooManyBadRecords` if more than
    ``max_bad_fraction`` of them are bad.
    """
    if isinstance(folder_or_paths, (str, os.PathLike)) and os.path.isdir(folder_or_paths):
        root = os.fspath(folder_or_paths)
        paths = sorted(
            os.path.join(d, n) for d, _, names in os.walk(root) for n in names
            if n.lower().endswith(tuple(e.lower() for e in extensions))
        )
    elif isinstance(folder_or_paths, (str, os.PathLike)):
        paths = [os.fspath(folder_or_paths)]
    else:
        paths = [os.fspath(p) for p in folder_or_paths]
    log = skips if skips is not None else SkipLog(max_bad_fraction)
    good = []
    for p in paths:
        try:
            probe(p)
        except UnreadableVideo as err:
            log.skip(p, err.reason)
            continue
        log.ok()
        good.append(p)
    log.check()
    return good, log


def validate_records(
    records: Sequence[dict],
    max_bad_fraction: float = 0.1,
    video_key: str = "video",
    skips: SkipLog | None = None,
) -> tuple[list[dict], SkipLog]:
    """Keep the records whose ``record[video_key]`` (an absolute or cwd-relative path) probes fine.

    Each distinct video is probed once. Returns (good records, SkipLog); raises
    :class:`TooManyBadRecords` if more than ``max_bad_fraction`` of the records are bad.
    """
    log = skips if skips is not None else SkipLog(max_bad_fraction)
    verdict: dict[str, str | None] = {}
    good = []
    for rec in records:
        path = rec.get(video_key)
        if not isinstance(path, str) or not path:
            log.skip(f"record {rec.get('id', '?')}", f"missing or invalid {video_key!r} field")
            continue
        if path not in verdict:
            try:
                probe(path)
                verdict[path] = None
            except UnreadableVideo as err:
                verdict[path] = err.reason
        if verdict[path] is None:
            log.ok()
            good.append(rec)
        else:
            log.skip(path, verdict[path])
    log.check()
    return good, log
