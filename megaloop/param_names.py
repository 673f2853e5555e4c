"""The state-dict name prefixes of LoopedLM's parts, defined once.

They are the model's attribute names (megaloop.model.LoopedLM) and therefore also the keys of
every checkpoint's model.pt. Code that groups parameters by part (the optimiser's groups, the
pipeline stages' shares, the tied recurrent group, vocab-parallel tensors) uses these names;
tests/test_param_names.py checks that they cover the model's parameters.
"""
from __future__ import annotations

EMBED = "embed."
NORM_EMB = "norm_emb."
PRELUDE = "prelude."
RECUR = "recur."
INJECTION = "injection."
NORM_RECUR = "norm_recur."
CODA = "coda."
NORM_FINAL = "norm_final."
HEAD = "head."

# Applied r times: the recurrent blocks, the injection adapter (or lanes) and norm_recur. A
# pipeline stage that runs any pass holds a copy of all of them (tied weights).
RECURRENT_GROUP = (RECUR, INJECTION, NORM_RECUR)
# Rows indexed by the vocabulary: split across tensor-parallel ranks, padded to a multiple of tp.
VOCAB = (EMBED, HEAD)
VOCAB_PARAMS = (EMBED + "weight", HEAD + "weight")
ALL = (EMBED, NORM_EMB, PRELUDE, RECUR, INJECTION, NORM_RECUR, CODA, NORM_FINAL, HEAD)
