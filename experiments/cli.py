"""The exit-code convention every command follows, and the flag parsing and signal handling behind it.

    0    success
    1    internal error: a bug in vjax or a dependency (the traceback is printed)
    2    user input or environment: a bad flag or config key, a missing or unreadable file, a checkpoint
         that does not fit or does not restore, too many unreadable videos, a full or read-only disk,
         a workdir in use, training that diverged — one line on stderr saying what to do
    130  interrupted by SIGINT (Ctrl-C); 143 by SIGTERM (128 + the signal number). Training saves a
         checkpoint first, so re-running the same command resumes

:func:`run` wraps absl's ``app.run`` so that flag errors exit 2 with one line (absl's default is exit 1
with the whole usage text) and SIGINT/SIGTERM exit 130/143 with one line.
"""

from __future__ import annotations

import signal
import sys
from typing import Callable, NoReturn

OK, INTERNAL_ERROR, USER_ERROR = 0, 1, 2


def fail(message: str) -> NoReturn:
    """A command's one-line error: ``error: <message>`` on stderr, exit code 2 (user input or environment)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(USER_ERROR)


def start_checkpoint_command(argv: list[str], *required: str) -> None:
    """The common start of chat, eval, serve and the measuring commands: no positional arguments, Orbax's
    per-restore INFO logs off, and each flag in ``required`` given (else one line, exit 2)."""
    from absl import flags, logging  # noqa: PLC0415

    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
    for name in required:
        if not getattr(flags.FLAGS, name):
            fail(f"--{name} is required")


def interrupted(signum: int, message: str) -> NoReturn:
    """One line ``stopped: <message>`` on stderr, exit code ``128 + signum`` (130 SIGINT, 143 SIGTERM)."""
    print(f"stopped: {message}", file=sys.stderr, flush=True)
    sys.exit(128 + int(signum))


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing where an unknown flag or a bad value is one line and exit code 2."""
    from absl import flags  # noqa: PLC0415

    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        fail(str(err).splitlines()[0] if str(err) else type(err).__name__)


class Terminated(Exception):
    """SIGTERM outside a training loop (which saves first): unwinds like ``KeyboardInterrupt`` does."""


def _raise_terminated(signum, frame) -> None:
    del signum, frame
    raise Terminated()


def run(main: Callable[[list[str]], int | None], flags_parser: Callable[[list[str]], list[str]] = parse_flags) -> None:
    """``app.run(main)`` under the convention above."""
    from absl import app  # noqa: PLC0415

    def guarded(argv: list[str]) -> int | None:
        try:
            return main(argv)
        except KeyboardInterrupt:
            interrupted(signal.SIGINT, "interrupted by SIGINT")
        except Terminated:
            interrupted(signal.SIGTERM, "terminated by SIGTERM")

    signal.signal(signal.SIGTERM, _raise_terminated)
    app.run(guarded, flags_parser=flags_parser)
