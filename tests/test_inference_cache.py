"""The loop-aware KV cache against recomputation (megaloop.inference)."""
import pytest
import torch
import torch.nn.functional as F

import megaloop.model as model_mod
from megaloop.inference.decode import Decoder
from megaloop.inference.generate import generate
from megaloop.model import LoopedLM
from test_model import perturbed, tiny

MODES = ["linear", "additive", "passthrough", "hyperconnect"]


def make(mode="linear", **kw):
    cfg = tiny(input_injection=mode, seq_len=24, **kw)  # d 48, 4 heads over 2 KV heads (GQA)
    torch.manual_seed(0)
    return perturbed(LoopedLM(cfg)).eval()


def prompt(B=2, T=5, V=97, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# the default injection mode (linear) in the quick subset; the other modes, each tens of seconds of
# uncached decoding, with the slow tests
@pytest.mark.parametrize("mode", [m if m == "linear" else pytest.param(m, marks=pytest.mark.slow) for m in MODES])
def test_cached_greedy_equals_uncached(mode):
    """Contract: with one cache slot per recurrence, cached greedy decoding gives the same tokens
    as recomputing the window for every token, at several r (with GQA, every injection mode), and
    each step's logits equal the full forward's last-position logits."""
    model = make(mode)
    idx = prompt()
    for r in (1, 3, 5):
        ref = model.generate(idx, 12, num_recur=r)
        got = generate(model, idx, 12, num_recur=r).tokens
        assert torch.equal(got, ref), (mode, r)
    dec = Decoder(model, 2, 24, max_depth=3)
    seq = ref[:, :17]
    logits = dec.forward(seq[:, :5]).logits
    for t in range(5, 17):
        full = model(seq[:, :t], num_recur=3)[:, -1]
        assert torch.allclose(logits, full, atol=1e-5, rtol=1e-5)
        logits = dec.forward(seq[:, t:t + 1]).logits


def test_kv_budget_slot_layout_and_memory():
    """Contract: the layout is [prelude | kv_budget x n_recur_block | coda]; recurrence i writes
    slot i mod kv_budget (so slot s holds the last recurrence i = s mod k); the reported memory is
    the size of those K/V tensors; a budget below r still decodes (prompt logits unchanged)."""
    model = make()
    cfg = model.cfg
    idx = prompt()
    full = Decoder(model, 2, 24, max_depth=5)  # one slot per recurrence
    ref_logits = full.forward(idx).logits
    small = Decoder(model, 2, 24, max_depth=5, kv_budget=2)
    assert torch.allclose(small.forward(idx).logits, ref_logits, atol=1e-6)
    n_layers = cfg.n_prelude + 2 * cfg.n_recur_block + cfg.n_coda
    assert small.cache.nbytes == 2 * n_layers * 2 * 24 * cfg.kv_heads * cfg.hdim * 4
    assert small.cache.describe()["layers"] == n_layers
    T = idx.size(1)
    for j in range(cfg.n_recur_block):
        for s, last_i in ((0, 4), (1, 3)):  # r = 5: slot 0 <- recurrences 0, 2, 4; slot 1 <- 1, 3
            got = small.cache.k[small.cache.recur(s, j).index][:, :T]
            want = full.cache.k[full.cache.recur(last_i, j).index][:, :T]
            assert torch.equal(got, want)
        assert not torch.equal(full.cache.k[full.cache.recur(3, j).index], full.cache.k[full.cache.recur(4, j).index])
    # decoding under the budget runs and differs from the exact cache only by the budget's approximation
    out = generate(model, idx, 10, num_recur=5, kv_budget=2)
    assert out.tokens.shape == (2, T + 10) and out.cache["kv_budget"] == 2


def banded_attention(window):
    def attend(q, k, v):
        T = q.size(1)
        i = torch.arange(T)
        mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, enable_gqa=k.size(2) != q.size(2))
        return y.transpose(1, 2)
    return attend


@pytest.mark.parametrize("mode", ["linear", "hyperconnect"])
def test_past_seq_len_is_sliding_window_attention(mode, monkeypatch):
    """Contract: past seq_len the cache slides: every position attends to the last seq_len
    positions, exactly a full forward whose causal attention is banded to seq_len (independent
    reference), both one token at a time and for a chunk that wraps the ring buffer."""
    model = make(mode)
    L, n = model.cfg.seq_len, 60
    seq = prompt(T=n, seed=1)
    monkeypatch.setattr(model_mod, "causal_attention", banded_attention(L))
    ref = model(seq)  # [B, n, V] with banded attention
    monkeypatch.undo()
    dec = Decoder(model, 2, L, max_depth=3)
    got = [dec.forward(seq[:, t:t + 1]).logits for t in range(n)]
    assert torch.allclose(torch.stack(got, 1), ref, atol=1e-4, rtol=1e-4)
    chunked = Decoder(model, 2, L, max_depth=3)
    chunked.forward(seq[:, :L - 3])
    last = chunked.forward(seq[:, L - 3:L + 4]).logits  # 7 tokens across the ring's end
    assert torch.allclose(last, ref[:, L + 3], atol=1e-4, rtol=1e-4)
    assert generate(model, seq[:, :5], 3 * L).tokens.shape == (2, 5 + 3 * L)


def test_left_padded_batch_equals_one_at_a_time():
    """Contract: prompts of different lengths in one batch (left-padded) generate the same tokens
    as each prompt alone."""
    model = make("hyperconnect")
    prompts = [[5, 9, 2, 7, 1, 3], [4], [8, 8, 6]]
    batched = generate(model, prompts, 10, num_recur=3)
    for b, p in enumerate(prompts):
        alone = generate(model, [p], 10, num_recur=3)
        assert batched.new_tokens[b] == alone.new_tokens[0]


@pytest.mark.parametrize("mode", ["linear", "hyperconnect"])
def test_token_step_equals_module_path(mode):
    """Contract: the lean one-token step (step.TokenBlock over LoopKVCache.attend_one, used for
    every decoded token) computes what Block.forward over a CacheLayer computes, block by block:
    the same output and the same stored keys and values (GQA; a ring that has wrapped; a
    left-padded row), and its rotation matrix is K.qk_norm_rope's rotary embedding."""
    from megaloop import kernels as K
    from megaloop.inference.cache import CacheLayer, LoopKVCache
    from megaloop.inference.step import RopeRotations, TokenBlock

    model = make(mode)
    cfg = model.cfg
    g = torch.Generator().manual_seed(3)
    pos = 30  # past the 24-position ring: the write lands on a wrapped index
    cos, sin = model.rope(pos + 1)
    q = torch.randn(2, 1, cfg.n_head, cfg.hdim, generator=g)
    k = torch.randn(2, 1, cfg.kv_heads, cfg.hdim, generator=g)  # [B, T, H, D]
    rot = RopeRotations(model, torch.float32)(pos)
    want = K.qk_norm_rope_reference(q, k, cos[pos:pos + 1], sin[pos:pos + 1], cfg.norm_eps)
    got = [K.rms_norm_reference(torch.matmul(t, rot), None, cfg.norm_eps) for t in (q, k)]
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-6)
    for pad in (None, torch.tensor([0, 27])):
        caches = [LoopKVCache(cfg, 2, 24, 3, pad=pad) for _ in range(2)]
        for c in caches:  # the same history in both
            c.k.normal_(generator=torch.Generator().manual_seed(4))
            c.v.normal_(generator=torch.Generator().manual_seed(5))
            c.pos = pos
        x = torch.randn(2, 1, cfg.d_model, generator=g)
        for index, block in enumerate(model.blocks()):
            layer = CacheLayer(caches[0], index)
            with torch.no_grad():
                ref = block(x, cos[pos:pos + 1], sin[pos:pos + 1], layer)
                out, kv = TokenBlock(block)(x[:, 0], rot, caches[1], index)
            assert torch.allclose(out, ref[:, 0], atol=1e-5, rtol=1e-5), (pad, index)
            assert all(torch.allclose(a.transpose(1, 2), b, atol=1e-6) for a, b in zip(kv, layer.written))
        for got, want in ((caches[1].k, caches[0].k), (caches[1].v, caches[0].v)):
            assert torch.allclose(got, want, atol=1e-6)
