"""Loader contracts: exact packing, seeded shuffles, blend weights, exact resume across dp sizes.

The reference for every check is computed here from the documents written, not from the .bin.
"""
from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import pytest
import torch

from megaloop.data.errors import DatasetError
from megaloop.data.indexed import IndexedDatasetWriter
from megaloop.data.loader import PackedLoader, eval_batches

EOS, T = 1, 8


def _make(prefix: str, lo: int, hi: int, n_docs: int, seed: int) -> list[int]:
    """Write random documents with ids in [lo, hi); return the reference stream (docs + eos)."""
    rng = np.random.default_rng(seed)
    stream: list[int] = []
    with IndexedDatasetWriter(prefix, 1000, EOS) as w:
        for _ in range(n_docs):
            doc = rng.integers(lo, hi, size=int(rng.integers(1, 30))).tolist()
            w.add_document(doc)
            stream += doc + [EOS]
    return stream


def _windows(stream: list[int]) -> list[tuple]:
    n = (len(stream) - 1) // T
    return [tuple(stream[i * T: i * T + T + 1]) for i in range(n)]


def _rows(x: torch.Tensor, y: torch.Tensor) -> list[tuple]:
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape and x.shape[1] == T
    assert torch.equal(x[:, 1:], y[:, :-1])
    return [tuple(xr.tolist()) + (int(yr[-1]),) for xr, yr in zip(x, y)]


@pytest.fixture
def one(tmp_path):
    prefix = str(tmp_path / "a")
    return prefix, _make(prefix, 2, 100, 40, seed=1)


@pytest.fixture
def two(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    return (a, _make(a, 2, 100, 60, seed=1)), (b, _make(b, 100, 200, 60, seed=2))


def test_epoch_covers_every_window_once(one) -> None:
    """One epoch yields exactly the reference windows (stride T, T+1 tokens), each once; the next
    epoch is the same set in a different order."""
    prefix, stream = one
    ref = _windows(stream)
    loader = PackedLoader([prefix], None, T, 1, seed=0)
    assert loader.samples_per_epoch == [len(ref)]
    epoch1 = [r for _ in ref for r in _rows(*loader.next_batch())]
    epoch2 = [r for _ in ref for r in _rows(*loader.next_batch())]
    assert Counter(epoch1) == Counter(ref) == Counter(epoch2)
    assert epoch1 != ref and epoch1 != epoch2  # shuffled, and re-shuffled per epoch


def test_shuffle_is_seeded(one) -> None:
    """Same seed -> same batches; another seed -> another order."""
    prefix, _ = one
    a, b, c = (PackedLoader([prefix], None, T, 4, seed=s) for s in (7, 7, 8))
    for _ in range(5):
        xa, _ = a.next_batch()
        xb, _ = b.next_batch()
        assert torch.equal(xa, xb)
    assert not all(torch.equal(a.next_batch()[0], c.next_batch()[0]) for _ in range(3))


def test_blend_weights_are_honoured(two) -> None:
    """With weights 0.7/0.3 the share of samples from each dataset matches within 1 %."""
    (a, _), (b, _) = two
    loader = PackedLoader([a, b], [0.7, 0.3], T, 10, seed=0)
    from_a = total = 0
    for _ in range(100):
        x, _ = loader.next_batch()
        is_a = (x < 100).all(dim=1)  # dataset b's windows always hold ids >= 100
        from_a += int(is_a.sum())
        total += x.shape[0]
    assert abs(from_a / total - 0.7) < 0.01
    assert loader.counts.tolist() == [from_a, total - from_a]


def _run(loader: PackedLoader, steps: int) -> list[list[tuple]]:
    return [_rows(*loader.next_batch()) for _ in range(steps)]


def test_resume_continues_exactly(two) -> None:
    """Loading a state_dict reproduces the uninterrupted loader's following batches, across epochs."""
    (a, _), (b, _) = two
    ref = PackedLoader([a, b], [2, 1], T, 3, seed=5)
    before = _run(ref, 40)
    state = copy.deepcopy(ref.state_dict())
    after = _run(ref, 40)  # crosses epoch boundaries of the smaller dataset
    resumed = PackedLoader([a, b], [2, 1], T, 3, seed=5)
    resumed.load_state_dict(state)
    assert _run(resumed, 40) == after
    assert before != after


def _global(loaders: list[PackedLoader], steps: int) -> list[list[tuple]]:
    """Interleave rank batches back into global order: rank r holds samples r, r + dp, ..."""
    out = []
    for _ in range(steps):
        per_rank = [_rows(*ld.next_batch()) for ld in loaders]
        out.append([per_rank[j % len(loaders)][j // len(loaders)] for j in range(sum(map(len, per_rank)))])
    return out


def test_dp_sharding_gives_the_same_global_batch(two) -> None:
    """dp_size=2 with micro-batch 2 sees exactly the global batches of dp_size=1 with micro-batch 4."""
    (a, _), (b, _) = two
    single = _global([PackedLoader([a, b], [1, 1], T, 4, seed=3)], 10)
    ranks = [PackedLoader([a, b], [1, 1], T, 2, seed=3, dp_rank=r, dp_size=2) for r in range(2)]
    assert _global(ranks, 10) == single


@pytest.mark.parametrize("dp_before,dp_after", [(1, 2), (2, 1), (2, 4)])
def test_resume_under_another_dp_size(two, dp_before, dp_after) -> None:
    """Saved at one dp size and resumed at another (same global batch), the global stream goes on
    with exactly the samples the uninterrupted single-rank loader would give."""
    (a, _), (b, _) = two
    gb = 4
    ref = PackedLoader([a, b], [3, 1], T, gb, seed=11)
    _global([ref], 6)
    expected = _global([ref], 6)
    first = [PackedLoader([a, b], [3, 1], T, gb // dp_before, 11, r, dp_before) for r in range(dp_before)]
    _global(first, 6)
    states = [ld.state_dict() for ld in first]
    assert all(s == states[0] for s in states)  # the state is rank-independent
    second = [PackedLoader([a, b], [3, 1], T, gb // dp_after, 11, r, dp_after) for r in range(dp_after)]
    for ld in second:
        ld.load_state_dict(states[0])
    assert _global(second, 6) == expected


def test_resume_refuses_other_data(two, one) -> None:
    """A state saved on other datasets or another seq_len is refused with a clear error."""
    (a, _), (b, _) = two
    state = PackedLoader([a, b], [1, 1], T, 2, seed=0).state_dict()
    with pytest.raises(DatasetError, match="same data"):
        PackedLoader([a], None, T, 2, seed=0).load_state_dict(state)
    with pytest.raises(DatasetError, match="seq_len"):
        PackedLoader([a, b], [1, 1], T + 1, 2, seed=0).load_state_dict(state)


def test_dataset_shorter_than_a_window(tmp_path) -> None:
    """A dataset with fewer than seq_len + 1 tokens is refused, naming seq_len."""
    prefix = str(tmp_path / "tiny")
    with IndexedDatasetWriter(prefix, 1000, EOS) as w:
        w.add_document([5, 6])
    with pytest.raises(DatasetError, match="seq_len"):
        PackedLoader([prefix], None, T, 1, seed=0)
    with pytest.raises(DatasetError, match="seq_len"):
        list(eval_batches(prefix, T, 2))


def test_eval_batches_in_order(one) -> None:
    """Validation batches are the windows in file order: targets cover stream[1 : 1 + n*T] once;
    max_tokens caps the targets; two calls give identical batches."""
    prefix, stream = one
    ref = _windows(stream)
    rows = [r for x, y in eval_batches(prefix, T, 3) for r in _rows(x, y)]
    assert rows == ref
    ys = torch.cat([y.reshape(-1) for _, y in eval_batches(prefix, T, 3)]).tolist()
    assert ys == stream[1: 1 + len(ref) * T]
    capped = list(eval_batches(prefix, T, 3, max_tokens=5 * T))
    assert sum(x.shape[0] for x, _ in capped) == 5 and [b.shape[0] for b, _ in capped] == [3, 2]
    again = list(eval_batches(prefix, T, 3, max_tokens=5 * T))
    assert all(torch.equal(p[0], q[0]) for p, q in zip(capped, again))
