"""The parameter-name prefixes of megaloop.param_names are the model's own names.

Contract: for every injection mode, each of LoopedLM's parameters starts with exactly one prefix
of param_names.ALL, and every prefix is the state-dict name of one of the model's parts
(so a renamed attribute fails here, not as a silently empty optimiser group or pipeline share);
RECURRENT_GROUP names exactly the parameters of the recurrent blocks, the injection and
norm_recur (the N_rec part, tied across pipeline stages); VOCAB_PARAMS are the embedding and head
matrices; the pipeline stages' shares (owned_prefixes) cover every parameter at pp = 1..3.
"""
import pytest

from megaloop import param_names as names
from megaloop.config import load_config
from megaloop.model import LoopedLM
from megaloop.parallel.pipeline import owned_prefixes, plan_stages


def _model(mode):
    raw = {"model": dict(d_model=32, n_head=2, vocab_size=64, seq_len=16, n_prelude=2, n_recur_block=1,
                         n_coda=2, num_recur=3, input_injection=mode), "train": {"steps": 1}}
    cfg = load_config(raw=raw)
    return cfg, LoopedLM(cfg.model)


@pytest.mark.parametrize("mode", ["linear", "additive", "passthrough", "hyperconnect"])
def test_prefixes_cover_the_model(mode):
    cfg, model = _model(mode)
    params = dict(model.named_parameters())
    for n in params:
        hits = [p for p in names.ALL if n.startswith(p)]
        assert len(hits) == 1, f"{n} matches {hits}"
    for p in names.ALL:
        assert hasattr(model, p.rstrip(".")), f"LoopedLM has no part named {p!r}"
    part = {id(p) for m in (model.recur, model.injection, model.norm_recur) for p in m.parameters()}
    assert {id(p) for n, p in params.items() if n.startswith(names.RECURRENT_GROUP)} == part
    assert [n for n in params if n in names.VOCAB_PARAMS] == list(names.VOCAB_PARAMS)
    assert params["embed.weight"] is model.embed.weight and params["head.weight"] is model.head.weight
    for pp in (1, 2, 3):
        shares = [owned_prefixes(plan) for plan in plan_stages(cfg.model, pp)]
        assert all(any(n.startswith(s) for s in shares) for n in params), f"pp={pp}: a parameter has no stage"
