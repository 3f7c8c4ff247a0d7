"""The command-line entry points (train, chat, eval, convert, bench, demo) and what they share (``lib``).

Importing the package keeps every command offline by default: nothing loads from a model hub unless
``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` are set to 0 by the user.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
