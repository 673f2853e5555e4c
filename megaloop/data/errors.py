"""User-facing errors of the data pipeline.

They subclass ValueError so the top-level CLI prints them as one line, without a traceback.
Every message names the offending file and how to fix it.
"""
from __future__ import annotations


class DatasetError(ValueError):
    """A missing, truncated, corrupt or mismatched data file (corpus, tokenizer or dataset)."""


class TokenizerError(DatasetError):
    """A missing or unreadable tokenizer model, or one that does not fit the model/dataset."""


REBUILD_HINT = "re-run `megaloop preprocess` (or delete the data cache directory to rebuild it)"
