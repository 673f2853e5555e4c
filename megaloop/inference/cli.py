"""The inference options of `megaloop generate` and `megaloop eval`, checked once here.

generate: --kv-budget K, --exit CRITERION:THRESHOLD, --max-recur R, --no-cache
eval:     --exit CRITERION:THRESHOLD[,...] or --exit CRITERION --thresholds T1,T2,...,
          --max-recur R, --plot FILE; --tasks T1,T2 (lm-evaluation-harness)
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from ..config import recurrences
from ..errors import UserError
from .exit import CRITERIA, ExitRule, parse_exit, parse_threshold


def add_decoding_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--kv-budget", type=int, default=None, metavar="K",
                    help="recurrent KV-cache slots: recurrence i uses slot i mod K (1..R; default R, exact)")
    ap.add_argument("--exit", default=None, metavar="CRITERION:THRESHOLD",
                    help=f"per-token adaptive exit; criteria: {', '.join(CRITERIA)} (e.g. kl:0.01)")
    ap.add_argument("--max-recur", type=int, default=None, metavar="R",
                    help="most recurrences a generated token may run (default --recur); may exceed the trained r")
    ap.add_argument("--no-cache", action="store_true", help="recompute the window for every token (reference)")


def check_depth(recur: Optional[int], max_recur: Optional[int], trained: int) -> tuple[int, int]:
    """(prompt recurrences, most recurrences per token) from --recur / --max-recur."""
    for name, v in (("--recur", recur), ("--max-recur", max_recur)):
        if v is not None and v < 1:
            raise UserError(f"{name} must be >= 1, got {v}")
    r = recurrences(recur, trained)
    return r, recurrences(max_recur, r)


def decoding_options(args: argparse.Namespace, trained_r: int) -> dict:
    """Keyword arguments of inference.generate from the parsed generate options."""
    r, depth = check_depth(getattr(args, "recur", None), args.max_recur, trained_r)
    rule = parse_exit(args.exit) if args.exit else None
    k = args.kv_budget
    if k is not None and not 1 <= k <= depth:
        raise UserError(f"--kv-budget must be between 1 and {depth} (the recurrences a token runs), got {k}")
    if args.no_cache and (k is not None or rule is not None or args.max_recur is not None):
        raise UserError("--no-cache decodes at a fixed --recur; drop --kv-budget, --exit and --max-recur, or the --no-cache")
    return dict(num_recur=r, max_recur=depth, kv_budget=k, exit_rule=rule)


def decode(model, idx, args, generator=None):
    """Run `megaloop generate`'s decoding; the cache and the recurrences used go to stderr."""
    opts = decoding_options(args, model.cfg.num_recur)
    if args.no_cache:
        return model.generate(idx, args.max_new_tokens, args.temperature, args.top_k, opts["num_recur"],
                              generator=generator)
    from .generate import generate
    gen = generate(model, idx, args.max_new_tokens, args.temperature, args.top_k, generator=generator, **opts)
    c = gen.cache
    line = (f"kv cache: {c['bytes'] / 2**20:.2f} MiB ({c['layers']} layers = prelude + {c['kv_budget']} slots x "
            f"recurrent group + coda, {c['window']} positions)")
    if opts["exit_rule"] is not None and gen.recurrences.numel():
        line += f"; exit {opts['exit_rule']}: mean recurrences {gen.mean_recurrences:.2f} of {opts['max_recur']}"
    print(line, file=sys.stderr)
    return gen.tokens


def exit_rules(exit_arg: str, thresholds: Optional[str]) -> list[ExitRule]:
    """`--exit kl:0.01,latent:0.05` or `--exit kl --thresholds 0.001,0.01,0.1` -> rules."""
    if thresholds is None:
        return [parse_exit(part) for part in exit_arg.split(",") if part.strip()]
    name = exit_arg.strip().lower()
    if ":" in name:
        raise UserError(f"with --thresholds give --exit only the criterion (e.g. kl), got {exit_arg!r}")
    parse_exit(f"{name}:1")  # the criterion's own check
    values = [parse_threshold(t.strip(), name) for t in thresholds.split(",") if t.strip()]
    if not values:
        raise UserError(f"--thresholds expects comma-separated numbers, got {thresholds!r}")
    return [ExitRule(name, t) for t in values]


def add_eval_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("adaptive exit (val loss and mean recurrences used)")
    g.add_argument("--exit", default=None, metavar="CRITERION:THRESHOLD[,...]",
                   help=f"per-token exit rule(s), or one criterion with --thresholds; criteria: {', '.join(CRITERIA)}")
    g.add_argument("--thresholds", default=None, metavar="T1,T2,...", help="sweep these thresholds of --exit's criterion")
    g.add_argument("--max-recur", type=int, default=None, metavar="R", help="most recurrences per token (default trained r)")
    g.add_argument("--plot", default=None, metavar="FILE.png", help="plot loss against mean recurrences")
    h = ap.add_argument_group("downstream tasks (lm-evaluation-harness, extra `eval`)")
    h.add_argument("--tasks", default=None, metavar="T1,T2",
                   help="lm-eval task names; the bundled offline task is corpus_next_line")
    h.add_argument("--limit", type=int, default=None, help="at most this many examples per task")
    h.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass for --tasks")


def run_eval(args: argparse.Namespace, recur: list[int]) -> int:
    """`megaloop eval` with --exit or --tasks; returns the exit status."""
    if args.tasks and args.exit:
        raise UserError("--tasks and --exit are separate evaluations; run them one at a time")
    if args.exit is None and (args.thresholds or args.plot or args.max_recur):
        raise UserError("--thresholds, --plot and --max-recur go with --exit CRITERION (e.g. --exit kl --thresholds 0.01,0.1)")
    if args.exit:
        check_depth(None, args.max_recur, 1)
        from .evaluate import exit_sweep
        exit_sweep(args.run_dir, exit_rules(args.exit, args.thresholds), args.max_recur, args.tokens, args.plot)
        return 0
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UserError(f"--tasks expects comma-separated task names, got {args.tasks!r}")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    from .harness import run_tasks
    run_tasks(args.run_dir, tasks, recur, limit=args.limit, batch_size=args.batch_size)
    return 0
