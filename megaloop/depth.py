"""Training-time recurrence depth: the per-step draw of r, its distribution, and its expected cost.

`model.recur_sampling` (megaloop.config.RecurSampling) picks how many recurrences each optimizer
step runs:

    fixed               r = model.num_recur on every step (the default)
    poisson_lognormal   tau ~ LogNormal(log(mean) - sigma^2/2, sigma), r = min(Poisson(tau) + 1, cap)
                        (Huginn's draw: E[tau] = mean, so E[r] = mean + 1 before the cap)
    uniform             r uniform on the integers lo..hi

The draw is a pure function of (train.seed, step): two uniforms are hashed from them (SHA-256,
so the sequence does not depend on numpy or torch versions or on any RNG state). Every rank of
every layout computes the same r without communicating, a resumed run draws exactly the
sequence of the uninterrupted one, and no other random stream (data order, init) is touched.
`step` is the 1-based number of the optimizer step, as logged in metrics.jsonl.

Curriculum (`curriculum_steps` = C): at step s the distribution is ramped by p = min(1, s / C):
poisson_lognormal uses the rate mean p * mean (so the first steps draw r close to 1 and E[r]
climbs linearly to mean + 1 at step C); uniform draws from lo..lo + ceil(p (hi - lo)). The cap
stays fixed, so memory is bounded from the first step.

Accounting (DESIGN.md's FLOPs per token) is linear in the per-recurrence charges, so its
expectation is sum_r P(r) FLOPs(r) with the exact P of the distribution (Gauss-Hermite
quadrature over the lognormal; 96 nodes make it exact to ~1e-12). A compute budget buys the
tokens whose *expected* FLOPs equal it: train.target_flops holds in expectation.
"""
from __future__ import annotations

import hashlib
import math
from functools import lru_cache
from statistics import NormalDist
from typing import Optional

import numpy as np

from .config import ModelConfig, RecurSampling

QUADRATURE_NODES = 96
# The variant suffix of a sampled-depth run's rows at every evaluated r in a scaling-law table
# ("test-time" rows, written by a sweep's collect: each repeats a run the table also holds once
# under its own variant).
TEST_TIME_SUFFIX = "_tt"
_NORMAL = NormalDist()


def _uniforms(seed: int, step: int, n: int = 2) -> list[float]:
    """n uniforms in (0, 1), a pure function of (seed, step)."""
    digest = hashlib.sha256(f"megaloop.recur_sampling:{seed}:{step}".encode()).digest()
    return [(int.from_bytes(digest[8 * i: 8 * i + 8], "little") + 0.5) / 2.0 ** 64 for i in range(n)]


def _progress(s: RecurSampling, step: int) -> float:
    if not s.curriculum_steps:
        return 1.0
    return min(1.0, max(step, 1) / s.curriculum_steps)


def _rate_params(s: RecurSampling, step: int) -> tuple[float, float]:
    """(mu, sigma) of the lognormal rate at this step (the curriculum scales the mean)."""
    sigma = 0.5 if s.sigma is None else float(s.sigma)
    return math.log(s.mean * _progress(s, step)) - sigma * sigma / 2, sigma


def _uniform_hi(s: RecurSampling, step: int) -> int:
    return s.lo + math.ceil(_progress(s, step) * (s.hi - s.lo) - 1e-12)


def _poisson_inverse(u: float, tau: float, limit: int) -> int:
    """The smallest n with P(Poisson(tau) <= n) >= u, or `limit` if that is larger (the cap)."""
    cdf = 0.0
    log_tau = math.log(tau) if tau > 0 else -math.inf
    for n in range(limit):
        cdf += math.exp(-tau + n * log_tau - math.lgamma(n + 1)) if tau > 0 else float(n == 0)
        if cdf >= u:
            return n
    return limit


class DepthSampler:
    """The training depth of every step of one run: draw(step), pmf(step), expectations."""

    def __init__(self, model: ModelConfig, seed: int):
        self.model, self.spec, self.seed = model, model.recur_sampling, seed
        self.sampled = self.spec.sampled
        self.max_r = model.max_recur
        self.min_r = self.spec.min_draw(model.num_recur)

    # ------------------------------------------------------------------ the draw
    def draw(self, step: int) -> int:
        s = self.spec
        if s.kind == "fixed":
            return self.model.num_recur
        u1, u2 = _uniforms(self.seed, step)
        if s.kind == "uniform":
            hi = _uniform_hi(s, step)
            return s.lo + min(int(u1 * (hi - s.lo + 1)), hi - s.lo)
        mu, sigma = _rate_params(s, step)
        tau = math.exp(mu + sigma * _NORMAL.inv_cdf(u1))
        return 1 + _poisson_inverse(u2, tau, self.max_r - 1)

    def draws(self, first: int, last: int) -> list[int]:
        """The draws of steps first..last (inclusive)."""
        return [self.draw(k) for k in range(first, last + 1)]

    # ------------------------------------------------------------------ the distribution
    def pmf(self, step: Optional[int] = None) -> np.ndarray:
        """P(r) for r = 0..max_r (index = r) at `step` (None: after any curriculum)."""
        return self.pmfs([10 ** 18 if step is None else step])[0]

    def pmfs(self, steps) -> np.ndarray:
        """P(r) of each of `steps`: an array (len(steps), max_r + 1), vectorised over steps."""
        s, steps = self.spec, list(steps)
        p = np.zeros((len(steps), self.max_r + 1))
        if s.kind == "fixed":
            p[:, self.model.num_recur] = 1.0
        elif s.kind == "uniform":
            for row, step in enumerate(steps):
                hi = _uniform_hi(s, step)
                p[row, s.lo: hi + 1] = 1.0 / (hi - s.lo + 1)
        else:
            for a in range(0, len(steps), 256):  # chunks bound the (steps, nodes, r) intermediate
                chunk = steps[a: a + 256]
                mu = np.array([_rate_params(s, k)[0] for k in chunk])
                p[a: a + len(chunk), 1:] = _poisson_lognormal_pmf(mu, _rate_params(s, 1)[1], self.max_r)
        return p

    def expected_r(self, step: Optional[int] = None) -> float:
        return float(self.pmf(step) @ np.arange(self.max_r + 1))

    def mean_over_steps(self, values: np.ndarray, steps: int) -> float:
        """E[values[r]] averaged over steps 1..steps (a curriculum's ramp included); `values`
        holds one number per r = 0..max_r."""
        ramp = min(self.spec.curriculum_steps or 0, steps) if self.sampled else 0
        total = float(self.pmfs(range(1, ramp + 1)).sum(0) @ values) if ramp else 0.0
        return (total + (steps - ramp) * float(self.pmf() @ values)) / steps


@lru_cache(maxsize=1)
def _nodes() -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Hermite nodes and weights for E over z ~ N(0, 1)."""
    z, w = np.polynomial.hermite_e.hermegauss(QUADRATURE_NODES)
    return z, w / w.sum()


def _poisson_lognormal_pmf(mu: np.ndarray, sigma: float, max_r: int) -> np.ndarray:
    """P(r) for r = 1..max_r of r = min(1 + Poisson(tau), max_r), log tau ~ N(mu, sigma^2), one
    row per mu: Gauss-Hermite quadrature over log tau."""
    z, w = _nodes()
    log_tau = mu[:, None] + sigma * z[None, :]                    # (S, Q)
    n = np.arange(max_r - 1)                                      # Poisson counts below the cap
    log_fact = np.array([math.lgamma(k + 1) for k in n])
    log_p = (-np.exp(log_tau)[..., None] + n * log_tau[..., None] - log_fact)   # (S, Q, max_r - 1)
    below = np.einsum("q,sqn->sn", w, np.exp(log_p))
    tail = np.clip(1.0 - below.sum(1, keepdims=True), 0.0, None)  # the clamped tail, at the cap
    return np.concatenate([below, tail], axis=1)


def mean_test_r(model: ModelConfig) -> int:
    """The integer test depth that stands for a sampled run's training depth: round(E[r])."""
    return max(1, round(DepthSampler(model, 0).expected_r()))


def law_recurrences(model: ModelConfig, grid_r) -> list[int]:
    """The r at which a sampled run is evaluated for the scaling-law table: its mean depth,
    twice it, and the fixed-r values of the grid it is compared with (docs/sweeps.md)."""
    m = mean_test_r(model)
    return sorted({m, 2 * m, *grid_r})


def describe(model: ModelConfig) -> str:
    """One line for logs: the training depth."""
    s = model.recur_sampling
    if s.kind == "fixed":
        return f"r={model.num_recur}"
    d = DepthSampler(model, 0)
    what = (f"poisson_lognormal(mean={s.mean:g}, sigma={0.5 if s.sigma is None else s.sigma:g})"
            if s.kind == "poisson_lognormal" else f"uniform({s.lo}..{s.hi})")
    ramp = f", ramped over {s.curriculum_steps} steps" if s.curriculum_steps else ""
    return (f"r ~ {what}, {d.min_r} <= r <= {d.max_r}, E[r]={d.expected_r():.3f}{ramp} "
            f"(evaluated at r={model.num_recur})")
