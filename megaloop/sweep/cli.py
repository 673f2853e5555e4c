"""`megaloop sweep {plan,run,slurm,collect}`: from one sweep file to the fit table.

    megaloop sweep plan configs/sweeps/demo.yaml --out runs/demo_sweep
    megaloop sweep run runs/demo_sweep --jobs 2        # here: 2 runs at a time, the rest queued
    megaloop sweep slurm runs/demo_sweep --partition gpu && bash runs/demo_sweep/submit.sh
    megaloop sweep collect runs/demo_sweep             # -> runs/demo_sweep/fit_table.csv
    megaloop fit runs/demo_sweep --plots runs/demo_sweep/plots
    megaloop sweep suggest runs/demo_sweep --candidates configs/sweeps/demo.yaml --flops 1e13 --out next.yaml
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

from ..errors import UserError

USAGE = __doc__.split("\n\n", 1)[1]


def _plan(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="megaloop sweep plan",
                                 description="Expand a sweep file into run configs and a manifest.")
    ap.add_argument("sweep", help="sweep YAML, e.g. configs/sweeps/iso_depth.yaml")
    ap.add_argument("--out", required=True, help="sweep directory to write (manifest.csv/json, runs/NAME/config.yaml)")
    ap.add_argument("--append", action="store_true",
                    help="add these runs to a sweep directory that already holds other runs (e.g. a probe "
                         "next to the reference grid)")
    ap.add_argument("--list", action="store_true", help="print every planned run")
    args = ap.parse_args(argv)
    from .plan import expand, write_plan
    from .spec import load_sweep
    spec = load_sweep(args.sweep)
    runs = expand(spec, args.out)
    manifest = write_plan(spec, runs, args.out, append=args.append)
    total = sum(r.target_flops for r in runs)
    print(f"planned {len(runs)} runs of sweep {spec.name} into {args.out} "
          f"({len(manifest['runs'])} in its manifest), {total:.3g} FLOPs in all")
    by = Counter((r.variant, r.r) for r in runs)
    print("  " + ", ".join(f"{v} r={r}: {n}" for (v, r), n in sorted(by.items())))
    if args.list:
        print(f"  {'run':<36} {'d_model':>7} {'N_once':>12} {'N_rec':>12} {'FLOPs/token':>12} {'tokens':>14} {'steps':>7}")
        for r in runs:
            print(f"  {r.run:<36} {r.d_model:>7} {r.n_once:>12,} {r.n_rec:>12,} {r.flops_per_token:>12.4g} "
                  f"{r.tokens:>14,} {r.steps:>7,}")
    if any(r.branch_from for r in runs) or getattr(spec, "branching", False):
        from .branch import spent_report
        rep = spent_report(manifest["runs"])
        print(f"  budget branching: {rep['branches']} of {rep['runs']} runs branch from a trunk; FLOPs spent "
              f"{rep['flops_spent']:.3g} against {rep['flops_unbranched']:.3g} unbranched (ratio {rep['ratio']:.3f})")
    print(f"  {os.path.join(args.out, 'manifest.csv')}; next: megaloop sweep run {args.out} "
          f"(or: megaloop sweep slurm {args.out})")
    return 0


def _run(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="megaloop sweep run",
                                 description="Train the sweep's runs on this machine (--jobs at a time). "
                                             "Finished runs are skipped; interrupted ones resume.")
    ap.add_argument("sweep_dir")
    ap.add_argument("--only", default=None, help="comma-separated glob(s) of run names, e.g. 'baseline_r1_*'")
    ap.add_argument("--max-runs", type=int, default=None, help="train at most N runs, then stop")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override passed to every run, e.g. train.threads=2 (must not change the "
                         "experiment, or resuming fails)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs trained at once, each with cores / jobs torch threads (default 1)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args(argv)
    if args.max_runs is not None and args.max_runs < 0:
        raise UserError(f"--max-runs must be >= 0, got {args.max_runs}")
    if args.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {args.jobs}")
    from .runner import run_sweep
    rep = run_sweep(args.sweep_dir, args.only, args.max_runs, args.overrides, args.dry_run, args.jobs)
    if not args.dry_run:
        print(f"sweep run: {len(rep.finished)} trained, {len(rep.skipped)} already finished, "
              f"{len(rep.failed)} failed, {len(rep.busy)} busy elsewhere in {rep.wall_s:.0f} s")
        if rep.failed:
            print("failed runs (see runs/NAME/FAILED and train.log; rerun to retry): " + ", ".join(rep.failed))
        print(f"next: megaloop sweep collect {args.sweep_dir}")
    return 1 if rep.failed else 0


def _slurm(argv: list[str]) -> int:
    from .slurm import SlurmOptions, check_partition, write_slurm
    d = SlurmOptions()
    ap = argparse.ArgumentParser(prog="megaloop sweep slurm",
                                 description="Write a SLURM array job (one task per run) and a submit script.")
    ap.add_argument("sweep_dir")
    ap.add_argument("--partition", default=None)
    ap.add_argument("--account", default=None)
    ap.add_argument("--qos", default=None)
    ap.add_argument("--gpus-per-node", type=int, default=None,
                    help="GPUs per run, one node each (default: the sweep's resources.gpus); 0: a CPU-only "
                         "array, one process per run threaded over its CPUs")
    ap.add_argument("--cpus-per-gpu", type=int, default=d.cpus_per_gpu)
    ap.add_argument("--cpus-per-task", type=int, default=None,
                    help="CPUs per run (default: --cpus-per-gpu x GPUs; --cpus-per-gpu on a CPU-only array)")
    ap.add_argument("--mem", default=None, help="memory per node, e.g. 0 (all) or 512G")
    ap.add_argument("--max-parallel", type=int, default=None, help="at most N array tasks at once")
    ap.add_argument("--tflops-per-gpu", type=float, default=d.tflops_per_gpu,
                    help="peak TFLOP/s per GPU assumed for the time limits (default %(default)s)")
    ap.add_argument("--tflops-per-cpu", type=float, default=d.tflops_per_cpu,
                    help="peak TFLOP/s per CPU core assumed for CPU-only time limits (default %(default)s)")
    ap.add_argument("--mfu", type=float, default=d.mfu, help="assumed model FLOP utilisation (default %(default)s)")
    ap.add_argument("--safety", type=float, default=d.safety, help="time-limit safety factor (default %(default)s)")
    ap.add_argument("--overhead-min", type=float, default=d.overhead_min,
                    help="minutes added per run for start-up, eval and checkpoints (default %(default)s)")
    ap.add_argument("--env-setup", default=None,
                    help="shell line run before training, e.g. 'module load cuda; source ~/venv/bin/activate'")
    ap.add_argument("--sbatch", dest="extra_sbatch", action="append", default=[], metavar="OPTION",
                    help="extra #SBATCH option, e.g. --sbatch=--exclusive (repeatable)")
    ap.add_argument("--job-name", default=None)
    args = ap.parse_args(argv)
    opts = SlurmOptions(**{k: v for k, v in vars(args).items() if k != "sweep_dir"})
    note = check_partition(opts.partition)
    files = write_slurm(args.sweep_dir, opts)
    if note:
        print(note)
    print(f"wrote {files['sweep.sbatch']} ({files['tasks.tsv']}: one line per run)")
    print(f"submit the unfinished runs (rerun any time; finished, queued and running runs are skipped): "
          f"bash {files['submit.sh']}")
    return 0


def _collect(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="megaloop sweep collect",
                                 description="Gather the finished runs into the fit table; report the others.")
    ap.add_argument("sweep_dir")
    ap.add_argument("--out", default=None, help="table path (default SWEEP_DIR/fit_table.csv)")
    ap.add_argument("--json", action="store_true", help="print the run statuses as JSON")
    args = ap.parse_args(argv)
    from .collect import collect, format_collection
    c = collect(args.sweep_dir, args.out)
    if args.json:
        print(json.dumps(c.as_dict(), indent=1))
    else:
        print(format_collection(c))
        print(f"next: megaloop fit {c.table_path}")
    return 0


def _suggest(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="megaloop sweep suggest",
        description="Propose the candidate runs that shrink the target's 95 %% interval most per FLOP (greedy "
                    "c-optimal design under the fitted law; docs/sweeps.md). Without a table ('-'): a seed design.")
    ap.add_argument("inputs", nargs="+", help="the fit table (CSV) or run / sweep directories so far; '-' for none yet")
    ap.add_argument("--candidates", required=True, help="sweep YAML whose runs are the candidates, e.g. "
                                                        "configs/sweeps/iso_depth.yaml")
    ap.add_argument("--flops", required=True, help="FLOPs to spend on the suggested runs, e.g. 2e19")
    ap.add_argument("--target", default="phi", help="phi (default) or dphi:VARIANT")
    ap.add_argument("--noise", default=None,
                    help="per-run SD of the log loss (default: from the table's seeds, else its fit residuals)")
    ap.add_argument("--json", action="store_true", help="print the suggested runs as a JSON list")
    ap.add_argument("--out", default=None, help="write a sweep file of the suggested runs, for "
                                                "`megaloop sweep plan OUT --out SWEEP_DIR --append`")
    args = ap.parse_args(argv)
    flops = _positive(args.flops, "--flops")
    noise = None if args.noise is None else _positive(args.noise, "--noise")
    from .suggest import Target, format_suggestion, load_candidates, suggest, write_spec
    target = Target.parse(args.target)
    spec, runs = load_candidates(args.candidates)
    df = None
    if args.inputs != ["-"]:
        from ..analysis.table import load_table
        df = load_table(args.inputs)
    s = suggest(df, spec, runs, flops, target, noise)
    if args.out:
        write_spec(args.candidates, s["runs"], args.out)
    if args.json:
        print(json.dumps(s["runs"], indent=1))
        print(format_suggestion(s).split("\n")[0], file=sys.stderr)
    else:
        print(format_suggestion(s))
    if args.out:
        print(f"wrote {args.out}; next: megaloop sweep plan {args.out} --out SWEEP_DIR --append",
              file=sys.stderr if args.json else sys.stdout)
    return 0


def _positive(text: str, flag: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise UserError(f"{flag} expects a number, got {text!r}") from None
    if not (v > 0 and v < float("inf")):
        raise UserError(f"{flag} must be a positive number, got {text!r}")
    return v


def _branch(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="megaloop sweep branch",
                                 description="Seed a budget branch's run directory with its trunk's checkpoint at the "
                                             "branch's decay start (what a SLURM task of a branch does before training).")
    ap.add_argument("sweep_dir")
    ap.add_argument("run", help="the branch's run name")
    args = ap.parse_args(argv)
    from .branch import is_branch, seed
    from .plan import read_manifest
    rows = {r["run"]: r for r in read_manifest(args.sweep_dir)["runs"]}
    row = rows.get(args.run)
    if row is None or not is_branch(row):
        raise UserError(f"{args.run} is not a branch of the sweep in {args.sweep_dir} (see its manifest.csv, "
                        f"column branch_from)")
    state = seed(args.sweep_dir, row)
    if state == "waiting":
        raise UserError(f"{args.run} branches from {row['branch_from']} at step {row['branch_step']}, which that run "
                        f"has not reached yet; train it first (under SLURM the branch's job waits for it: afterok)")
    print(f"{args.run}: {'seeded from ' + row['branch_from'] + ' at step ' + str(row['branch_step']) if state == 'seeded' else 'already started'}")
    return 0


SUBCOMMANDS = {"plan": _plan, "run": _run, "slurm": _slurm, "collect": _collect, "suggest": _suggest, "branch": _branch}


def sweep_main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print("usage: megaloop sweep {plan,run,slurm,collect,suggest,branch} ...\n\n" + USAGE)
        return 0 if argv else 2
    if argv[0] not in SUBCOMMANDS:
        raise UserError(f"unknown sweep command {argv[0]!r}: use one of {', '.join(SUBCOMMANDS)}")
    return SUBCOMMANDS[argv[0]](argv[1:])
