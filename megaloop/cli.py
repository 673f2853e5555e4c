"""The `megaloop` command line. Subcommands import their machinery lazily so `--help` is instant.

User mistakes (bad config, missing file, corrupt data, impossible layout) print one line that
names the problem and the fix, and exit with status 2, without a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

USAGE = """megaloop <command> [args]

commands:
  train       pretrain a looped LM:          megaloop train CONFIG.yaml [--set key=value ...] [--resume]
  eval        val loss at several r:         megaloop eval RUN_DIR --recur 1,2,4,8
              with per-token exit / tasks:   megaloop eval RUN_DIR --exit kl:0.01 | --tasks T1,T2 [--recur 1,4]
  params      parameters and FLOPs:          megaloop params CONFIG.yaml [--flops 1e18] [--json]
  tokenizer   train a sentencepiece model:   megaloop tokenizer --input FILES --out PREFIX --vocab-size N
  preprocess  text -> token dataset:         megaloop preprocess --input FILES --tokenizer M --out-dir DIR
  sweep       plan / run / collect a grid:   megaloop sweep {plan,run,slurm,collect,suggest} ...
  fit         fit the scaling law:           megaloop fit TABLE.csv|RUN_DIRS... [--json]
  capacity    recurrence-equivalent size:    megaloop capacity --phi 0.46 --n-once X --n-rec Y --r 4
  export      safetensors or Hugging Face:   megaloop export RUN_DIR --out DIR [--format safetensors|hf]
  generate    sample text from a run:        megaloop generate RUN_DIR --prompt TEXT [--kv-budget K] [--exit kl:0.01]
  checkpoint  inspect / convert checkpoints: megaloop checkpoint {info,convert} ...

Run `megaloop <command> --help` for the options of one command."""


def cmd_train(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="megaloop train", description="Pretrain a looped language model.")
    ap.add_argument("config", help="YAML config (see configs/)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set model.num_recur=8 (repeatable)")
    ap.add_argument("--resume", action="store_true", help="continue RUN_DIR from its latest complete checkpoint")
    args = ap.parse_args(argv)
    from .config import load_config
    from .parallel.engines import rendezvous_from_env
    from .train import train
    cfg = load_config(args.config, args.overrides)
    summary = train(cfg, resume=args.resume)
    if rendezvous_from_env().rank == 0:  # torchrun's RANK or a direct srun's SLURM_PROCID: one summary
        run_dir = os.path.abspath(cfg.train.run_dir)
        with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
            latest = f.read().strip()
        print(f"\nvalidation loss {summary['val_loss']:.4f} nats/token at r={summary['r']}"
              + (f" (unigram entropy of the validation split: {summary['unigram_entropy']:.4f}; "
                 f"{_gap(summary['val_loss'], summary['unigram_entropy'])})" if "unigram_entropy" in summary else ""))
        if summary.get("rewinds"):
            print(f"training diverged and rewound {summary['rewinds']} time(s): see the rewind events in metrics.jsonl")
        if len(summary["val_loss_by_r"]) > 1:
            print("val loss by r: " + ", ".join(f"r={r}: {v:.4f}" for r, v in summary["val_loss_by_r"].items()))
        print(f"run directory: {run_dir}\n  config.yaml, metrics.jsonl, summary.json, checkpoints/ "
              f"(latest: {latest})")
    return 0


def _gap(loss: float, entropy: float) -> str:
    """'1.573 nats below it' for a model better than the unigram predictor, 'above' for a worse one."""
    return f"{abs(entropy - loss):.3f} nats {'below' if loss <= entropy else 'above'} it"


def cmd_eval(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="megaloop eval", description="Validation loss of a run (or an export "
                                 "folder) at several recurrence counts.")
    ap.add_argument("run_dir", help="a run directory or a `megaloop export` folder")
    ap.add_argument("--recur", default=None, help="comma-separated r values, e.g. 1,2,4,8 (default: the trained r)")
    ap.add_argument("--tokens", type=int, default=None, help="validation tokens to use (default train.eval_tokens)")
    from .inference.cli import add_eval_args, run_eval
    add_eval_args(ap)
    args = ap.parse_args(argv)
    from .errors import UserError
    from .evaluate import evaluate_run
    if args.tokens is not None and args.tokens < 1:
        raise UserError(f"--tokens must be a positive number of validation tokens, got {args.tokens}")
    recur = []
    if args.recur:
        try:
            recur = [int(r) for r in args.recur.split(",") if r]
        except ValueError:
            raise UserError(f"--recur expects comma-separated integers, got {args.recur!r}") from None
        if not recur or min(recur) < 1:
            raise UserError(f"--recur values must be >= 1, got {args.recur!r}")
    if not recur:
        from .config import load_config
        cfg_path = os.path.join(args.run_dir, "config.yaml")
        if not os.path.isfile(cfg_path):
            raise UserError(f"{args.run_dir} is not a run directory or an export folder (no config.yaml)")
        recur = [load_config(cfg_path).model.num_recur]
    if args.exit or args.tasks or args.thresholds or args.plot or args.max_recur:
        return run_eval(args, recur)
    evaluate_run(args.run_dir, recur, args.tokens)
    return 0


def cmd_params(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="megaloop params", description="Parameter counts and loop-aware FLOPs per token.")
    ap.add_argument("config")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--flops", type=float, default=None, help="a compute budget: print the tokens it buys")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from .accounting import count_params
    from .config import load_config
    cfg = load_config(args.config, args.overrides, raw={"train": {}})
    c = count_params(cfg.model)
    out = c.as_dict()
    budget = args.flops if args.flops is not None else cfg.train.target_flops
    depth = _depth_figures(cfg) if cfg.model.recur_sampling.sampled else None
    if budget:
        out["budget_flops"], out["budget_tokens"] = budget, c.tokens_for(budget)
    if depth:
        out.update(depth)
        if budget:  # a curriculum's shallow first steps buy extra tokens (one process: dp = 1)
            from .accounting import tokens_for_budget
            t = cfg.train
            out["budget_tokens"] = int(tokens_for_budget(cfg.model, budget, t.micro_batch_size * t.grad_accum
                                                         * cfg.model.seq_len))
    if args.json:
        print(json.dumps(out))
        return 0
    m = cfg.model
    print(f"looped model: d_model={m.d_model}, {m.n_prelude} prelude + {m.n_recur_block} x r={m.num_recur} "
          f"recurrent + {m.n_coda} coda blocks, injection={m.input_injection}, bptt_k={m.bptt_k}")
    rows = [("N_once (prelude + coda + outer norms)", c.n_once), ("N_rec (recurrent group + injection)", c.n_rec),
            ("  prelude", c.prelude), ("  recurrent group", c.recur_group), ("  coda", c.coda),
            ("  injection", c.injection), ("  outer norms", c.outer_norms),
            ("embedding (excluded)", c.embedding), ("LM head (excluded)", c.head), ("total", c.total),
            ("N_once + r N_rec (unrolled)", c.effective_compute_params)]
    for name, v in rows:
        print(f"  {name:<40} {v:>16,}")
    if depth:
        from .depth import describe
        print(f"  training depth: {describe(m)}")
        print("  P(r): " + "  ".join(f"{r}: {p:.3f}" for r, p in depth["r_pmf"].items() if p >= 5e-4))
        print(f"  {'FLOPs per token (training, E over r)':<40} {c.flops_per_token:>16,.0f}")
        from .accounting import flops_per_token
        print(f"  {'FLOPs per token at the evaluated r=%d' % m.num_recur:<40} {flops_per_token(m):>16,.0f}")
    else:
        print(f"  {'FLOPs per token (training)':<40} {c.flops_per_token:>16,.0f}")
    if budget:
        print(f"  {'tokens for %.3g FLOPs' % budget:<40} {out['budget_tokens']:>16,}")
    return 0


def _depth_figures(cfg) -> dict:
    """A sampled training depth's expected figures: E[r], range, P(r) and FLOPs per token by r."""
    from dataclasses import asdict

    from .accounting import flops_by_r
    from .depth import DepthSampler
    d = DepthSampler(cfg.model, cfg.train.seed)
    pmf, per_r = d.pmf(), flops_by_r(cfg.model)
    rs = range(d.min_r, d.max_r + 1)
    return {"recur_sampling": asdict(cfg.model.recur_sampling), "r_expected": d.expected_r(),
            "r_min": d.min_r, "r_max": d.max_r, "r_pmf": {str(r): float(pmf[r]) for r in rs},
            "flops_per_token_by_r": {str(r): float(per_r[r]) for r in rs}}


def _delegate(module: str, func: str) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        return getattr(__import__(module, fromlist=[func]), func)(argv)
    return run


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "train": cmd_train,
    "eval": cmd_eval,
    "params": cmd_params,
    "tokenizer": _delegate("megaloop.data.cli", "tokenizer_main"),
    "preprocess": _delegate("megaloop.data.cli", "preprocess_main"),
    "fit": _delegate("megaloop.analysis.cli", "fit_main"),
    "capacity": _delegate("megaloop.analysis.cli", "capacity_main"),
    "sweep": _delegate("megaloop.sweep.cli", "sweep_main"),
    "export": _delegate("megaloop.export", "export_main"),
    "generate": _delegate("megaloop.commands.generate", "generate_main"),
    "checkpoint": _delegate("megaloop.commands.checkpoint", "checkpoint_main"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"megaloop: unknown command '{cmd}'.\n\n{USAGE}", file=sys.stderr)
        return 2
    from .errors import UserError  # every command's user mistakes (data, fit input, ...) derive from it
    try:
        return int(COMMANDS[cmd](rest) or 0)
    except UserError as e:
        print(f"megaloop {cmd}: error: {' '.join(str(e).split())}", file=sys.stderr)  # always one line
        return getattr(e, "exit_status", 2)  # e.g. another rank's failure keeps that rank's status
    except KeyboardInterrupt:
        print(f"megaloop {cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
