"""Packed, shuffled, blended, data-parallel-sharded training batches, resumable exactly.

Samples. A dataset's token stream (documents back to back, each ending in its eos id) is cut
into windows of seq_len + 1 tokens with stride seq_len: window i = tokens[i*T : i*T + T + 1],
x = window[:-1], y = window[1:]. Consecutive windows share one token, so every token after the
first is a target exactly once per epoch. A dataset has (n_tokens - 1) // T windows; the tail is
dropped.

Order. Each dataset visits its windows in a fresh seeded permutation every epoch
(numpy Generator seeded with (seed, dataset index, epoch)), independently of other datasets.

Blending. Global sample g comes from the dataset whose count lags its share the most,
argmax_d(w_d * (g + 1) - count_d) (the greedy error-minimising schedule, as in Megatron's
blendable dataset): deterministic, and every prefix of the stream matches the weights to
within one sample per dataset.

Sharding. A step consumes a global batch of micro_batch_size * dp_size samples; rank r takes the
samples g0 + r, g0 + r + dp_size, ... So the global batch is the same for any dp_size with the
same global batch size, and the state (global samples consumed, per-dataset counts) is
rank-independent: a run saved at one dp_size resumes at another without repeating or skipping.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from .errors import DatasetError
from .token_files import open_dataset

STATE_VERSION = 1


def num_windows(n_tokens: int, seq_len: int) -> int:
    return max(0, (n_tokens - 1) // seq_len)


def window(tokens: np.ndarray, i: int, seq_len: int) -> np.ndarray:
    return tokens[i * seq_len: i * seq_len + seq_len + 1]


def _to_xy(samples: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = torch.from_numpy(np.stack(samples).astype(np.int64))
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


class PackedLoader:
    def __init__(self, prefixes: Sequence[str], weights: Optional[Sequence[float]], seq_len: int,
                 micro_batch_size: int, seed: int, dp_rank: int = 0, dp_size: int = 1):
        if isinstance(prefixes, str):
            prefixes = [prefixes]
        if not prefixes:
            raise DatasetError("no training datasets given")
        weights = [1.0] * len(prefixes) if weights is None else [float(w) for w in weights]
        if len(weights) != len(prefixes) or not all(w > 0 and np.isfinite(w) for w in weights):
            raise DatasetError(f"need one positive weight per training dataset, got {weights} for "
                               f"{len(prefixes)} dataset(s)")
        if seq_len < 1 or micro_batch_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad loader shape: seq_len={seq_len}, micro_batch_size={micro_batch_size}, "
                             f"dp_rank={dp_rank}, dp_size={dp_size}")
        self.datasets = [open_dataset(p) for p in prefixes]
        self.seq_len, self.micro_batch_size = int(seq_len), int(micro_batch_size)
        self.seed, self.dp_rank, self.dp_size = int(seed), int(dp_rank), int(dp_size)
        self.weights = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.samples_per_epoch = [num_windows(d.n_tokens, self.seq_len) for d in self.datasets]
        for d, n in zip(self.datasets, self.samples_per_epoch):
            if n == 0:
                raise DatasetError(f"{d.prefix}: {d.n_tokens} tokens, fewer than model.seq_len + 1 = "
                                   f"{self.seq_len + 1}: lower model.seq_len or add data")
        self.global_samples = 0                       # samples consumed by all ranks together
        self.counts = np.zeros(len(self.datasets), dtype=np.int64)  # per dataset, across epochs
        # Samples drawn into steps that a divergence rewind threw away (train.on_divergence): drawn,
        # but not trained on. counts - discarded is the token ledger (tokens_by_dataset).
        self.discarded = np.zeros(len(self.datasets), dtype=np.int64)
        self._perms: dict[int, tuple[int, np.ndarray]] = {}

    # ------------------------------------------------------------------ order

    def _perm(self, d: int, epoch: int) -> np.ndarray:
        cached = self._perms.get(d)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed % 2**63, d, epoch])
            cached = (epoch, rng.permutation(self.samples_per_epoch[d]))
            self._perms[d] = cached
        return cached[1]

    def _sample(self, d: int, k: int) -> np.ndarray:
        """The k-th sample ever drawn from dataset d."""
        epoch, j = divmod(k, self.samples_per_epoch[d])
        return window(self.datasets[d].tokens, int(self._perm(d, epoch)[j]), self.seq_len)

    def _next_dataset(self) -> int:
        if len(self.datasets) == 1:
            return 0
        lag = self.weights * (self.global_samples + 1) - self.counts
        return int(np.argmax(lag))  # ties go to the lowest index: deterministic

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's micro-batch: (x, y), int64 tensors of shape [micro_batch_size, seq_len]."""
        mine = []
        for j in range(self.micro_batch_size * self.dp_size):
            d = self._next_dataset()
            k = int(self.counts[d])
            self.counts[d] += 1
            self.global_samples += 1
            if j % self.dp_size == self.dp_rank:
                mine.append(self._sample(d, k))
        return _to_xy(mine)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    @property
    def epochs(self) -> list[float]:
        """Epochs consumed of each dataset (fractional)."""
        return [float(c) / n for c, n in zip(self.counts, self.samples_per_epoch)]

    # ------------------------------------------------------------------ token ledger

    def tokens_by_dataset(self) -> dict:
        """The token ledger: target tokens trained on, per training dataset (its prefix), counted
        from the global sample stream, so it is the same on every rank and for any data-parallel
        size. Each sample is seq_len target tokens; samples of steps a rewind discarded do not
        count. Its sum is the run's D (tokens) for the scaling-law fit."""
        trained = (self.counts - self.discarded) * self.seq_len
        return {d.prefix: int(t) for d, t in zip(self.datasets, trained)}

    def discard_since(self, saved_state: dict) -> None:
        """A rewind to a checkpoint whose loader state is `saved_state`: the samples drawn since
        stay consumed (the stream goes on) but leave the ledger, which returns to the saved one."""
        saved_trained = np.asarray(saved_state["counts"], dtype=np.int64) - np.asarray(
            saved_state.get("discarded", [0] * len(self.datasets)), dtype=np.int64)
        self.discarded = self.counts - saved_trained

    # ------------------------------------------------------------------ resume

    def _identity(self) -> list[dict]:
        return [{"prefix": d.prefix, "n_tokens": d.n_tokens, "tokenizer": d.tokenizer_fingerprint}
                for d in self.datasets]

    def state_dict(self) -> dict:
        """Plain Python data; independent of dp_rank, dp_size and micro_batch_size."""
        return {"version": STATE_VERSION, "global_samples": int(self.global_samples),
                "counts": [int(c) for c in self.counts], "seed": self.seed, "seq_len": self.seq_len,
                "weights": [float(w) for w in self.weights], "datasets": self._identity(),
                "discarded": [int(c) for c in self.discarded], "tokens_by_dataset": self.tokens_by_dataset()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise DatasetError(f"loader state version {state.get('version')} is not {STATE_VERSION}: "
                               f"this checkpoint was written by another megaloop version")
        saved = state["datasets"]
        now = self._identity()
        same_data = len(saved) == len(now) and all(
            a["n_tokens"] == b["n_tokens"] and a["tokenizer"] == b["tokenizer"] for a, b in zip(saved, now))
        if not same_data:
            raise DatasetError(f"cannot resume the data loader: the checkpoint was trained on "
                               f"{[(s['prefix'], s['n_tokens']) for s in saved]} but the datasets now are "
                               f"{[(s['prefix'], s['n_tokens']) for s in now]}. Resume with the same data")
        if state["seq_len"] != self.seq_len or state["seed"] != self.seed:
            raise DatasetError(f"cannot resume the data loader: it was saved with seq_len={state['seq_len']}, "
                               f"seed={state['seed']}, now seq_len={self.seq_len}, seed={self.seed}")
        if not np.allclose(state["weights"], self.weights):
            raise DatasetError(f"cannot resume the data loader: blend weights were {state['weights']}, now "
                               f"{self.weights.tolist()}. Resume with the same data.train weights")
        self.global_samples = int(state["global_samples"])
        self.counts = np.asarray(state["counts"], dtype=np.int64)
        self.discarded = np.asarray(state.get("discarded", [0] * len(self.datasets)), dtype=np.int64)
        if self.counts.sum() != self.global_samples:
            raise DatasetError("loader state is inconsistent (per-dataset counts do not add up)")


def eval_batches(prefix: str, seq_len: int, batch_size: int,
                 max_tokens: Optional[int] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Validation batches in file order, unshuffled: windows with stride seq_len, so every target
    token is scored once. Stops after max_tokens targets (at least one window); the last batch may
    be smaller than batch_size. Identical on every call and every rank."""
    ds = open_dataset(prefix)
    n = num_windows(ds.n_tokens, seq_len)
    if n == 0:
        raise DatasetError(f"{ds.prefix}: the validation set has {ds.n_tokens} tokens, fewer than "
                           f"model.seq_len + 1 = {seq_len + 1}: raise data.valid_fraction or lower model.seq_len")
    if max_tokens is not None:
        n = min(n, max(1, int(max_tokens) // seq_len))
    for s in range(0, n, batch_size):
        yield _to_xy([window(ds.tokens, i, seq_len) for i in range(s, min(n, s + batch_size))])
