"""Command-line entry points: `megaloop fit` and `megaloop capacity`.

The top-level `megaloop` console script calls fit_main / capacity_main; for tests and
standalone use: python -m megaloop.analysis.cli fit|capacity ...
User errors print one line (no traceback) and exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys

from .table import FitInputError


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {s!r}")
    return v


def _nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {s!r}")
    return v


def fit_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="megaloop fit",
        description="Fit L = E + A (N_once + r^phi N_rec)^-alpha + B D^-beta to a table of runs "
                    "(Huber on log loss, summed; grid-started batched L-BFGS; bootstrap intervals), "
                    "plus the iso-FLOP frontier.")
    ap.add_argument("inputs", nargs="+", metavar="TABLE_OR_RUN_DIR",
                    help="a CSV (columns n_once, n_rec, r, tokens, loss; optional run, variant, flops, "
                         "vocab_size, skipped_steps: a run whose record says it diverged is excluded; "
                         "seed: runs of one cell with different seeds; n_adapter: the injection's "
                         "parameters inside n_rec, for the sensitivity table), "
                         "or run / sweep directories (searched recursively for summary.json)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ap.add_argument("--huber-delta", type=_positive_float, default=1e-3, help="Huber delta (default 1e-3)")
    ap.add_argument("--bootstrap", type=_nonneg_int, default=1000, metavar="N",
                    help="bootstrap resamples for the intervals (default 1000; 0 = none)")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    ap.add_argument("--joint", action="store_true",
                    help="also fit all variants jointly, twice: the shared-level model (E, A, alpha, B, "
                         "beta shared, one phi each) and the per-variant-level model (A per variant too); "
                         "a robust likelihood-ratio test picks the one dphi is reported under; with the "
                         "seed noise, a sensitivity table and the design's power")
    ap.add_argument("--level-e", action="store_true",
                    help="with --joint: the per-variant-level model also gives each variant its own E")
    ap.add_argument("--power-sims", type=_nonneg_int, default=20, metavar="N",
                    help="with --joint: simulated tables per dphi for the power line (default 20; 0 = none)")
    ap.add_argument("--no-sensitivity", action="store_true",
                    help="with --joint: skip the sensitivity table (it refits ~8 alternative specifications)")
    ap.add_argument("--drop-outliers", action="store_true",
                    help="also drop the runs far from the fit (log-loss residual above min(0.1, "
                         "max(5 robust sigmas, 0.02))) and refit; by default they are listed and kept")
    ap.add_argument("--keep-diverged", action="store_true",
                    help="accepted for old scripts; does nothing: keeping every run is now the default")
    ap.add_argument("--plots", metavar="DIR", help="write figures (PNG and PDF) to DIR")
    return ap


def fit_main(argv: list[str]) -> int:
    args = fit_parser().parse_args(argv)
    if args.keep_diverged:
        print("megaloop fit: note: --keep-diverged does nothing now: runs far from the fit are kept "
              "by default (listed as diverged); --drop-outliers drops them", file=sys.stderr)
    try:
        from .table import load_table

        df = load_table(args.inputs)  # before importing the fitter: bad input fails fast
        from .analyse import analyse
        from .report import format_report

        if args.joint and ("variant" not in df.columns or df["variant"].nunique() < 2):
            raise FitInputError("--joint needs a variant column with at least two variants")
        report, fits = analyse(df, args.huber_delta, args.bootstrap, args.seed, joint=args.joint,
                               drop_outliers=args.drop_outliers, e_level=args.level_e,
                               power_sims=args.power_sims, sensitivity=not args.no_sensitivity)
        if args.plots:
            from .plots import make_plots

            report["plots"] = make_plots(report, fits, df, args.plots)
    except FitInputError as exc:
        print(f"megaloop fit: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        from .fit import json_safe

        print(json.dumps(json_safe(report), allow_nan=False))
    else:
        print(format_report(report))
        if args.plots:
            print(f"plots: {len(report['plots'])} files in {args.plots}")
    return 0


def capacity_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="megaloop capacity",
        description="What a looped model is worth: unique-parameter equivalent N_once + r^phi N_rec, "
                    "compute equivalent N_once + r N_rec, and with --law and --tokens the predicted loss.")
    ap.add_argument("--phi", type=float, help="phi (default: from --law, else required)")
    ap.add_argument("--n-once", type=_positive_float, help="parameters run once (prelude, coda, norms)")
    ap.add_argument("--n-rec", type=float, help="parameters of the recurrent group (+ injection)")
    ap.add_argument("--r", type=_positive_float, help="number of recurrences")
    ap.add_argument("--config", metavar="CONFIG.yaml", help="take n_once, n_rec, r from a model config")
    ap.add_argument("--law", metavar="FIT.json", help="a `megaloop fit --json` result")
    ap.add_argument("--variant", help="use this variant's fit from --law")
    ap.add_argument("--tokens", type=_positive_float, help="training tokens, for the predicted loss")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    return ap


def capacity_main(argv: list[str]) -> int:
    args = capacity_parser().parse_args(argv)
    from .capacity import Capacity, from_config, load_law

    try:
        law = load_law(args.law, args.variant) if args.law else None
        if args.config:
            n_once, n_rec, r = from_config(args.config, args.r)
        else:
            missing = [f"--{k.replace('_', '-')}" for k in ("n_once", "n_rec", "r") if getattr(args, k) is None]
            if missing:
                raise FitInputError(f"give {', '.join(missing)} (or --config CONFIG.yaml)")
            n_once, n_rec, r = args.n_once, args.n_rec, args.r
        if n_rec < 0 or r < 1:
            raise FitInputError("need n_rec >= 0 and r >= 1")
        phi = args.phi
        if phi is None and law is not None:
            phi = law.get("phi")
            if phi is None:
                raise FitInputError(f"{args.law}: the fit did not identify phi; pass --phi")
        if phi is None:
            raise FitInputError("give --phi (or --law FIT.json)")
        if args.tokens is not None and law is None:
            raise FitInputError("--tokens needs --law FIT.json to predict a loss")
    except FitInputError as exc:
        print(f"megaloop capacity: error: {exc}", file=sys.stderr)
        return 2
    cap = Capacity(n_once, n_rec, r, phi)
    out = {"n_once": n_once, "n_rec": n_rec, "r": r, "phi": phi,
           "unique_equivalent": cap.unique_equivalent, "compute_equivalent": cap.compute_equivalent}
    if law is not None and args.tokens is not None:
        out["tokens"] = args.tokens
        out["predicted_loss"] = cap.predicted_loss(law, args.tokens)
    if args.json:
        print(json.dumps(out))
    else:
        print(f"N_once={n_once:.4g}  N_rec={n_rec:.4g}  r={r:g}  phi={phi:g}")
        print(f"unique-parameter equivalent  N_once + r^phi N_rec = {cap.unique_equivalent / 1e6:,.1f}M")
        print(f"compute equivalent           N_once + r N_rec     = {cap.compute_equivalent / 1e6:,.1f}M")
        if "predicted_loss" in out:
            print(f"predicted loss at {args.tokens:.4g} tokens = {out['predicted_loss']:.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("fit", "capacity"):
        print("usage: python -m megaloop.analysis.cli {fit,capacity} ...", file=sys.stderr)
        return 2
    return (fit_main if argv[0] == "fit" else capacity_main)(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
