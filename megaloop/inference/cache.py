"""A KV cache that knows the loop.

Layout (one layer = the keys and values of one attention layer):

    [ prelude 0 .. n_prelude-1 | slot 0: recur blocks 0 .. n_recur_block-1 | slot 1: ... |
      slot kv_budget-1: ... | coda 0 .. n_coda-1 ]

Recurrence i of the recurrent group writes slot `i % kv_budget`. With kv_budget equal to the
recurrences run, every recurrence keeps its own keys and values and cached decoding is exact;
a smaller budget trades that exactness for memory (a later token at recurrence i then reads the
most recent recurrence of the past tokens that shares its slot).

Each layer is a ring buffer over `length` positions: absolute position p lives at index
p % length. Attention only ever sees the last `length` positions, so generation runs past the
training length as sliding-window attention (RoPE is relative, so the distances it sees stay
those of training).

Rows may be left-padded (`pad[b]` leading positions of row b are padding): no real token attends
to a padding position, and a padding position attends only to itself, so it stays finite.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..config import ModelConfig


class LoopKVCache:
    def __init__(self, cfg: ModelConfig, batch: int, length: int, kv_budget: int,
                 dtype: torch.dtype = torch.float32, device=None, pad: Optional[torch.Tensor] = None):
        if kv_budget < 1:
            raise ValueError(f"kv_budget must be >= 1, got {kv_budget}")
        self.n_prelude, self.n_block, self.n_coda = cfg.n_prelude, cfg.n_recur_block, cfg.n_coda
        self.kv_budget, self.length, self.batch = kv_budget, length, batch
        n_layers = self.n_prelude + kv_budget * self.n_block + self.n_coda
        # Stored heads-major [layers, B, Hk, L, D], so one layer's keys are attention's
        # [B, Hk, L, D] operand as they lie; k and v are position-major views of that storage.
        shape = (n_layers, batch, cfg.kv_heads, length, cfg.hdim)
        self.k_heads = torch.zeros(shape, dtype=dtype, device=device)
        self.v_heads = torch.zeros(shape, dtype=dtype, device=device)
        self.k, self.v = self.k_heads.transpose(2, 3), self.v_heads.transpose(2, 3)  # [layers, B, L, Hk, D]
        self.k_layers = [self.k_heads[i] for i in range(n_layers)]  # per-layer views, made once
        self.v_layers = [self.v_heads[i] for i in range(n_layers)]
        self.pos = 0  # absolute position of the next token (the same for every row)
        self._masks: dict = {}  # per chunk: every layer attends with the same mask
        self._slot: Optional[tuple] = None  # (position, its ring index as a tensor) for write_one
        self.pad = None if pad is None or not bool((pad > 0).any()) else pad.to(device)

    # ------------------------------------------------------------------ layers
    def prelude(self, j: int) -> "CacheLayer":
        return CacheLayer(self, j)

    def recur(self, i: int, j: int, keep: Optional[torch.Tensor] = None,
              fallback: Optional[tuple] = None) -> "CacheLayer":
        """Block j of the group at recurrence i (slot i % kv_budget). Rows where `keep` is False
        (tokens that already exited) write `fallback` (k, v) instead of what they computed."""
        return CacheLayer(self, self.recur_index(i, j), keep, fallback)

    def coda(self, j: int) -> "CacheLayer":
        return CacheLayer(self, self.coda_index(j))

    def recur_index(self, i: int, j: int) -> int:
        return self.n_prelude + (i % self.kv_budget) * self.n_block + j

    def coda_index(self, j: int) -> int:
        return self.n_prelude + self.kv_budget * self.n_block + j

    def fill(self, i: int, j: int, kv: tuple) -> None:
        """Write kv for the chunk in flight into block j's slot of recurrence i without computing
        it: the entries of recurrences that an exited token skips (see decode.py). kv: what
        Block stored over a CacheLayer ([B, T, Hk, D]; a TokenBlock's go to write_one)."""
        self.recur(i, j).write(*kv)

    def write_one(self, index: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one token per row (k/v [B, Hk, 1, D]) in layer `index` at this position."""
        if self._slot is None or self._slot[0] != self.pos:  # the ring index, shared by every layer
            self._slot = (self.pos, torch.tensor([self.pos % self.length], device=self.k.device))
        self.k_layers[index].index_copy_(2, self._slot[1], k)
        self.v_layers[index].index_copy_(2, self._slot[1], v)

    def attend_one(self, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One token per row (q [B, Hq, 1, D], k/v [B, Hk, 1, D]): store k and v in layer `index`
        at this position's ring index, in place, and attend over the window; returns
        [B, Hq, 1, D]. The ring then holds exactly the last min(pos + 1, length) positions, all
        visible to the token, so only padding needs a mask."""
        self.write_one(index, k, v)
        keys, values = self.k_layers[index], self.v_layers[index]
        n = self.pos + 1
        if n < self.length:  # (narrow: a cheaper call than [:, :, :n] indexing)
            keys, values = keys.narrow(2, 0, n), values.narrow(2, 0, n)
        mask = None if self.pad is None else self.chunk_mask(min(n, self.length), 1, wrapped=False)
        qd = q if q.dtype == keys.dtype else q.to(keys.dtype)
        y = F.scaled_dot_product_attention(qd, keys, values, attn_mask=mask, enable_gqa=keys.size(1) != q.size(1))
        return y if y.dtype == q.dtype else y.to(q.dtype)

    def advance(self, T: int) -> None:
        self.pos += T
        self._masks.clear()

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def describe(self) -> dict:
        return {"bytes": self.nbytes, "layers": self.k.size(0), "kv_budget": self.kv_budget,
                "batch": self.batch, "window": self.length, "kv_heads": self.k.size(3),
                "head_dim": self.k.size(4), "dtype": str(self.k.dtype).replace("torch.", "")}

    # ------------------------------------------------------------------ masks
    def positions(self, n: int, upto: int) -> torch.Tensor:
        """Absolute positions held at ring indices 0..n-1 when positions < upto are written
        (-1 where nothing is)."""
        j = torch.arange(n, device=self.k.device)
        p = upto - 1 - torch.remainder(upto - 1 - j, self.length)
        return torch.where(p >= 0, p, torch.full_like(p, -1))

    def chunk_mask(self, n: int, T: int, wrapped: bool) -> Optional[torch.Tensor]:
        """The attention mask of a chunk of T queries at self.pos over n keys: the n ring
        entries after the write, or (wrapped) the whole ring before it followed by the chunk."""
        key = (n, T, wrapped)
        if key not in self._masks:
            q_pos = torch.arange(self.pos, self.pos + T, device=self.k.device)
            key_pos = torch.cat([self.positions(n, self.pos), q_pos]) if wrapped else self.positions(n, self.pos + T)
            self._masks[key] = self.mask(key_pos, q_pos)
        return self._masks[key]

    def mask(self, key_pos: torch.Tensor, q_pos: torch.Tensor) -> Optional[torch.Tensor]:
        """Boolean [B or 1, 1, Tq, Tk]: causal, inside the window, not padding (None if all true)."""
        kp, qp = key_pos[None, :], q_pos[:, None]
        ok = (kp <= qp) & (kp > qp - self.length) & (kp >= 0)
        if self.pad is not None:
            ok = (ok[None] & (kp[None] >= self.pad[:, None, None])) | (kp == qp)[None]
            return ok[:, None]
        return None if bool(ok.all()) else ok[None, None]


class CacheLayer:
    """One attention layer's view of the cache, called by Attention as cache(q, k, v)."""

    def __init__(self, cache: LoopKVCache, index: int, keep=None, fallback=None):
        self.cache, self.index, self.keep, self.fallback = cache, index, keep, fallback
        self.written: Optional[tuple] = None  # the (k, v) this call stored, for the exit policy

    def write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        c = self.cache
        T = k.size(1)
        if T == 1:  # one token: a slice, not an index tensor
            c.k[self.index][:, c.pos % c.length] = k[:, 0]
            c.v[self.index][:, c.pos % c.length] = v[:, 0]
            return
        idx = torch.remainder(torch.arange(c.pos, c.pos + T, device=k.device), c.length)
        c.k[self.index][:, idx] = k.to(c.k.dtype)
        c.v[self.index][:, idx] = v.to(c.v.dtype)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        c = self.cache
        if self.keep is not None:
            keep = self.keep[:, None, None, None]
            k, v = torch.where(keep, k, self.fallback[0]), torch.where(keep, v, self.fallback[1])
        self.written = (k, v)
        T, p0, L = q.size(1), c.pos, c.length
        if T == 1 or p0 + T <= L:
            # The chunk overwrites nothing a query of it still needs: store, then attend.
            self.write(k, v)
            n = min(p0 + T, L)
            keys, values = c.k[self.index][:, :n], c.v[self.index][:, :n]
            mask = c.chunk_mask(n, T, wrapped=False)
        else:
            # A chunk wrapping the ring would overwrite keys its own first queries need.
            keys = torch.cat([c.k[self.index], k.to(c.k.dtype)], 1)
            values = torch.cat([c.v[self.index], v.to(c.v.dtype)], 1)
            mask = c.chunk_mask(L, T, wrapped=True)
            self.write(k, v)
        qt, kt, vt = (t.transpose(1, 2) for t in (q.to(keys.dtype), keys, values))
        y = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=kt.size(1) != qt.size(1))
        return y.transpose(1, 2).to(q.dtype)
