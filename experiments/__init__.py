"""The command-line entry points (train, chat, eval, convert, bench, demo); ``config`` (configuration) and
``build`` (a training run from a config) are what they share, ``cli`` their exit-code convention.

Importing the package keeps every command offline by default: nothing loads from a model hub unless
``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` are set to 0 by the user. It also silences transformers'
advisory warnings ("PyTorch was not found ...": the commands need PyTorch only to read .pth/.bin files, and
say so then); set ``TRANSFORMERS_NO_ADVISORY_WARNINGS=`` (empty) to see them.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
