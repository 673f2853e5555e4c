"""User-facing errors of the data pipeline.

They are UserErrors, so the top-level CLI (and a failing rank's report to the others) prints them
as one line, without a traceback; they stay ValueErrors for callers that catch those.
Every message names the offending file and how to fix it.
"""
from __future__ import annotations

from ..errors import UserError


class DatasetError(UserError, ValueError):
    """A missing, truncated, corrupt or mismatched data file (corpus, tokenizer or dataset)."""


class TokenizerError(DatasetError):
    """A missing or unreadable tokenizer model, or one that does not fit the model/dataset."""


REBUILD_HINT = "re-run `megaloop preprocess` (or delete the data cache directory to rebuild it)"
