"""Profile-likelihood intervals and what the fit can and cannot identify.

For each parameter (phi, E, A, alpha, B, beta) the profile is the summed Huber objective minimised
over all the other parameters with that one pinned, on a grid across its search region
(`law.search_box`); all grid points of all parameters are one batch of the batched L-BFGS.

Calibration: the Huber sum F is not a Gaussian log-likelihood, so 2 (F_profile - F_min) is not
chi-square distributed by itself. F is an M-estimation objective with psi = clip(res, -delta,
delta); near the optimum its expected curvature is E[psi'] J'J and the estimate's covariance is
E[psi^2] / E[psi']^2 (J'J)^-1 (the sandwich), so the scaled drop in the objective

    D(theta) = 2 k (F_profile(theta) - F_min),   k = E[psi'] / E[psi^2]

is asymptotically chi-square with 1 degree of freedom (Schrader & Hettmansperger's robust
likelihood-ratio test): -k F is the pseudo-log-likelihood. For delta much larger than the residuals
this is the Gaussian profile likelihood (k = 1 / sigma^2); for delta much smaller, the Laplace
one. E[psi^2] is estimated from the residuals at the optimum with n / (n - p) for the p fitted
parameters; E[psi'] = P(|res| < delta) from a Gaussian-kernel-smoothed residual density (with
delta = 1e-3 and residuals of ~0.5 % only a few runs fall inside +-delta, and a raw count of them
is too noisy to scale by). The 95 % interval is {theta : D(theta) <= 3.841} (chi2(1) 0.95), found
by signed-root interpolation between grid points and two refinement rounds. Its coverage on
synthetic tables with a known truth is tested (tests/test_fit_diagnostics.py) and measured by
benchmarks/fit.py --coverage.

A parameter is *identified* when its estimate is inside its search region and its profile
interval closes on both sides inside it. Otherwise the reason is recorded: at a bound, flat
profile (the interval spans the whole region), or an interval open on one side.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.special import ndtr

from .law import EXPONENT_MAX, N_BASE, LawData, batched_lbfgs, predict_log_loss, to_centred, to_raw

CHI2_95 = 3.841458820694124  # chi2(1) 0.95 quantile
# offsets of the first grid, in (Wald) standard errors, on each side of the estimate
GRID_SE = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 9.0, 14.0, 22.0, 35.0)
AT_BOUND_TOL = 1e-3   # an estimate within this fraction of its region's width of an edge is on it
BETTER_D = 0.01       # a profile point better than the optimum by this much in D means a missed optimum
MAX_ITER = 150  # per batched call; the continuation round gives far points a second run


@dataclass
class Calibration:
    k: float            # D = 2 k (F - F_min)
    e_psi2: float       # E[psi^2]
    e_dpsi: float       # E[psi']
    bandwidth: float    # kernel bandwidth of the residual density

    def to_dict(self) -> dict:
        return {"scale_k": self.k, "E_psi2": self.e_psi2, "E_dpsi": self.e_dpsi,
                "bandwidth": self.bandwidth, "threshold": CHI2_95}


def calibrate(res: np.ndarray, delta: float, n_params: int) -> Calibration:
    """The pseudo-likelihood scale k = E[psi'] / E[psi^2] from the residuals at the optimum."""
    res = np.asarray(res, float)
    n = len(res)
    psi = np.clip(res, -delta, delta)
    e_psi2 = float(np.sum(psi ** 2) / max(n - n_params, 1))
    iqr = np.subtract(*np.percentile(res, [75, 25]))
    spread = min(np.std(res), iqr / 1.349) if iqr > 0 else np.std(res)
    h = float(0.9 * spread * n ** -0.2)  # Silverman's rule
    if h > 0:
        e_dpsi = float(np.mean(ndtr((delta - res) / h) - ndtr((-delta - res) / h)))
    else:  # a perfect fit: every residual is inside the quadratic zone
        e_dpsi = float(np.mean(np.abs(res) < delta))
    return Calibration(e_dpsi / max(e_psi2, 1e-300), e_psi2, e_dpsi, h)


@dataclass
class Profile:
    """One parameter's profile, in reported units (E, A, B natural, not log)."""

    name: str
    estimate: float
    box: tuple[float, float]
    values: np.ndarray = field(default_factory=lambda: np.zeros(0))
    stat: np.ndarray = field(default_factory=lambda: np.zeros(0))   # D at values
    ci: list[float] | None = None
    open: tuple[bool, bool] = (False, False)
    at_bound: str | None = None     # "lower" / "upper"
    reason: str = ""                # why not identified ("" when identified)

    @property
    def identified(self) -> bool:
        return not self.reason


@dataclass
class _Spec:
    name: str
    system: str     # "c": usual centring; "a": c_n = 0 (coordinate 0 is raw a); "b": c_d = 0
    coord: int
    log_scale: bool  # reported as exp(coordinate)


def _specs(phi_names: list[str], free: np.ndarray) -> list[_Spec]:
    out = [_Spec(n, "c", N_BASE + k, False) for k, n in enumerate(phi_names) if free[N_BASE + k]]
    return out + [_Spec("E", "c", 2, True), _Spec("A", "a", 0, True), _Spec("alpha", "c", 3, False),
                  _Spec("B", "b", 1, True), _Spec("beta", "c", 4, False)]


class _System:
    """One centring of the data, its estimate and box, and the per-row bounds of a pinned row."""

    def __init__(self, kind: str, data: LawData, raw_hat: np.ndarray, box: tuple[np.ndarray, np.ndarray]):
        self.kind = kind
        self.base = data
        self.data = {"c": data, "a": data.with_centre(c_n=0.0), "b": data.with_centre(c_d=0.0)}[kind]
        self.x_hat = to_centred(raw_hat, self.data)
        # how the optimiser maps this system's coordinates 0 / 1 back to the centred ones
        self.shift = {"c": (0.0, 0.0), "a": (data.c_n, 0.0), "b": (0.0, data.c_d)}[kind]
        self.base_box = box
        self.lo, self.hi = box[0].copy(), box[1].copy()
        if kind in ("a", "b"):  # the raw a (b) range the centred box allows, given alpha's range
            i, c = (0, data.c_n) if kind == "a" else (1, data.c_d)
            self.lo[i] = box[0][i] + min(0.0, EXPONENT_MAX * c)
            self.hi[i] = box[1][i] + max(0.0, EXPONENT_MAX * c)

    def row_bounds(self, coord: int, value: float) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.lo.copy(), self.hi.copy()
        if self.kind in ("a", "b"):
            # with raw a pinned, the centred box a - alpha c_n in [lo, hi] is a box on alpha
            i, j, c = (0, 3, self.base.c_n) if self.kind == "a" else (1, 4, self.base.c_d)
            b_lo, b_hi = self.base_box
            lims = sorted(((value - b_hi[i]) / c, (value - b_lo[i]) / c))
            lo[j], hi[j] = max(lo[j], lims[0]), min(hi[j], lims[1])
        return lo, hi


def _wald_se(systems: dict[str, _System], specs: list[_Spec], free: np.ndarray, cal: Calibration) -> dict[str, float]:
    """Standard errors from the smoothed information (E[psi']^2 / E[psi^2]) J'J, J the Jacobian of
    the predicted log loss: only used to space the profile grid."""
    out = {}
    fi = np.flatnonzero(free)
    for kind, sysm in systems.items():
        x0 = sysm.x_hat
        J = np.empty((len(sysm.data.log_l), len(fi)))
        for col, i in enumerate(fi):
            h = 1e-6 * max(1.0, abs(x0[i]))
            xp, xm = x0.copy(), x0.copy()
            xp[i] += h
            xm[i] -= h
            J[:, col] = (predict_log_loss(to_raw(xp, sysm.data), sysm.data)
                         - predict_log_loss(to_raw(xm, sysm.data), sysm.data)) / (2 * h)
        info = cal.e_dpsi ** 2 / max(cal.e_psi2, 1e-300) * (J.T @ J)
        var = np.diag(np.linalg.pinv(info))
        for s in specs:
            if s.system == kind:
                out[s.name] = float(np.sqrt(max(var[int(np.flatnonzero(fi == s.coord)[0])], 0.0)))
    return out


def _evaluate(rows: list[tuple[_System, int, float, np.ndarray]], data: LawData, free: np.ndarray,
              delta: float) -> tuple[np.ndarray, np.ndarray]:
    """For every row (system, coord, value, start): minimise with `coord` pinned at `value` from
    `start` (coordinates of that system), all rows in one batch. Returns (x (S, P), f (S,));
    rows with an empty region get f = inf."""
    S, P = len(rows), len(free)
    x0, lo, hi, shift = np.empty((S, P)), np.empty((S, P)), np.empty((S, P)), np.zeros((S, 2))
    fr = np.broadcast_to(free, (S, P)).copy()
    for i, (sysm, coord, value, start) in enumerate(rows):
        x0[i] = start
        x0[i, coord] = value
        fr[i, coord] = False
        lo[i], hi[i] = sysm.row_bounds(coord, value)
        shift[i] = sysm.shift
    feasible = np.all((lo <= hi) | ~fr, axis=1)
    hi = np.where(hi > lo, hi, lo + 1e-9)  # a degenerate (or empty) range stays a valid sigmoid
    x0 = np.where(fr, np.clip(x0, lo, hi), x0)
    x, f = batched_lbfgs(x0, data, delta, free=fr, lo=lo, hi=hi, shift=shift, max_iter=MAX_ITER)
    return x, np.where(feasible & np.isfinite(f), f, np.inf)


@dataclass
class ProfileResult:
    profiles: dict[str, Profile]
    calibration: Calibration
    f_min: float
    better: np.ndarray | None = None   # raw vector better than the estimate, if one was found


def profile_fit(data: LawData, delta: float, raw_hat: np.ndarray, f_hat: float, free: np.ndarray,
                box: tuple[np.ndarray, np.ndarray], phi_names: list[str]) -> ProfileResult:
    """Profiles, 95 % intervals and identification of every fitted parameter."""
    res = data.log_l - predict_log_loss(raw_hat, data)
    cal = calibrate(res, delta, int(free.sum()))
    specs = _specs(phi_names, free)
    systems = {k: _System(k, data, raw_hat, box) for k in ("c", "a", "b")}
    se = _wald_se(systems, specs, free, cal)

    # round 1: a grid per parameter, every point started from the estimate
    grids: dict[str, np.ndarray] = {}
    for s in specs:
        sysm = systems[s.system]
        v0, lo, hi = sysm.x_hat[s.coord], sysm.lo[s.coord], sysm.hi[s.coord]
        width = hi - lo
        step = se.get(s.name, np.nan)
        step = width / 40 if not np.isfinite(step) or step <= 0 else min(max(step, width * 1e-4), width / 6)
        # the estimate itself is a grid point (D = 0): every bracket has a point inside
        pts = [v0] + [v0 + sgn * k * step for sgn in (-1, 1) for k in GRID_SE] + [lo, hi]
        grids[s.name] = np.unique(np.clip(pts, lo, hi))
    sols: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def run(batch: dict[str, list[tuple[float, np.ndarray]]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        rows, owners = [], []
        for s in specs:
            for v, start in batch.get(s.name, []):
                rows.append((systems[s.system], s.coord, v, start))
                owners.append(s.name)
        x, f = _evaluate(rows, data, free, delta)
        owners = np.array(owners)
        return {name: (x[owners == name], f[owners == name]) for name in dict.fromkeys(owners)}

    first = run({s.name: [(v, systems[s.system].x_hat) for v in grids[s.name]] for s in specs})
    # round 2: continuation, each point restarted from its neighbour nearer the estimate
    batch = {}
    for s in specs:
        g, (x1, _) = grids[s.name], first[s.name]
        v0 = systems[s.system].x_hat[s.coord]
        starts = []
        for i, v in enumerate(g):
            j = i + 1 if v < v0 else i - 1
            j = min(max(j, 0), len(g) - 1)
            starts.append((v, x1[j]))
        batch[s.name] = starts
    second = run(batch)
    for s in specs:
        x1, f1 = first[s.name]
        x2, f2 = second[s.name]
        take = f2 < f1
        sols[s.name] = (grids[s.name].copy(), np.where(take[:, None], x2, x1), np.where(take, f2, f1))

    f_all = min([f_hat] + [float(np.min(v[2])) for v in sols.values()])
    if f_all < f_hat - BETTER_D / (2 * cal.k):
        name = min(sols, key=lambda n: np.min(sols[n][2]))
        vals, xs, fs = sols[name]
        sysm = systems[next(s.system for s in specs if s.name == name)]
        return ProfileResult({}, cal, f_all, better=to_raw(xs[int(np.argmin(fs))], sysm.data))
    f_ref = min(f_hat, f_all)

    def stat(f):
        return np.maximum(2 * cal.k * (np.asarray(f) - f_ref), 0.0)

    # refinement rounds: signed-root interpolation inside each bracket that crosses the threshold
    for _ in range(2):
        batch = {}
        for s in specs:
            vals, xs, fs = sols[s.name]
            v0 = systems[s.system].x_hat[s.coord]
            new = []
            for side in (-1, 1):
                br = _bracket(vals, stat(fs), v0, side)
                if br is None:
                    continue
                i_in, i_out = br
                v = _root_interp(vals[i_in], vals[i_out], stat(fs[i_in]), stat(fs[i_out]), v0)
                if np.isfinite(v) and not np.any(np.isclose(vals, v, rtol=0, atol=1e-12)):
                    new.append((v, xs[i_in]))
            if new:
                batch[s.name] = new
        if not batch:
            break
        got = run(batch)
        for name, (x, f) in got.items():
            vals, xs, fs = sols[name]
            v_new = np.array([v for v, _ in batch[name]])
            vals, xs, fs = np.r_[vals, v_new], np.r_[xs, x], np.r_[fs, f]
            o = np.argsort(vals)
            sols[name] = (vals[o], xs[o], fs[o])

    profiles = {}
    for s in specs:
        sysm = systems[s.system]
        vals, xs, fs = sols[s.name]
        D = stat(fs)
        v0, lo, hi = sysm.x_hat[s.coord], sysm.lo[s.coord], sysm.hi[s.coord]
        ends = []
        for side in (-1, 1):
            br = _bracket(vals, D, v0, side)
            if br is None:
                ends.append(lo if side < 0 else hi)
            else:
                i_in, i_out = br
                ends.append(_root_interp(vals[i_in], vals[i_out], D[i_in], D[i_out], v0))
        open_lo = _bracket(vals, D, v0, -1) is None
        open_hi = _bracket(vals, D, v0, 1) is None
        tr = np.exp if s.log_scale else (lambda v: v)
        p = Profile(s.name, float(tr(v0)), (float(tr(lo)), float(tr(hi))), tr(vals), D,
                    [float(tr(ends[0])), float(tr(ends[1]))], (open_lo, open_hi))
        # on a bound: the coordinate itself, or for A / B the centred size / data term
        bc = {"A": 0, "B": 1}.get(s.name, s.coord)
        cs = systems["c"]
        w = cs.hi[bc] - cs.lo[bc]
        if cs.x_hat[bc] - cs.lo[bc] <= AT_BOUND_TOL * w:
            p.at_bound = "lower"
        elif cs.hi[bc] - cs.x_hat[bc] <= AT_BOUND_TOL * w:
            p.at_bound = "upper"
        p.reason = _reason(p, s)
        profiles[s.name] = p
    return ProfileResult(profiles, cal, f_ref)


def _bracket(vals: np.ndarray, D: np.ndarray, v0: float, side: int) -> tuple[int, int] | None:
    """Indices (inside, outside) of the first crossing of the threshold going from the estimate
    (a grid point) towards `side`; None when the profile stays below it up to the region's edge."""
    i0 = int(np.argmin(np.abs(vals - v0)))
    idx = range(i0 - 1, -1, -1) if side < 0 else range(i0 + 1, len(vals))
    prev = i0
    for i in idx:
        if D[i] > CHI2_95:
            return prev, i
        prev = i
    return None


def _root_interp(v_in: float, v_out: float, d_in: float, d_out: float, v0: float) -> float:
    """Where the signed root sqrt(D) reaches sqrt(threshold), linearly between two grid points
    (the signed root of a profile is close to linear in the parameter, unlike D itself)."""
    r_in, r_out = np.sqrt(max(d_in, 0.0)), np.sqrt(d_out)
    t = (np.sqrt(CHI2_95) - r_in) / max(r_out - r_in, 1e-300)
    return float(v_in + np.clip(t, 0.0, 1.0) * (v_out - v_in))


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _reason(p: Profile, s: _Spec) -> str:
    """Why the parameter is not identified, or '' when it is."""
    lo, hi = p.box
    if s.name in ("E", "A", "B"):
        lo_txt = "0"
    else:
        lo_txt = _fmt(lo)
    if p.open[0] and p.open[1]:
        where = f"; the estimate sits at its {p.at_bound} bound" if p.at_bound else ""
        return f"flat profile: the 95 % interval spans the whole search region [{lo_txt}, {_fmt(hi)}]{where}"
    if p.at_bound:
        what = {"A": " (the size term A N^-alpha is negligible at these sizes)",
                "B": " (the data term B D^-beta is negligible at these token counts)",
                "E": " (no irreducible loss is visible)" if p.at_bound == "lower" else ""}.get(s.name, "")
        edge = lo_txt if p.at_bound == "lower" else _fmt(hi)
        return f"at its {p.at_bound} bound ({edge}){what}"
    if p.open[0]:
        return (f"the 95 % interval reaches the lower bound {lo_txt} of the search region "
                f"(only {s.name} < {_fmt(p.ci[1])} at 95 %)")
    if p.open[1]:
        return (f"the 95 % interval reaches the upper bound {_fmt(hi)} of the search region "
                f"(only {s.name} > {_fmt(p.ci[0])} at 95 %)")
    return ""
