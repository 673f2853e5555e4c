"""The looped scaling law, its Huber objective with analytic gradients, and a batched L-BFGS.

Law:  L = E + A * (N_once + r**phi * N_rec)**(-alpha) + B * D**(-beta)

Fitted as in Hoffmann et al. (approach 3) / Besiroglu et al.: minimise the SUM over runs of
Huber_delta(LSE(a - alpha*log N_eff, b - beta*log D, e) - log L), with A = e^a, B = e^b, E = e^e.

Parametrisation choices (why):
* a and b are stored *centred*: a_c = a - alpha * cN, b_c = b - beta * cD, with cN, cD the mean
  log sizes / tokens of the table. This is a linear change of variables (same objective values,
  same minimiser) that removes the huge a/alpha and b/beta correlation (log N ~ 20), which
  otherwise makes L-BFGS crawl along a narrow valley.
* phi is kept in the box [0, PHI_MAX]. In the batched phase it is optimised through
  phi = PHI_MAX * sigmoid(u) (unconstrained, smooth); the final polish uses the natural phi with
  L-BFGS-B bounds, so a minimiser on the edge of the box is reached exactly.
* The other parameters have a search region too (`search_box`): the final polish is bounded to
  it, so a fit that wants a term of zero ends exactly on its edge, where the report can say so.
  The batched L-BFGS accepts any finite bounds (same sigmoid transform) and a per-row `free`
  mask, which is how the profile likelihood pins a different parameter in every row.
* Several phis can be present (one per variant, for the joint fit); every run maps to one of
  them through `phi_index`. A boolean `free` mask pins parameters that the data cannot identify.
* Per-variant levels (the per-variant-level joint model): after the phis come L offsets of log A
  (da_1..da_L) and, with `e_level`, L offsets of log E (de_1..de_L), one per non-reference
  variant; a run uses offset `level_index` (-1: the reference variant, no offset). Offsets do not
  change under the centring, so to_centred / to_raw leave them alone. Layout of a vector:
  a, b, e, alpha, beta, phi_1..phi_K, da_1..da_L, [de_1..de_L].
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy.optimize import minimize

PHI_MAX = 1.5
# The search region of the other parameters (internal, centred coordinates; see `search_box`):
# exponents in [0, EXPONENT_MAX]; each of the three terms (E, and the size and data terms at the
# table's central size / token count) between TERM_FLOOR x the smallest loss and TERM_CEIL x the
# largest. A term below the floor changes log L by < 1e-6: it is absent, so a fit that ends there
# says the table cannot see that term.
EXPONENT_MAX = 3.0
TERM_FLOOR, TERM_CEIL = 1e-6, 2.0
N_BASE = 5  # a_c, b_c, e, alpha, beta; phis follow
BASE_NAMES = ("a", "b", "e", "alpha", "beta")
CHUNK = 1024  # starts per batch: large enough to amortise Python overhead, small enough for cache


@dataclass
class LawData:
    """The arrays the objective needs, precomputed once per table."""

    n_once: np.ndarray
    n_rec: np.ndarray
    log_r: np.ndarray
    log_d: np.ndarray
    log_l: np.ndarray
    phi_index: np.ndarray  # (R,) int: which phi each run uses
    n_phi: int
    level_index: np.ndarray | None = None  # (R,) int: which level offset (-1: none)
    n_level: int = 0
    e_level: bool = False   # offsets of log E too (after those of log A)
    c_n: float = field(init=False)
    c_d: float = field(init=False)

    def __post_init__(self) -> None:
        self.c_n = float(np.mean(np.log(self.n_once + self.n_rec)))
        self.c_d = float(np.mean(self.log_d))
        # one-hot (R, K) so the per-phi gradient is a single matmul
        self.onehot = np.zeros((len(self.n_once), max(self.n_phi, 1)))
        self.onehot[np.arange(len(self.n_once)), self.phi_index] = 1.0
        # (R, L) one-hot of the level offsets; the reference variant's rows are all zero
        self.level_onehot = np.zeros((len(self.n_once), self.n_level))
        if self.n_level:
            rows = np.flatnonzero(self.level_index >= 0)
            self.level_onehot[rows, self.level_index[rows]] = 1.0
        self._derived()

    @property
    def n_params(self) -> int:
        """Length of a parameter vector for this data's model."""
        return N_BASE + self.n_phi + self.n_level * (2 if self.e_level else 1)

    def _clone(self, arrays) -> "LawData":
        return LawData(*arrays, self.phi_index, self.n_phi, self.level_index, self.n_level, self.e_level)

    def _derived(self) -> None:
        # sizes scaled by exp(-c_n) so log(N_eff) comes out centred without an extra pass
        scale = np.exp(-self.c_n)
        self.n_once_s = self.n_once * scale
        self.n_rec_s = self.n_rec * scale
        self.rec_log_r = self.n_rec_s * self.log_r
        self.log_d_c = self.log_d - self.c_d

    @classmethod
    def build(cls, n_once: Sequence[float], n_rec: Sequence[float], r: Sequence[float],
              tokens: Sequence[float], loss: Sequence[float],
              phi_index: Sequence[int] | None = None, n_phi: int = 1,
              level_index: Sequence[int] | None = None, n_level: int = 0, e_level: bool = False) -> "LawData":
        n_once_a = np.asarray(n_once, float)
        idx = np.zeros(len(n_once_a), int) if phi_index is None else np.asarray(phi_index, int)
        lvl = None if level_index is None else np.asarray(level_index, int)
        return cls(n_once_a, np.asarray(n_rec, float), np.log(np.asarray(r, float)),
                   np.log(np.asarray(tokens, float)), np.log(np.asarray(loss, float)), idx, n_phi,
                   lvl, n_level if lvl is not None else 0, e_level and lvl is not None)

    def with_centre(self, c_n: float | None = None, c_d: float | None = None) -> "LawData":
        """A copy centred elsewhere (c_n = 0 makes coordinate 0 the raw a, c_d = 0 coordinate 1
        the raw b: what the profiles of A and B pin)."""
        out = self._clone((self.n_once, self.n_rec, self.log_r, self.log_d, self.log_l))
        out.c_n = self.c_n if c_n is None else float(c_n)
        out.c_d = self.c_d if c_d is None else float(c_d)
        out._derived()
        return out

    def astype(self, dtype) -> "LawData":
        """A copy in another float type (float32 makes the wide screening stage ~2x cheaper)."""
        out = self._clone(tuple(np.asarray(v, dtype) for v in (self.n_once, self.n_rec, self.log_r,
                                                               self.log_d, self.log_l)))
        out.c_n, out.c_d = self.c_n, self.c_d  # keep the float64 table's centring
        out._derived()
        for k in ("n_once_s", "n_rec_s", "rec_log_r", "log_d_c"):
            setattr(out, k, getattr(out, k).astype(dtype))
        out.onehot = self.onehot.astype(dtype)
        out.level_onehot = self.level_onehot.astype(dtype)
        return out


# ---------------------------------------------------------------------------------------------
# conversions between centred internal parameters and the reported ones

def to_centred(raw: np.ndarray, data: LawData) -> np.ndarray:
    """raw [..., a, b, e, alpha, beta, phi...] -> centred (a_c, b_c)."""
    x = np.array(raw, float, copy=True)
    x[..., 0] = raw[..., 0] - raw[..., 3] * data.c_n
    x[..., 1] = raw[..., 1] - raw[..., 4] * data.c_d
    return x


def to_raw(x: np.ndarray, data: LawData) -> np.ndarray:
    raw = np.array(x, float, copy=True)
    raw[..., 0] = x[..., 0] + x[..., 3] * data.c_n
    raw[..., 1] = x[..., 1] + x[..., 4] * data.c_d
    return raw


def _to_u(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Bounded coordinate -> unconstrained u, x = lo + (hi - lo) sigmoid(u)."""
    p = np.clip((x - lo) / (hi - lo), 1e-4, 1 - 1e-4)
    return np.log(p) - np.log1p(-p)


def _from_u(u: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return lo + (hi - lo) / (1.0 + np.exp(-np.clip(u, -50.0, 50.0)))


# ---------------------------------------------------------------------------------------------
# objective

def objective(x: np.ndarray, data: LawData, delta: float,
              weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Summed Huber objective and its gradient for a batch of centred parameter vectors.

    x: (S, data.n_params) with natural phis; weights: None, (R,) or (S, R) run multiplicities
    (bootstrap resamples are integer weights). Returns f (S,), grad (S, data.n_params).
    Written to minimise full passes over (S, R) arrays: it is the whole cost of a fit.
    """
    x = np.atleast_2d(x)
    a_c, b_c, e, alpha, beta = (x[:, i:i + 1] for i in range(N_BASE))
    if data.n_phi:
        phi_runs = x[:, N_BASE:][:, data.phi_index]
        rp = np.exp(phi_runs * data.log_r)                 # r**phi, (S, R)
        n_eff = rp * data.n_rec_s
        n_eff += data.n_once_s
    else:
        n_eff = np.broadcast_to(data.n_once_s + data.n_rec_s, (len(x), len(data.log_l)))
    log_n = np.log(n_eff)                                  # already centred by the scaling
    L = data.n_level
    lv0 = N_BASE + data.n_phi
    if L:  # per-variant levels: each run's log A (and log E) shifted by its variant's offset
        a_c = a_c + x[:, lv0:lv0 + L] @ data.level_onehot.T
        if data.e_level:
            e = e + x[:, lv0 + L:lv0 + 2 * L] @ data.level_onehot.T
    t1 = a_c - alpha * log_n
    t2 = b_c - beta * data.log_d_c
    m = np.maximum(t1, t2)
    np.maximum(m, e, out=m)                                # log-sum-exp shift
    e1 = np.exp(t1 - m)
    e2 = np.exp(t2 - m)
    e3 = np.exp(e - m)
    tot = e1 + e2
    tot += e3
    res = np.log(tot)
    res += m
    res -= data.log_l
    dh = np.clip(res, -delta, delta)                       # Huber derivative
    hub = res - 0.5 * dh                                   # Huber = dh * (res - dh / 2)
    if weights is not None:
        dh = dh * weights
    f = np.einsum("sr,sr->s", dh, hub)
    q = dh / tot
    q1 = q * e1
    q2 = q * e2
    g = np.empty(x.shape, dtype=q.dtype)
    g[:, 0] = q1.sum(1)
    g[:, 1] = q2.sum(1)
    q3 = q * e3
    g[:, 2] = q3.sum(1)
    g[:, 3] = -np.einsum("sr,sr->s", q1, log_n)
    g[:, 4] = -(q2 @ data.log_d_c)
    if L:
        g[:, lv0:lv0 + L] = q1 @ data.level_onehot
        if data.e_level:
            g[:, lv0 + L:lv0 + 2 * L] = q3 @ data.level_onehot
    if data.n_phi:
        # d log N_eff / d phi = r**phi * log r * N_rec / N_eff
        rp *= data.rec_log_r
        rp /= n_eff
        rp *= q1
        g[:, N_BASE:lv0] = -alpha * (rp @ data.onehot)
    return f, g


def predict_log_loss(raw: np.ndarray, data: LawData) -> np.ndarray:
    """log of the predicted loss for reported (raw) parameters, one vector."""
    a, b, e, alpha, beta = raw[:N_BASE]
    lv0 = N_BASE + data.n_phi
    phis = np.asarray(raw[N_BASE:lv0], float)
    phi_runs = phis[data.phi_index] if data.n_phi else 0.0
    log_n = np.log(data.n_once + np.exp(phi_runs * data.log_r) * data.n_rec)
    if data.n_level:
        L = data.n_level
        a = a + data.level_onehot @ np.asarray(raw[lv0:lv0 + L], float)
        if data.e_level:
            e = e + data.level_onehot @ np.asarray(raw[lv0 + L:lv0 + 2 * L], float)
    return np.logaddexp(np.logaddexp(a - alpha * log_n, b - beta * data.log_d), e)


# ---------------------------------------------------------------------------------------------
# batched L-BFGS (all starts advance in lock-step, each with its own history and step length)

def _default_bounds(P: int, n_phi: int) -> tuple[np.ndarray, np.ndarray]:
    """Only the phis bounded, to [0, PHI_MAX]; level offsets (after the phis) are free."""
    lo, hi = np.full(P, -np.inf), np.full(P, np.inf)
    lo[N_BASE:N_BASE + n_phi], hi[N_BASE:N_BASE + n_phi] = 0.0, PHI_MAX
    return lo, hi


def _bounds_rows(S: int, P: int, free, lo, hi, dtype, n_phi: int | None = None):
    """Per-row masks: free (S, P), bounds (S, P) and which coordinates go through the sigmoid.
    Defaults keep the historical behaviour: only free phis are bounded, to [0, PHI_MAX]."""
    free = np.broadcast_to(np.ones(P, bool) if free is None else np.asarray(free, bool), (S, P))
    d_lo, d_hi = _default_bounds(P, P - N_BASE if n_phi is None else n_phi)
    if lo is None:
        lo = d_lo
    if hi is None:
        hi = d_hi
    lo = np.broadcast_to(np.asarray(lo, float), (S, P))
    hi = np.broadcast_to(np.asarray(hi, float), (S, P))
    tr = free & np.isfinite(lo) & np.isfinite(hi)
    # finite placeholders where untransformed, so the sigmoid arithmetic stays finite
    lo_t = np.where(tr, lo, 0.0).astype(dtype)
    hi_t = np.where(tr, hi, 1.0).astype(dtype)
    return free, tr, lo_t, hi_t


def _u_objective(z, data, delta, weights, fm, tr, lo, hi, shift=None):
    """Objective in the optimiser's space: bounded coordinates as u (sigmoid); pinned ones masked.
    shift (S, 2): rows whose coordinates 0 / 1 are the raw a / b rather than the centred ones
    (a_c = a - alpha * shift[:, 0], b_c = b - beta * shift[:, 1]), so a profile can pin raw a."""
    x = np.where(tr, _from_u(z, lo, hi), z)
    if shift is None:
        f, g = objective(x, data, delta, weights)
    else:
        xc = x.copy()
        xc[:, 0] -= x[:, 3] * shift[:, 0]
        xc[:, 1] -= x[:, 4] * shift[:, 1]
        f, g = objective(xc, data, delta, weights)
        g[:, 3] -= shift[:, 0] * g[:, 0]
        g[:, 4] -= shift[:, 1] * g[:, 1]
    s = (x - lo) / (hi - lo)
    g *= np.where(tr, (hi - lo) * s * (1 - s), 1.0)
    return f, g * fm


def batched_lbfgs(x0: np.ndarray, data: LawData, delta: float, weights: np.ndarray | None = None,
                  free: np.ndarray | None = None, max_iter: int = 300, m: int = 10,
                  ftol: float = 1e-11, gtol: float = 1e-12, lo: np.ndarray | None = None,
                  hi: np.ndarray | None = None, shift: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Minimise from every row of x0 (centred, natural phi) at once. Returns (x, f) per start.

    free: (P,) or per row (S, P), False pins a coordinate at its start value (a profile pins a
    different one per row). lo/hi: (P,) or (S, P) bounds, enforced through a sigmoid
    transform; by default only phi is bounded, to [0, PHI_MAX]. shift: see _u_objective.
    Line search: vectorised backtracking (Armijo) from step 1, which suits L-BFGS once its
    history scales the direction. A start stops when its relative decrease stays below ftol
    for 3 iterations, its gradient vanishes, or its line search fails.
    """
    with np.errstate(all="ignore"):  # overflowing trial points are rejected by the line search
        return _batched_lbfgs(x0, data, delta, weights, free, max_iter, m, ftol, gtol, lo, hi, shift)


def _batched_lbfgs(x0, data, delta, weights, free, max_iter, m, ftol, gtol, lo, hi, shift):
    dtype = data.log_l.dtype
    S, P = x0.shape
    free, tr, lo, hi = _bounds_rows(S, P, free, lo, hi, dtype, data.n_phi)
    fm = free.astype(dtype)
    delta = dtype.type(delta)
    z = x0.astype(dtype).copy()
    z = np.where(tr, _to_u(z, lo, hi), z)
    wfull = None if weights is None else np.broadcast_to(weights, (S, weights.shape[-1]))

    def fg(idx: np.ndarray, zz: np.ndarray):
        w = None if wfull is None else wfull[idx]
        return _u_objective(zz, data, delta, w, fm[idx], tr[idx], lo[idx], hi[idx],
                            None if shift is None else shift[idx])

    f, g = fg(np.arange(S), z)
    s_hist = np.zeros((m, S, P), dtype)
    y_hist = np.zeros((m, S, P), dtype)
    rho = np.zeros((m, S), dtype)
    gamma = np.ones(S, dtype)
    active = np.ones(S, bool)
    slow = np.zeros(S, int)
    for it in range(max_iter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        gi = g[idx]
        # two-loop recursion over the ring buffer, newest first
        q = gi.copy()
        order = [(it - 1 - j) % m for j in range(min(it, m))]
        alphas = []
        for k in order:
            a_k = rho[k, idx] * np.einsum("sp,sp->s", s_hist[k, idx], q)
            q -= a_k[:, None] * y_hist[k, idx]
            alphas.append(a_k)
        q *= gamma[idx, None]
        for k, a_k in zip(reversed(order), reversed(alphas)):
            b_k = rho[k, idx] * np.einsum("sp,sp->s", y_hist[k, idx], q)
            q += (a_k - b_k)[:, None] * s_hist[k, idx]
        d = -q
        slope = np.einsum("sp,sp->s", gi, d)
        bad = ~(slope < 0) | ~np.isfinite(slope)
        if bad.any():  # not a descent direction: fall back to steepest descent, forget history
            d[bad] = -gi[bad]
            slope[bad] = -np.einsum("sp,sp->s", gi[bad], gi[bad])
            rho[:, idx[bad]] = 0.0
            gamma[idx[bad]] = 1.0
        if it == 0:  # no curvature yet: first step of length ~0.1 in parameter space
            d *= (0.1 / np.maximum(np.linalg.norm(d, axis=1), 1e-300))[:, None]
            slope = np.einsum("sp,sp->s", gi, d)
        t = np.ones(idx.size, dtype)
        f_new = np.full(idx.size, np.inf, dtype)
        g_new = np.zeros_like(gi)
        pending = np.arange(idx.size)
        for _ in range(40):
            zz = z[idx[pending]] + t[pending, None] * d[pending]
            fp, gp = fg(idx[pending], zz)
            ok = np.isfinite(fp) & (fp <= f[idx[pending]] + 1e-4 * t[pending] * slope[pending])
            f_new[pending[ok]] = fp[ok]
            g_new[pending[ok]] = gp[ok]
            pending = pending[~ok]
            if pending.size == 0:
                break
            t[pending] *= 0.5
        failed = np.zeros(idx.size, bool)
        failed[pending] = True
        acc = ~failed
        ia = idx[acc]
        step = t[acc, None] * d[acc]
        ydiff = g_new[acc] - g[ia]
        k = it % m
        sy = np.einsum("sp,sp->s", step, ydiff)
        yy = np.einsum("sp,sp->s", ydiff, ydiff)
        good = (sy > 1e-16 * yy) & (yy > 0)
        s_hist[k, ia] = step
        y_hist[k, ia] = ydiff
        rho[k, ia] = np.where(good, 1.0 / np.where(good, sy, 1.0), 0.0)
        rho[k, idx[failed]] = 0.0
        gamma[ia] = np.where(good, sy / np.where(good, yy, 1.0), gamma[ia])
        rel = (f[ia] - f_new[acc]) / np.maximum(np.abs(f[ia]), np.abs(f_new[acc]))
        z[ia] += step
        f[ia] = f_new[acc]
        g[ia] = g_new[acc]
        slow[ia] = np.where(rel <= ftol, slow[ia] + 1, 0)
        done = (slow[ia] >= 3) | (np.abs(g[ia]).max(1) <= gtol)
        active[ia[done]] = False
        active[idx[failed]] = False
    x = np.where(tr, _from_u(z.astype(float), lo.astype(float), hi.astype(float)), z.astype(float))
    return x, f.astype(float)


def search_box(data: LawData, n_phi: int) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) of the search region in centred coordinates (a_c, b_c, e, alpha, beta, phi...,
    level offsets...). An offset may move a term across the whole term region, either way.

    exp(a_c) = A N_c^-alpha and exp(b_c) = B D_c^-beta are the size and data terms at the table's
    geometric-mean size and token count, so all three log-terms share one region, set by the
    observed losses; the exponents live in [0, EXPONENT_MAX] and phi in [0, PHI_MAX]."""
    loss = np.exp(np.asarray(data.log_l, float))
    t_lo, t_hi = np.log(TERM_FLOOR * loss.min()), np.log(TERM_CEIL * loss.max())
    lo = np.array([t_lo, t_lo, t_lo, 0.0, 0.0] + [0.0] * n_phi)
    hi = np.array([t_hi, t_hi, t_hi, EXPONENT_MAX, EXPONENT_MAX] + [PHI_MAX] * n_phi)
    n_off = data.n_params - N_BASE - data.n_phi
    if n_off:
        w = t_hi - t_lo
        lo, hi = np.r_[lo, np.full(n_off, -w)], np.r_[hi, np.full(n_off, w)]
    return lo, hi


def polish(x0: np.ndarray, data: LawData, delta: float, free: np.ndarray,
           weights: np.ndarray | None = None,
           box: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, float]:
    """scipy L-BFGS-B from one centred start, tight tolerances (the objective is tiny, ~1e-3, so
    scipy's default absolute gtol would stop it early). Bounds: `box` (lo, hi) for every
    coordinate when given, else natural phi in [0, PHI_MAX] only; the start is moved into them."""
    if box is not None:
        x0 = np.clip(x0, box[0], box[1])
    fixed = x0.copy()
    fi = np.flatnonzero(free)

    def fun(v: np.ndarray):
        x = fixed.copy()
        x[fi] = v
        f, g = objective(x[None], data, delta, weights)
        return float(f[0]), g[0, fi]

    if box is None:
        bounds = [(0.0, PHI_MAX) if N_BASE <= i < N_BASE + data.n_phi else (None, None) for i in fi]
    else:
        bounds = [(float(box[0][i]), float(box[1][i])) for i in fi]
    r = minimize(fun, x0[fi], jac=True, method="L-BFGS-B", bounds=bounds,
                 options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-14, "maxcor": 20})
    x = fixed.copy()
    x[fi] = r.x
    return x, float(r.fun)


# ---------------------------------------------------------------------------------------------
# the starting grid

def start_grid(n_phi: int, phi_values: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
               fixed_phi: np.ndarray | None = None, n_offsets: int = 0) -> np.ndarray:
    """Hoffmann-style grid in raw parameters (a, b, e, alpha, beta, phi...): a, b in 0..25 step 5,
    e in -1..1 step .5, alpha, beta in 0..2 step .5, times the phi values (all phis of a joint fit
    start equal); n_offsets level offsets start at 0. Returns (G, 5 + n_phi + n_offsets)."""
    a = np.arange(0, 26, 5.0)
    e = np.arange(-1, 1.01, 0.5)
    al = np.arange(0, 2.01, 0.5)
    phis = np.asarray(phi_values if n_phi else [0.0], float)
    mesh = np.meshgrid(a, a, e, al, al, phis, indexing="ij")
    flat = np.stack([mm.ravel() for mm in mesh], axis=1)
    grid = np.concatenate([flat[:, :N_BASE], np.repeat(flat[:, N_BASE:], n_phi, axis=1)], axis=1)
    if fixed_phi is not None and n_phi:
        pin = ~np.isnan(fixed_phi)
        grid[:, N_BASE:][:, pin] = fixed_phi[pin]
        grid = np.unique(grid, axis=0)
    if n_offsets:
        grid = np.concatenate([grid, np.zeros((len(grid), n_offsets))], axis=1)
    return grid


def multistart_fit(data: LawData, delta: float, free: np.ndarray, grid_raw: np.ndarray,
                   extra_starts: np.ndarray | None = None,
                   schedule: Sequence[tuple[int, int]] = ((1, 100), (100, 20), (1000, 4)),
                   n_polish: int = 4,
                   box: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, float]:
    """Best minimiser over the grid: batched L-BFGS on all starts with successive pruning
    (iterations, survivors) per stage, then scipy polishing of the best few. The first, widest
    stage runs in float32 (it only ranks basins); later stages in float64. With a `box` the
    batched stages roam freely and only polished points, which lie in the box, are candidates.
    Returns (raw parameter vector, objective)."""
    data32 = data.astype(np.float32)
    x = to_centred(grid_raw, data)
    if extra_starts is not None and len(extra_starts):
        x = np.concatenate([x, to_centred(np.atleast_2d(extra_starts), data)])
    for stage, (iters, keep) in enumerate(schedule):
        d = data32 if stage == 0 else data
        # starts are independent: chunks of ~1k keep the (S, R) temporaries in cache
        parts = [batched_lbfgs(x[i:i + CHUNK], d, delta, free=free, max_iter=iters)
                 for i in range(0, len(x), CHUNK)]
        x = np.concatenate([p[0] for p in parts])
        f = np.concatenate([p[1] for p in parts])
        f = np.where(np.isfinite(f), f, np.inf)
        order = np.argsort(f)[:keep]
        x, f = x[order], f[order]
    best_x, best_f = (x[0], float(f[0])) if box is None else (x[0], np.inf)
    for i in range(min(n_polish, len(x))):
        xp, fp = polish(x[i], data, delta, free, box=box)
        if fp < best_f:
            best_x, best_f = xp, fp
    return to_raw(best_x, data), best_f
