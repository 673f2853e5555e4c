"""The looped forward pass over a KV cache, with optional per-token exit.

`Decoder.forward(tokens, depth)` runs a chunk of tokens (a prompt, or one new token per row)
through prelude -> `depth` recurrences -> coda, reading and writing `LoopKVCache`, and returns
the next-token logits of the chunk's last position. It computes what `LoopedLM.forward` computes
on the whole sequence: cached decoding with one cache slot per recurrence equals recomputation.

Per-token exit (`exit_rule`, one token per row): after each recurrence every row still running
measures the rule; a row that fires is frozen, its state and so its output no longer change, and
the others go on, up to `depth` recurrences. Rows never influence each other (attention reads
only the row's own cache), so a batch gives what each sequence gives alone.

The KV entries of skipped recurrences (policy "repeat the last"). A token that exits after e
recurrences never computes recurrences e..depth-1, yet later tokens at those recurrences attend
to it. Its entries there are copies of its last computed recurrence (e-1), block by block: the
token's deepest keys and values stand in for the depths it skipped. In a batch the frozen rows
write these copies while the others compute; when every row has exited the remaining slots are
filled without computing. The prompt, prefilled at a fixed depth below the decoding cap, gets the
same treatment for the recurrences past its depth.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import kernels as K
from ..model import LoopedLM
from .cache import CacheLayer, LoopKVCache
from .exit import ExitRule, ExitState
from .step import RopeRotations, RowNorm, TokenBlock


@dataclass
class StepOutput:
    logits: torch.Tensor          # [B, V] next-token logits of the chunk's last position
    recurrences: torch.Tensor     # [B] recurrences each row ran for its last token


class Decoder:
    """Looped decoding over a cache. `max_depth` bounds the recurrences any token may run (the
    cache fills skipped entries up to it); kv_budget defaults to one slot per recurrence."""

    def __init__(self, model: LoopedLM, batch: int, length: int, max_depth: int,
                 kv_budget: Optional[int] = None, pad: Optional[torch.Tensor] = None):
        self.model, self.cfg, self.max_depth = model, model.cfg, max_depth
        p = model.embed.weight
        self.cache = LoopKVCache(model.cfg, batch, length, kv_budget or max_depth, p.dtype, p.device, pad)
        # One-token steps (every decoded token) take the lean path of step.py.
        self.steps = {part: [TokenBlock(b) for b in getattr(model, part)] for part in ("prelude", "recur", "coda")}
        self.rotations = RopeRotations(model, p.dtype)
        self.row_norms = {id(n): RowNorm(n.weight.size(0), n.eps, n.weight.detach(), p.dtype, p.device, n.kernels)
                          for n in (model.norm_emb, model.norm_recur, model.norm_final)}
        w = model.injection.weight
        if w is not None:  # linear injection W [e ; s], as two transposed halves (see _injector)
            d = w.size(0)
            self.inject_e = w.detach()[:, :d].t().contiguous()
            self.inject_s = w.detach()[:, d:].t().contiguous()

    # ------------------------------------------------------------------ pieces
    def _rope(self, T: int):
        """(cos, sin) of the chunk's positions, or for one token its [D, D] rotation (step.py)."""
        m, start, end = self.model, self.cache.pos, self.cache.pos + T
        if end > m.rope_cos.size(0):  # past the training length: grow the tables geometrically
            with torch.inference_mode(False):  # the model keeps them: no inference tensors
                m.rope(max(end, 2 * m.rope_cos.size(0)))
        if T == 1:
            return None, None, self.rotations(start)
        return m.rope_cos[start:end], m.rope_sin[start:end], None

    def _block(self, part, j, x, rope, index, keep=None, fallback=None):
        """Block j of `part` on x over cache layer `index`; returns (output, the (k, v) it stored)."""
        cos, sin, rot = rope
        if rot is not None:
            return self.steps[part][j](x, rot, self.cache, index, keep, fallback)
        layer = CacheLayer(self.cache, index, keep, fallback)
        return getattr(self.model, part)[j](x, cos, sin, layer), layer.written

    def _group(self, u, i, rope, keep=None, last=None):
        """One pass (recurrence i) through the recurrent group; returns (h, what each block wrote)."""
        written = []
        for j in range(self.cfg.n_recur_block):
            u, kv = self._block("recur", j, u, rope, self.cache.recur_index(i, j), keep,
                                None if last is None else last[j])
            written.append(kv)
        return u, written

    def _coda(self, x, rope) -> torch.Tensor:
        m = self.model
        for j in range(self.cfg.n_coda):
            x = self._block("coda", j, x, rope, self.cache.coda_index(j))[0]
        if x.dim() == 2:  # one token per row (step.py)
            return m.head.logits(self._norm(m.norm_final, x))
        return m.head.logits(self._norm(m.norm_final, x[:, -1:]))[:, 0]

    def _norm(self, norm, x):
        """The RMSNorm module itself on a chunk, its maths on the row path for one-token rows (step.py)."""
        return self.row_norms[id(norm)](x) if x.dim() == 2 else norm(x)

    def _injector(self, e):
        """s -> the input of the next pass. Linear injection W [e ; s] computes the prelude's
        share e W_e once per chunk instead of once per recurrence."""
        inj = self.model.injection
        if inj.mode != "linear":
            return lambda s: K.inject(e, s, inj.mode, inj.weight)
        if e.dim() == 2:  # one token per row: the halves stored transposed, as TokenBlock's weights
            ue = torch.mm(e, self.inject_e)
            return lambda s: torch.addmm(ue, s, self.inject_s)
        half = K.inject_e_half(e, inj.weight)  # a chunk: the model's own pieces
        return lambda s: K.inject(e, s, "linear", inj.weight, half)

    # ------------------------------------------------------------------ forward
    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, depth: Optional[int] = None,
                exit_rule: Optional[ExitRule] = None) -> StepOutput:
        m, cache = self.model, self.cache
        depth = depth or self.max_depth
        if depth > self.max_depth:
            raise ValueError(f"depth {depth} exceeds the decoder's max_depth {self.max_depth}")
        B, T = tokens.shape
        if exit_rule is not None and T != 1:
            raise ValueError("per-token exit decodes one token per row at a time")
        rope = self._rope(T)
        # LoopedLM.embed_tokens; a one-token step carries [B, d] rows (step.py), a chunk [B, T, d]
        x = self._norm(m.norm_emb, m.embed.weight[tokens.view(-1) if T == 1 else tokens])
        for j in range(self.cfg.n_prelude):
            x = self._block("prelude", j, x, rope, j)[0]
        e, inj = x, m.injection
        inject = None if inj.mode == "hyperconnect" else self._injector(e)
        lanes_mode = inj.mode == "hyperconnect"
        R_lane = inj.alpha.size(0) if lanes_mode else 1
        state = e.unsqueeze(0).expand(inj.alpha.size(1), *e.shape) if lanes_mode else inj.initial_state(e)
        out = None                       # the coda's input after the latest recurrence
        used = torch.full((B,), depth, dtype=torch.long, device=e.device)
        judge = ExitState(exit_rule) if exit_rule is not None else None
        active = None if judge is None else torch.ones(B, dtype=torch.bool, device=e.device)
        last, logits, i = None, None, 0  # last: what each block wrote at the latest recurrence
        for i in range(depth):
            keep = None if judge is None or bool(active.all()) else active
            if lanes_mode:
                a, M, b = inj.alpha[i % R_lane], inj.mix[i % R_lane], inj.beta[i % R_lane]
                h, last = self._group(K.hc_combine(state, a, m.kernels), i, rope, keep, last)
                new_state = K.hc_update(state, self._norm(m.norm_recur, h), M, b, m.kernels)
                new_out = new_state.sum(0)
            else:
                h, last = self._group(inject(state), i, rope, keep, last)
                new_state = new_out = self._norm(m.norm_recur, h)
            if keep is None:
                state, out = new_state, new_out
            else:  # frozen rows keep their state
                k3 = keep.view(-1, *[1] * (out.dim() - 1))
                state = torch.where(k3[None] if lanes_mode else k3, new_state, state)
                out = torch.where(k3, new_out, out)
            if judge is None or i == depth - 1:
                continue
            logits = self._coda(out, rope) if exit_rule.needs_logits else None
            fired = judge.fires(judge.measure(out, logits))
            if fired is not None:
                stop = active & fired
                used = torch.where(stop, torch.full_like(used, i + 1), used)
                active = active & ~fired
                if not bool(active.any()):
                    break
        # The depths nobody computed: repeat each block's last entries (see the module docstring).
        for skipped in range(i + 1, min(self.max_depth, i + 1 + cache.kv_budget)):
            for j in range(self.cfg.n_recur_block):
                if T == 1:  # a TokenBlock's (k, v)
                    cache.write_one(cache.recur_index(skipped, j), *last[j])
                else:
                    cache.fill(skipped, j, last[j])
        # The coda's cache must hold every row's final output. The latest probe ran on it exactly
        # when it followed the last recurrence computed (frozen rows do not change).
        if logits is None or i == depth - 1:
            logits = self._coda(out, rope)
        cache.advance(T)
        return StepOutput(logits, used)
