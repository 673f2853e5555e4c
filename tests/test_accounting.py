"""Parameter and FLOP accounting against a hand count and against a built model."""
import pytest

from megaloop.accounting import count_params, model_param_groups
from megaloop.config import load_config
from megaloop.model import LoopedLM


def cfg(**model):
    base = dict(d_model=8, n_head=2, n_kv_head=1, vocab_size=10, seq_len=16, n_prelude=1,
                n_recur_block=2, n_coda=1, num_recur=3, input_injection="linear")
    base.update(model)
    return load_config(raw={"model": base, "train": {"steps": 1}}).model


def test_hand_count_small_config():
    """Contract: the counts of DESIGN.md, worked by hand for d=8, 2 heads of dim 4, 1 kv head.
    block: q 8x8=64, k 8x4=32, v 32, o 64, MLP 2*8*32=512, two norms 16 -> 720
    N_once = prelude 720 + coda 720 + outer norms 3*8 = 1464
    N_rec  = group 2*720 + injection 8x16=128 = 1568; embedding = head = 10*8 = 80
    FLOPs/token (r=3, full backprop): 6*(720+720+80) + 6*3*1568 + 12*2*4*16 per layer
    application x (1 + 1 + 3*2) = 9120 + 28224 + 12288 = 49632."""
    c = count_params(cfg())
    assert (c.n_once, c.n_rec, c.embedding, c.head) == (1464, 1568, 80, 80)
    assert c.total == 1464 + 1568 + 160
    assert c.flops_per_token == 49632
    assert c.effective_compute_params == 1464 + 3 * 1568
    assert c.tokens_for(49632 * 1000) == 1000


def test_hand_count_truncated_backprop():
    """Contract: detached recurrences are charged forward only. r=3, bptt_k=1: g=1, f=2:
    6*1520 + (2*2 + 6*1)*1568 + (12*(1+1+2) + 4*2*2)*128 = 9120 + 15680 + 8192 = 32992."""
    assert count_params(cfg(bptt_k=1)).flops_per_token == 32992


def test_hyperconnect_and_parameter_free_injections():
    """Contract: additive/passthrough add no parameters; hyperconnect lanes count R*(2N+N^2)."""
    assert count_params(cfg(input_injection="additive")).n_rec == 1440
    assert count_params(cfg(input_injection="passthrough")).injection == 0
    assert count_params(cfg(input_injection="hyperconnect", num_lanes=2)).injection == 3 * (4 + 4)


@pytest.mark.parametrize("mode", ["linear", "additive", "hyperconnect"])
def test_counts_match_built_model(mode):
    """Contract: the analytic count equals the parameters of the model actually built."""
    c = cfg(d_model=64, n_head=4, n_kv_head=2, vocab_size=300, input_injection=mode)
    counts, built = count_params(c), model_param_groups(LoopedLM(c))
    for k, v in built.items():
        assert getattr(counts, k) == v, k
    assert counts.total == sum(p.numel() for p in LoopedLM(c).parameters())


def test_reference_grid_worked_example():
    """Contract: the reference study's r=4 iso-depth model at d_model 1280 (s=20): 2 prelude,
    4 recurrent, 2 coda blocks; each block 12 d^2 + 2d. N_rec includes the 2d^2 adapter."""
    d = 1280
    c = count_params(cfg(d_model=d, n_head=10, n_kv_head=None, vocab_size=32000, seq_len=2048,
                         n_prelude=2, n_recur_block=4, n_coda=2, num_recur=4))
    blk = 12 * d * d + 2 * d
    assert c.n_once == 4 * blk + 3 * d and c.n_rec == 4 * blk + 2 * d * d
