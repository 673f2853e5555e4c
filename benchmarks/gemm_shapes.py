"""The matrix products of one training step at their own shapes: what ceiling the shapes set.

A step of the benchmark shape is made of products much smaller than the 2048^3 one that gives the
"matmul peak" (tokens x d_model x d_model, tokens x d_model x 4 d_model, the head's tokens x
d_model x vocab, and the per-head attention products). Small products run below the peak, so the
peak is not a ceiling the step can reach. This section times every distinct product of one step
(forward, and the two products of each backward: the input and the weight gradient), weights
each by how often the step runs it, and reports the rate the step would reach if it did nothing
but these products: the FLOP-weighted rate `total FLOPs / total time`. The step's own rate
divided by that is the fraction of its matmul ceiling it reaches.

Attention is timed as batched products (torch.bmm over batch x heads); the fused attention kernel
of torch differs in detail but does the same products.
"""
from __future__ import annotations

import statistics
import time
from collections import Counter

import torch

from megaloop.config import Config


def step_products(cfg: Config) -> Counter:
    """{(batch, M, K, N): count}: every product of one training step at full backprop (batch 1 for
    plain matrix products). Each forward product (M, K, N) adds its backward pair: the input
    gradient (M, N, K) and the weight gradient (K, M, N)."""
    m, t = cfg.model, cfg.train
    tokens = t.micro_batch_size * m.seq_len
    d, hd, ff = m.d_model, m.hdim, m.mlp_ratio * m.d_model
    q, kv = m.n_head * hd, m.kv_heads * hd
    fwd: Counter = Counter()
    blocks = m.n_prelude + m.n_coda + m.num_recur * m.n_recur_block
    for shape in ((tokens, d, q), (tokens, d, kv), (tokens, d, kv), (tokens, q, d), (tokens, d, ff), (tokens, ff, d)):
        fwd[(1, *shape)] += blocks
    heads = t.micro_batch_size * m.n_head
    fwd[(heads, m.seq_len, hd, m.seq_len)] += blocks   # scores q k^T
    fwd[(heads, m.seq_len, m.seq_len, hd)] += blocks   # probabilities x v
    if m.num_recur > 1 and m.input_injection == "linear":
        fwd[(1, tokens, 2 * d, d)] += m.num_recur
    fwd[(1, tokens, d, m.vocab_size)] += 1             # LM head
    out: Counter = Counter()
    for (b, M, K, N), c in fwd.items():
        out[(b, M, K, N)] += c
        out[(b, M, N, K)] += c   # input gradient
        out[(b, K, M, N)] += c   # weight gradient
    return out


def _time_product(b: int, M: int, K: int, N: int, min_s: float = 0.05) -> float:
    """Seconds per product, the best of a few timed batches of repeats."""
    if b == 1:
        x, y = torch.randn(M, K), torch.randn(K, N)
        fn = lambda: torch.mm(x, y)  # noqa: E731
    else:
        x, y = torch.randn(b, M, K), torch.randn(b, K, N)
        fn = lambda: torch.bmm(x, y)  # noqa: E731
    fn()
    reps, best = 1, float("inf")
    while True:
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        dt = time.perf_counter() - t0
        if dt >= min_s:
            best = min(best, dt / reps)
            break
        reps *= 2
    for _ in range(2):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def measure(cfg: Config, rounds: int = 3) -> dict:
    """The FLOP-weighted rate of the step's products and the 2048^3 rate, timed round-robin."""
    prods = step_products(cfg)
    per: dict[tuple, list[float]] = {k: [] for k in prods}
    big: list[float] = []
    for _ in range(rounds):
        big.append(2 * 2048 ** 3 / _time_product(1, 2048, 2048, 2048))
        for k in prods:
            per[k].append(_time_product(*k))
    flops = sum(2 * b * M * K * N * c for (b, M, K, N), c in prods.items())
    secs = sum(statistics.median(per[k]) * c for k, c in prods.items())
    rows = [{"batch": b, "M": M, "K": K, "N": N, "count": c,
             "gflops_per_s": 2 * b * M * K * N / statistics.median(per[(b, M, K, N)]) / 1e9}
            for (b, M, K, N), c in sorted(prods.items(), key=lambda kv: -kv[0][0] * kv[0][1] * kv[0][2] * kv[0][3] * kv[1])]
    rate = flops / secs
    return {"method": "every product of one step (forward + input and weight gradients), timed with "
                      "torch.mm / torch.bmm, FLOP-weighted: total FLOPs / total time",
            "step_product_flops": flops, "step_product_seconds": secs,
            "step_products_rate": rate, "matmul_2048_rate_median": statistics.median(big),
            "step_products_over_2048": rate / statistics.median(big), "products": rows}
