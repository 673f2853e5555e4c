"""Which runs to train next: the candidate runs that shrink phi's (or a dphi's) interval most per FLOP.

The criterion is classical c-optimal design under the linearised law (used by `megaloop sweep
suggest` and benchmarks/design.py):

* theta = (a, b, e, alpha, beta, phi_1..phi_K) at the fitted values (law.predict_log_loss's raw
  vector). Each run i has a log-loss prediction f_i(theta) and a Jacobian row J_i = d f_i / d theta
  (central differences of law.predict_log_loss).
* The measured log losses carry noise of SD sigma. The fit minimises a Huber loss with a small
  delta, which is less efficient than least squares: its asymptotic variance is sigma^2 times
  E[psi^2] / E[psi']^2 (Huber 1964), `huber_variance_factor`; sigma_eff^2 is that product.
* Fisher information of a set of runs: I = sum_i J_i J_i^T / sigma_eff^2, plus a weak prior
  (PRIOR_SD, diagonal) so it stays invertible while a parameter is not yet pinned by the runs.
* The target is a linear combination c^T theta: c = e_phi for phi, e_phi[v] - e_phi[baseline] for
  dphi:v. Its linearised variance is c^T I^-1 c and its 95 % interval width 2 x 1.96 x sqrt of it.
* Adding run j changes the variance by (Sherman-Morrison)
      -(c^T I^-1 J_j)^2 / (sigma_eff^2 + J_j^T I^-1 J_j),
  computed for every candidate at once. Greedy: take the candidate with the largest reduction per
  FLOP of its cost, add it to I, repeat until the FLOPs are spent (or a target width is reached).
  The cost of a run is its FLOPs, or under budget branching what it adds to the FLOPs spent
  (`branched_cost`).

The design is local: it is computed at the current fit, so it is re-run after every batch of runs
(suggest -> train -> fit -> suggest), which is what makes it adaptive.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from .law import N_BASE, LawData, predict_log_loss

Z95 = 1.959963984540054
# Weak prior SD per coordinate of (a, b, e, alpha, beta) and of each phi: wide against what a
# handful of runs pins (a, b, e are logs of A, B, E; the exponents and phi live in [0, 3] / [0, 1.5]),
# so it only matters for directions the runs leave open.
PRIOR_SD_BASE = (10.0, 10.0, 10.0, 1.0, 1.0)
PRIOR_SD_PHI = 1.0
# The reference study's fitted law (REFERENCES.md): the nominal parameters of a seed design.
REFERENCE_LAW = {"E": 1.56773, "A": 28.027, "alpha": 0.19924, "B": 915.82, "beta": 0.36863, "phi": 0.459}


def reference_raw(phi: Optional[float] = None) -> np.ndarray:
    p = REFERENCE_LAW
    return np.array([math.log(p["A"]), math.log(p["B"]), math.log(p["E"]), p["alpha"], p["beta"],
                     p["phi"] if phi is None else phi])


def huber_variance_factor(sigma: float, delta: float) -> float:
    """Var(Huber M-estimate) / Var(least squares) for Gaussian noise of SD sigma:
    E[psi^2] / (sigma^2 E[psi']^2) with psi the clipped residual. Tends to pi/2 as delta/sigma -> 0
    (the median's efficiency) and to 1 as delta/sigma -> inf."""
    if sigma <= 0:
        return 1.0
    k = delta / sigma
    phi_k = math.exp(-0.5 * k * k) / math.sqrt(2 * math.pi)
    inside = math.erf(k / math.sqrt(2))                    # P(|z| < k)
    e_psi2 = (inside - 2 * k * phi_k) + k * k * (1 - inside)  # in units of sigma^2
    return e_psi2 / (inside * inside)


def jacobian(raw: np.ndarray, n_once: Sequence[float], n_rec: Sequence[float], r: Sequence[float],
             tokens: Sequence[float], phi_index: Optional[Sequence[int]] = None, n_phi: int = 1,
             h: float = 1e-6) -> np.ndarray:
    """d log L_i / d theta for each run (R, 5 + n_phi), central differences of predict_log_loss."""
    n = len(n_once)
    data = LawData.build(n_once, n_rec, r, tokens, np.ones(n), phi_index, n_phi)
    raw = np.asarray(raw, float)
    out = np.empty((n, len(raw)))
    for p in range(len(raw)):
        up, dn = raw.copy(), raw.copy()
        up[p] += h
        dn[p] -= h
        out[:, p] = (predict_log_loss(up, data) - predict_log_loss(dn, data)) / (2 * h)
    return out


def prior_information(n_phi: int) -> np.ndarray:
    sd = np.array(list(PRIOR_SD_BASE) + [PRIOR_SD_PHI] * n_phi)
    return np.diag(1.0 / sd ** 2)


@dataclass
class DesignState:
    """Fisher information of the runs so far and the target's contrast vector."""

    info: np.ndarray          # (P, P), prior included
    c: np.ndarray             # (P,) the target is c . theta
    sigma2: float             # effective noise variance of one run's log loss

    @classmethod
    def start(cls, J: np.ndarray, c: np.ndarray, sigma2: float) -> "DesignState":
        n_phi = len(c) - N_BASE
        info = prior_information(n_phi) + (J.T @ J) / sigma2 if len(J) else prior_information(n_phi)
        return cls(info, np.asarray(c, float), float(sigma2))

    def _cov_c(self) -> np.ndarray:
        return np.linalg.solve(self.info, self.c)

    def variance(self) -> float:
        return float(self.c @ self._cov_c())

    def width(self) -> float:
        """The target's linearised 95 % interval width."""
        return 2 * Z95 * math.sqrt(max(self.variance(), 0.0))

    def reductions(self, J: np.ndarray) -> np.ndarray:
        """The drop in the target's variance from adding each row of J on its own."""
        if not len(J):
            return np.zeros(0)
        u = J @ self._cov_c()
        q = np.einsum("ip,ip->i", J, np.linalg.solve(self.info, J.T).T)
        return u * u / (self.sigma2 + q)

    def add(self, J_rows: np.ndarray) -> None:
        J_rows = np.atleast_2d(J_rows)
        self.info = self.info + (J_rows.T @ J_rows) / self.sigma2


def contrast(n_phi: int, target: int, minus: Optional[int] = None) -> np.ndarray:
    """c for phi[target] (or phi[target] - phi[minus])."""
    c = np.zeros(N_BASE + n_phi)
    c[N_BASE + target] = 1.0
    if minus is not None:
        c[N_BASE + minus] -= 1.0
    return c


# ------------------------------------------------------------------------------------ costs

def plain_cost(flops: np.ndarray) -> Callable[[list[int], int], float]:
    """Every run costs its own FLOPs."""
    return lambda chosen, j: float(flops[j])


def branched_cost(flops: np.ndarray, group: Sequence, decay_frac: float,
                  trained: Optional[dict] = None) -> Callable[[list[int], int], float]:
    """What run j adds to the FLOPs spent under budget branching (warmup-stable-decay), given the
    runs chosen so far. Runs of one group (variant, size, r, seed) share one trunk: the group's
    largest run trains from scratch and every smaller one branches from it at the start of its own
    decay, so costs decay_frac x its FLOPs. A group's trunk saves a checkpoint at the decay start of
    every smaller grid budget, so a run chosen later below an existing trunk is a branch too; a run
    above every run of its group is a new trunk at full cost (a trunk is not extended). `trained`:
    {group: largest FLOPs already trained} from earlier batches."""
    trained = dict(trained or {})

    def cost(chosen: list[int], j: int) -> float:
        top = trained.get(group[j], 0.0)
        top = max([top] + [float(flops[i]) for i in chosen if group[i] == group[j]])
        return float(flops[j]) * (decay_frac if flops[j] < top else 1.0)
    return cost


def spent_branched(flops: np.ndarray, group: Sequence, decay_frac: float, batches: Sequence[Sequence[int]],
                   trained: Optional[dict] = None) -> tuple[float, dict]:
    """FLOPs actually spent when `batches` of runs are planned one after another with branching:
    inside a batch a group's largest new run is its trunk (unless an earlier, larger trunk exists)
    and the others branch. Returns (FLOPs, {group: largest trained FLOPs})."""
    trained = dict(trained or {})
    total = 0.0
    for batch in batches:
        by_group: dict = {}
        for j in batch:
            by_group.setdefault(group[j], []).append(j)
        for g, js in by_group.items():
            top = trained.get(g, 0.0)
            new_top = max(float(flops[j]) for j in js)
            for j in js:
                f = float(flops[j])
                is_trunk = f >= top and f == new_top
                total += f if is_trunk else decay_frac * f
            trained[g] = max(top, new_top)
            # two runs of equal FLOPs in one group are the same run: callers never pass both
    return total, trained


# ------------------------------------------------------------------------------------ greedy

@dataclass
class Pick:
    index: int
    cost: float
    width_after: float
    reduction: float


@dataclass
class GreedyResult:
    picks: list[Pick] = field(default_factory=list)
    width_before: float = float("nan")
    spent: float = 0.0


def greedy(state: DesignState, J: np.ndarray, cost: Callable[[list[int], int], float], flops_budget: float,
           available: Optional[Sequence[int]] = None, max_runs: Optional[int] = None,
           target_width: Optional[float] = None) -> GreedyResult:
    """Greedy c-optimal selection: repeatedly add the affordable candidate with the largest drop in
    the target's variance per FLOP of its cost. Mutates `state` (it ends as the design's
    information). Stops when nothing affordable is left, no candidate adds information, max_runs
    picks were made, or the width reached target_width."""
    avail = list(range(len(J)) if available is None else available)
    out = GreedyResult(width_before=state.width())
    chosen: list[int] = []
    while avail and (max_runs is None or len(chosen) < max_runs):
        if target_width is not None and state.width() <= target_width:
            break
        costs = np.array([cost(chosen, j) for j in avail])
        ok = costs <= flops_budget - out.spent + 1e-9 * max(flops_budget, 1.0)
        if not ok.any():
            break
        red = state.reductions(J[avail])
        score = np.where(ok, red / np.maximum(costs, 1e-300), -np.inf)
        k = int(np.argmax(score))
        if not red[k] > 1e-14 * max(state.variance(), 1e-300):
            break
        j = avail.pop(k)
        state.add(J[j])
        chosen.append(j)
        out.spent += float(costs[k])
        out.picks.append(Pick(j, float(costs[k]), state.width(), float(red[k])))
    return out
