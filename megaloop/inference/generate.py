"""Text generation with the loop-aware KV cache (and optional per-token exit).

The prompt is prefilled in one pass at `num_recur` recurrences; every new token then runs one
cached step of up to `max_recur` recurrences (fewer where `exit_rule` lets it stop). Prompts
of different lengths are left-padded. Past the window (the model's seq_len by default) the cache
slides: each token attends to the last `window` positions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..config import recurrences
from ..model import LoopedLM, sample
from .decode import Decoder
from .exit import ExitRule


@dataclass
class Generation:
    tokens: torch.Tensor                 # [B, prompt + new] (left-padded prompts, then the new tokens)
    new_tokens: list                     # per row: the generated ids
    recurrences: torch.Tensor            # [B, new - 1]: recurrences run by each decoded token
    cache: dict = field(default_factory=dict)  # LoopKVCache.describe(): bytes, layers, window, ...

    @property
    def mean_recurrences(self) -> float:
        return float(self.recurrences.float().mean()) if self.recurrences.numel() else float("nan")


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ([B, T] left-padded ids, [B] pad counts)."""
    T = max(len(p) for p in prompts)
    if T == 0:
        raise ValueError("every prompt is empty; give at least one token (e.g. the end-of-document id)")
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        if p:
            ids[b, T - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
    return ids, torch.tensor([T - len(p) for p in prompts], dtype=torch.long)


@torch.no_grad()
def generate(model: LoopedLM, prompts: Union[torch.Tensor, Sequence[Sequence[int]]], max_new_tokens: int,
             temperature: float = 0.0, top_k: Optional[int] = None, num_recur: Optional[int] = None,
             generator: Optional[torch.Generator] = None, kv_budget: Optional[int] = None,
             exit_rule: Optional[ExitRule] = None, max_recur: Optional[int] = None,
             window: Optional[int] = None, pad_id: int = 0) -> Generation:
    """Continue each prompt by max_new_tokens tokens. prompts: a [B, T] tensor or token lists.

    num_recur: recurrences of the prompt (and of every token without exit; default: trained r).
    max_recur: the most recurrences a decoded token may run (default num_recur); past the
    trained r is allowed. kv_budget: recurrent cache slots (1..max_recur; default max_recur).
    """
    r = recurrences(num_recur, model.cfg.num_recur)
    depth = recurrences(max_recur, r)
    if isinstance(prompts, torch.Tensor):
        ids, pad = prompts, None
    else:
        ids, pad = left_pad(prompts, pad_id)
    ids = ids.to(model.embed.weight.device)
    window = window or model.cfg.seq_len
    ids, pad = ids[:, -window:], None if pad is None else (pad - max(0, ids.size(1) - window)).clamp_min(0)
    B = ids.size(0)
    decoder = Decoder(model, B, min(window, ids.size(1) + max_new_tokens), depth, kv_budget, pad)
    logits = decoder.forward(ids, min(r, depth)).logits
    new, used = [], []
    for n in range(max_new_tokens):
        nxt = sample(logits, temperature, top_k, generator)
        new.append(nxt)
        if n + 1 == max_new_tokens:
            break
        step = decoder.forward(nxt, depth, exit_rule)
        logits = step.logits
        used.append(step.recurrences)
    gen = torch.cat(new, 1) if new else ids[:, :0]
    rec = torch.stack(used, 1) if used else torch.zeros(B, 0, dtype=torch.long)
    return Generation(torch.cat([ids, gen], 1), gen.tolist(), rec, decoder.cache.describe())
