"""Parameter and FLOP accounting for looped models: the inputs of the scaling law.

N_once = prelude + coda + the outer RMSNorm scales (after the embedding, norm_recur, final);
N_rec  = recurrent group + injection (adapter or hyperconnect lanes).
Embedding and LM head are excluded from both and reported separately.

FLOPs per token (DESIGN.md, as in the reference study):
    6 (prelude + coda + head) + (2 f + 6 g) (group + injection)
    + 12 n_head head_dim seq_len per differentiated layer application (4 per forward-only one)
where g = min(bptt_k, r) recurrences carry gradients and f = r - g run forward only. The
hyperconnect lane mixing is charged as (N^2 + 2N) d FLOP-equivalent parameters per recurrence
(one multiply-add per lane coefficient per channel), as the reference implementation does.

With a sampled training depth (model.recur_sampling) the FLOPs per token are the expectation
over the distribution of r (megaloop.depth), and a budget buys the tokens whose expected FLOPs
equal it, the curriculum's shallower first steps included.

Counts are computed from the config alone (a hand count); tests check them against a built model.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from .config import ModelConfig, recurrences


@dataclass(frozen=True)
class ParamCounts:
    embedding: int
    head: int
    prelude: int
    recur_group: int
    coda: int
    injection: int
    outer_norms: int
    n_once: int
    n_rec: int
    total: int
    r: int
    flops_per_token: float

    @property
    def effective_compute_params(self) -> int:
        """N_once + r N_rec: the unique-parameter count an unrolled model would have."""
        return self.n_once + self.r * self.n_rec

    def tokens_for(self, flops: float) -> int:
        return int(flops // self.flops_per_token)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["effective_compute_params"] = self.effective_compute_params
        return d


def block_params(cfg: ModelConfig) -> int:
    d, hd = cfg.d_model, cfg.hdim
    attn = d * cfg.n_head * hd * 2 + d * cfg.kv_heads * hd * 2  # q, o and k, v
    mlp = 2 * d * cfg.mlp_ratio * d
    return attn + mlp + 2 * d  # two RMSNorm scales


def injection_params(cfg: ModelConfig) -> int:
    if cfg.input_injection == "linear":
        return 2 * cfg.d_model * cfg.d_model
    if cfg.input_injection == "hyperconnect":  # one alpha, M, beta per training recurrence
        n = cfg.num_lanes
        return cfg.max_recur * (2 * n + n * n)
    return 0


def injection_flop_params(cfg: ModelConfig) -> int:
    """Per-recurrence FLOP-equivalent parameter count of the injection (see module docstring)."""
    if cfg.input_injection == "hyperconnect":
        n = cfg.num_lanes
        return (n * n + 2 * n) * cfg.d_model
    return injection_params(cfg)


def flops_per_token(cfg: ModelConfig, num_recur: Optional[int] = None) -> float:
    r = recurrences(num_recur, cfg.num_recur)
    g = r if cfg.bptt_k is None else min(cfg.bptt_k, r)
    f = r - g
    blk = block_params(cfg)
    once = (cfg.n_prelude + cfg.n_coda) * blk + cfg.vocab_size * cfg.d_model
    rec = cfg.n_recur_block * blk + injection_flop_params(cfg)
    attn = cfg.n_head * cfg.hdim * cfg.seq_len
    attn_flops = (12 * (cfg.n_prelude + cfg.n_coda + g * cfg.n_recur_block)
                  + 4 * f * cfg.n_recur_block) * attn
    return float(6 * once + (2 * f + 6 * g) * rec + attn_flops)


def flops_by_r(cfg: ModelConfig) -> np.ndarray:
    """FLOPs per token of a step at each r = 0..max_recur (index = r; r = 0 never runs)."""
    return np.array([0.0] + [flops_per_token(cfg, r) for r in range(1, cfg.max_recur + 1)])


def expected_flops_per_token(cfg: ModelConfig, step: Optional[int] = None) -> float:
    """FLOPs per token in expectation over the training depth at `step` (None: after any
    curriculum); flops_per_token at num_recur when the depth is fixed."""
    if not cfg.recur_sampling.sampled:
        return flops_per_token(cfg)
    from .depth import DepthSampler
    return float(DepthSampler(cfg, 0).pmf(step) @ flops_by_r(cfg))


def tokens_for_budget(cfg: ModelConfig, flops: float, tokens_per_step: int) -> float:
    """Tokens whose (expected) training FLOPs equal `flops`. With a curriculum, each ramp step is
    charged at its own, shallower, expectation."""
    s = cfg.recur_sampling
    if not (s.sampled and s.curriculum_steps):
        return flops / expected_flops_per_token(cfg)
    from .depth import DepthSampler
    per_step = DepthSampler(cfg, 0).pmfs(range(1, s.curriculum_steps + 1)) @ flops_by_r(cfg)
    spent = np.cumsum(tokens_per_step * per_step)            # expected FLOPs after each ramp step
    k = int(np.searchsorted(spent, flops, side="right"))     # ramp steps the budget pays in full
    before = float(spent[k - 1]) if k else 0.0
    rate = float(per_step[k]) if k < len(per_step) else expected_flops_per_token(cfg)
    return k * tokens_per_step + (flops - before) / rate


def realised_flops(cfg: ModelConfig, draws: list[int], tokens_per_step: int) -> float:
    """The FLOPs a run actually spent, given the r of each of its steps."""
    steps_at = {r: draws.count(r) for r in set(draws)}
    return float(sum(steps_at[r] * tokens_per_step * flops_per_token(cfg, r) for r in sorted(steps_at)))


def count_params(cfg: ModelConfig, num_recur: Optional[int] = None) -> ParamCounts:
    d = cfg.d_model
    blk = block_params(cfg)
    prelude, coda = cfg.n_prelude * blk, cfg.n_coda * blk
    group, inj = cfg.n_recur_block * blk, injection_params(cfg)
    outer = 3 * d
    emb = head = cfg.vocab_size * d
    n_once, n_rec = prelude + coda + outer, group + inj
    return ParamCounts(
        embedding=emb, head=head, prelude=prelude, recur_group=group, coda=coda, injection=inj,
        outer_norms=outer, n_once=n_once, n_rec=n_rec, total=emb + head + n_once + n_rec,
        r=recurrences(num_recur, cfg.num_recur),
        flops_per_token=flops_per_token(cfg, num_recur) if num_recur is not None else expected_flops_per_token(cfg),
    )


def model_param_groups(model) -> dict:
    """The same groups counted from a built LoopedLM (what the hand count is checked against)."""
    n = lambda mods: sum(p.numel() for m in mods for p in m.parameters())  # noqa: E731
    return {
        "embedding": n([model.embed]), "head": n([model.head]),
        "prelude": n(model.prelude), "recur_group": n(model.recur), "coda": n(model.coda),
        "injection": n([model.injection]),
        "outer_norms": n([model.norm_emb, model.norm_recur, model.norm_final]),
    }
