"""Text and JSON rendering of a `megaloop fit` report (the dicts built by analyse.analyse)."""
from __future__ import annotations

from typing import Any

import numpy as np

PARAMS = (("E", ".4f"), ("A", ".4g"), ("alpha", ".4f"), ("B", ".4g"), ("beta", ".4f"))
STRUCTURAL_PREFIX = "phi is not identifiable: "


def json_safe(obj: Any) -> Any:
    """Report -> strict JSON: numpy scalars to Python, non-finite floats to null."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    return obj


def _fmt_ci(v: float | None, ci: list[float] | None, fmt: str) -> str:
    if v is None:
        return "not identifiable"
    return format(v, fmt) + ("" if ci is None else f"  [{format(ci[0], fmt)}, {format(ci[1], fmt)}]")


def _interval(ci: list[float] | None, open_: list[bool] | None, fmt: str) -> str:
    """[lo, hi], an end that reached the search region's edge marked as such."""
    if ci is None:
        return ""
    open_ = open_ or [False, False]
    lo = "bound" if open_[0] else format(ci[0], fmt)
    hi = "bound" if open_[1] else format(ci[1], fmt)
    return f"[{lo}, {hi}]"


def _param_line(d: dict[str, Any], name: str, key: str, value: float | None, boot: list | None, fmt: str) -> str:
    why = d.get("not_identified_because", {}).get(key, "")
    side = d.get("bound_side", {}).get(key)
    if side:  # never a plain value for a parameter that ended on a bound
        lo, hi = d["search_region"][key]
        edge = ("0" if key in ("E", "A", "B") else format(lo, ".4g")) if side == "lower" else format(hi, ".4g")
        return f"  {name:<5} = at its {side} bound ({edge}): not identified"
    if value is None:
        return f"  {name:<5} = not identifiable"
    parts = [format(value, fmt)]
    if boot is not None:
        parts.append(f"bootstrap [{format(boot[0], fmt)}, {format(boot[1], fmt)}]")
    prof = _interval(d.get("profile_ci", {}).get(key), d.get("profile_open", {}).get(key), fmt)
    if prof:
        parts.append(f"profile {prof}")
    line = f"  {name:<5} = " + "  ".join(parts)
    return line + ("   (not identified)" if why else "")


def phi_line(d: dict[str, Any], key: str = "phi") -> str:
    """The one line that says whether phi is identified, and why not when it is not."""
    why = d.get("not_identified_because", {}).get(key)
    if why is None and d.get("identified", {}).get(key) is None:  # a report without diagnostics
        why = d.get("phi_message") if d.get("phi") is None else None
    if why:
        return f"  {key} NOT identified: {why[len(STRUCTURAL_PREFIX):] if why.startswith(STRUCTURAL_PREFIX) else why}"
    ci = d.get("profile_ci", {}).get(key)
    where = f"its 95 % profile interval [{ci[0]:.4f}, {ci[1]:.4f}] closes inside the search region" if ci else ""
    return f"  {key} identified" + (f": {where}" if where else "")


def format_fit(d: dict[str, Any], title: str = "") -> str:
    lines = [title] if title else []
    lines.append(_param_line(d, "phi", "phi", d["phi"], d["phi_ci"], ".4f"))
    lines.append(phi_line(d))
    for name, fmt in PARAMS:
        lines.append(_param_line(d, name, name, d[name], d[name + "_ci"], fmt))
    for name, why in d.get("not_identified_because", {}).items():
        if name != "phi":
            lines.append(f"  {name} not identified: {why}")
    lines.append(f"  n_runs={d['n_runs']}  objective={d['objective']:.6g} (Huber delta {d['huber_delta']:g}, "
                 f"summed)  R^2(loss)={d['r2']:.4f}  RMSE(log loss)={d['rmse_log']:.4g}"
                 f"  bootstrap={d['n_bootstrap']}")
    ho = d.get("holdout")
    if ho:
        if ho.get("rmse_log") is None:
            lines.append(f"  hold-out (largest budget {ho['budget']:.3g}): not done, {ho.get('skipped', '')}")
        else:
            which = (f"C={ho['budget']:.3g}" if "min_budget" not in ho else
                     f"C from {ho['min_budget']:.3g} to {ho['budget']:.3g}")
            lines.append(f"  hold-out: refit without the largest budget ({which}, {ho['n_runs']} runs; "
                         f"{ho['n_train']} left) predicts them with RMSE(log loss)={ho['rmse_log']:.4g}, "
                         f"max |log error|={ho['max_abs_log']:.4g}, mean {ho['bias_log']:+.4g}")
    for ex in d.get("excluded", []):
        lines.append(f"  EXCLUDED run {ex['run']} (its record says it diverged: {ex['reason']})")
    for dv in d.get("diverged", []):
        lines.append(f"  FAR FROM THE FIT run {dv['run']}: loss {dv['loss']:.4g} vs fit {dv['predicted']:.4g} "
                     f"(log residual {dv['log_residual']:+.3f}), "
                     + ("dropped (--drop-outliers)" if dv["dropped"] else "kept (--drop-outliers drops it)"))
    return "\n".join(lines)


def format_report(rep: dict[str, Any]) -> str:
    """Human-readable report: bootstrap intervals are 95 % percentiles, profile intervals 95 %
    profile likelihood (calibrated Huber pseudo-likelihood, see profile.py)."""
    from .isoflop import format_isoflop
    out = []
    if "variants" in rep:
        for v, d in rep["variants"].items():
            out.append(format_fit(d, f"variant {v}{' (baseline)' if v == rep['baseline'] else ''}:"))
            if v != rep["baseline"]:
                dp = "n/a" if d["dphi"] is None else _fmt_ci(d["dphi"], d["dphi_ci"], "+.4f")
                out.append(f"  dphi vs {rep['baseline']} = {dp}")
        if "joint" in rep:
            out.append(_format_joint(rep["joint"], rep["baseline"]))
    else:
        out.append(format_fit(rep, "scaling law  L = E + A (N_once + r^phi N_rec)^-alpha + B D^-beta:"))
    if rep.get("noise") and "joint" not in rep:  # the joint section prints it
        out.append(format_noise(rep["noise"]))
    out.append(format_isoflop(rep["isoflop"]))
    return "\n".join(out)


def format_noise(n: dict[str, Any]) -> str:
    if "line" in n:
        return f"seed noise: {n['line']}"
    out = [f"seed noise (pooled per-run SD inside cells with several seeds; {n['intervals']}):"]
    for r in n["by_budget"]:
        out.append(f"  budget {r['budget']:.3g}: SD(log loss) {r['sd_log']:.4f}, SD(loss) {r['sd_loss']:.4f}  "
                   f"(df {r['df']}, {r['n_cells']} cells)")
    out.append(f"  all budgets: SD(log loss) {n['sd_log']:.4f}, SD(loss) {n['sd_loss']:.4f}  (df {n['df']})")
    return "\n".join(out)


def format_comparison(c: dict[str, Any], baseline: str) -> str:
    out = ["model comparison (shared level vs per-variant level):"]
    for name, m in c["models"].items():
        dp = ", ".join(f"{v} {_fmt_ci(m['dphi'][v], m['dphi_ci'][v], '+.3f') if m['dphi'][v] is not None else 'not identified'}"
                       for v in m.get("dphi", {}) if v != baseline)
        out.append(f"  {name}: {m['description']}; objective {m['objective']:.6g}, {m['n_params']} parameters"
                   + (f"; dphi {dp}" if dp else "") + (f"  ({m['note']})" if m.get("note") else ""))
    out.append(f"  {c['test']}")
    out.append(f"  statistic {c['statistic']:.2f} on {c['df']} df, p = {c['p']:.3g}: preferred {c['preferred']}; "
               f"dphi is reported under {c['dphi_reported_under']}")
    return "\n".join(out)


def format_sensitivity(s: dict[str, Any], baseline: str) -> str:
    rows = s["rows"]
    probes = list(dict.fromkeys(v for r in rows for v in (r.get("dphi") or {})))
    out = [f"sensitivity (preferred model; {s['refits']}; adapter {s['adapter_convention']}):",
           "  " + f"{'row':<26}{'runs':>5}  {'phi[' + baseline + ']':>14}" + "".join(f"  {'dphi[' + v + ']':>18}" for v in probes)]
    for r in rows:
        if "skipped" in r:
            out.append(f"  {r['row']:<26}{r['n_runs']:>5}  skipped: {r['skipped']}")
            continue
        cells = "".join(f"  {('n/a' if r['dphi'].get(v) is None else format(r['dphi'][v], '+.3f')):>18}" for v in probes)
        phi = "n/a" if r.get("phi") is None else format(r["phi"], ".3f")
        out.append(f"  {r['row']:<26}{r['n_runs']:>5}  {phi:>14}{cells}")
    for c in s["conclusions"]:
        out.append(f"  {c['line']}")
    return "\n".join(out)


def format_power(p: dict[str, Any]) -> str:
    if "skipped" in p:
        return f"power: {p['skipped']}"
    out = [f"power ({p['n_sims']} simulated tables per dphi in {p['dphi_grid']}; noise: {p['noise']}; "
           f"{p['criterion']}):"]
    for v, d in p["variants"].items():
        rates = ", ".join(f"{x:.2f}" for x in d["detection_rate"])
        out.append(f"  {v}: {d['line']} (detection rates {rates}; null SD of dphi {d['null_sd']:.3f})")
    return "\n".join(out)


def _format_joint(j: dict[str, Any], baseline: str) -> str:
    levels = j.get("model") == "per_variant_level"
    what = ("level per variant (A" + (", E" if any("dlogE" in o for o in (j.get("level_offsets") or {}).values())
                                      else "") + " per variant), the preferred model" if levels
            else "shared E, A, alpha, B, beta, the preferred model" if "model" in j
            else "shared E, A, alpha, B, beta")
    out = [f"joint fit ({what}; one phi per variant):"]
    if j.get("left_out"):
        out.append(f"  left out (test-time rows repeat runs already in the fit): {', '.join(j['left_out'])}")
    for v in j["phi"]:
        key = f"phi[{v}]"
        line = _param_line(j, key, key, j["phi"][v], j["phi_ci"][v], ".4f")
        if v != baseline and j["dphi"][v] is not None:
            line += f"   dphi = {_fmt_ci(j['dphi'][v], j['dphi_ci'][v], '+.4f')}"
        out += [line, phi_line(j, key)]
    for name, fmt in PARAMS:
        out.append(_param_line(j, name, name, j[name], j[name + "_ci"], fmt))
    for v, o in (j.get("level_offsets") or {}).items():
        out.append(f"  level of {v} vs {baseline}: log A {o['dlogA']:+.4f}" + (f", log E {o['dlogE']:+.4f}" if "dlogE" in o else ""))
    out.append(f"  n_runs={j['n_runs']}  objective={j['objective']:.6g}  R^2={j['r2']:.4f}  "
               f"RMSE(log loss)={j['rmse_log']:.4g}")
    if j.get("bootstrap_units"):
        out.append(f"  bootstrap units: {j['bootstrap_units']}")
    if j.get("model_comparison"):
        out.append(format_comparison(j["model_comparison"], baseline))
    if j.get("noise"):
        out.append(format_noise(j["noise"]))
    if j.get("sensitivity"):
        out.append(format_sensitivity(j["sensitivity"], baseline))
    if j.get("power"):
        out.append(format_power(j["power"]))
    return "\n".join(out)
