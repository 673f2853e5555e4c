"""Budget branching (`branching: true` in a sweep file, with optim.schedule: wsd).

Under warmup-stable-decay the learning rate of a run is the peak until its last decay_frac of
steps (megaloop/optim.py). So the runs of one group (variant, size, r, seed), which differ only in
their budget, share every step before their own decay starts. The group's largest planned run is
the trunk: it trains from scratch and keeps a checkpoint (train.save_at, RUN_DIR/branch_points) at
the decay start of every smaller grid budget of its size. Every smaller run is a branch: its run
directory is seeded with the trunk's checkpoint at its own decay start, and `megaloop train
--resume` decays it to its own token count. A branch is a run like any other (its own directory,
summary row, tokens and FLOPs of a straight run to its budget); only the FLOPs spent differ:
the trunk spends its whole budget, a branch only its decay (`spent_flops` in the manifest).

Trunks save the branch points of every smaller grid budget, planned or not, so a run appended
later (`megaloop sweep suggest --out` then `sweep plan --append`) below an existing trunk of its
group branches from it too. A run above every run of its group is a new trunk (trunks are not
extended).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

from .. import checkpoint as ckpt
from ..accounting import tokens_for_budget
from ..config import ConfigError
from ..optim import decay_start

BRANCH_COLUMNS = ("branch_from", "branch_step", "spent_flops")


def group_key(run) -> tuple:
    get = (lambda k: run[k]) if isinstance(run, dict) else (lambda k: getattr(run, k))
    return (get("variant"), int(get("size")), int(get("r")), get("seed"))


def branch_step(cfg, steps: int) -> int:
    """The step a run of `steps` steps starts decaying at: where its branch leaves the trunk."""
    return max(cfg.optim.warmup_steps, decay_start(steps, cfg.optim.decay_frac))


def steps_for(run, flops: float) -> int:
    """Steps of the run's model at another budget (same formula as the plan)."""
    cfg = run.cfg
    if cfg.model.recur_sampling.sampled:
        tokens = int(tokens_for_budget(cfg.model, flops, run.tokens_per_step))
    else:
        tokens = int(flops // run.flops_per_token)
    return tokens // run.tokens_per_step


def assign(spec, runs: list, old_rows: Optional[list[dict]] = None) -> None:
    """Mark trunks and branches on the planned runs (in place): a branch gets branch_from and
    branch_step, a trunk train.save_at; every run its spent_flops. `old_rows`: the manifest rows a
    plan --append adds to, whose trunks new runs may branch from."""
    for run in runs:
        if run.cfg.optim.schedule != "wsd":
            raise ConfigError(f"run {run.run}: branching needs optim.schedule: wsd (got {run.cfg.optim.schedule})")
    old_trunks: dict = {}
    for row in old_rows or []:
        if row.get("save_at_steps"):
            old_trunks.setdefault(group_key(row), []).append(row)
    groups: dict = {}
    for run in runs:
        groups.setdefault(group_key(run), []).append(run)
    budgets = {b.flops: b for b in spec.grid.budgets}
    for key, members in groups.items():
        members.sort(key=lambda r: r.steps)
        trunk = members[-1]
        old = max(old_trunks.get(key, []), key=lambda r: int(r["steps"]), default=None)
        if old is not None and int(old["steps"]) > trunk.steps:
            source, source_steps = old["run"], int(old["steps"])
            saved = {int(s) for s in str(old["save_at_steps"]).split(";") if s}
            branches = members
        else:
            source, source_steps, saved, branches = trunk.run, trunk.steps, None, members[:-1]
            # the branch points of every smaller grid budget of this size, planned now or not
            points = {branch_step(trunk.cfg, steps_for(trunk, f)) for f, b in budgets.items()
                      if trunk.size in b.sizes and f < trunk.target_flops}
            points = sorted(p for p in points if 0 < p < trunk.steps)
            trunk.cfg.train.save_at = points
            trunk.save_at_steps = ";".join(str(p) for p in points)
            trunk.spent_flops = float(trunk.target_flops)
        for run in branches:
            step = branch_step(run.cfg, run.steps)
            if run.steps >= source_steps or step <= 0 or (saved is not None and step not in saved):
                run.spent_flops = float(run.target_flops)   # trains from scratch
                continue
            run.branch_from, run.branch_step = source, step
            run.spent_flops = float(run.target_flops) * (run.steps - step) / run.steps


def branch_point(sweep_dir: str, row: dict) -> str:
    return os.path.join(ckpt.ckpt_root(ckpt.branch_points(os.path.join(sweep_dir, "runs", row["branch_from"]))),
                        ckpt.step_dir_name(int(row["branch_step"])))


def is_branch(row: dict) -> bool:
    return bool(row.get("branch_from"))


def seed(sweep_dir: str, row: dict) -> str:
    """Give a branch its trunk's checkpoint as its own first checkpoint, so `train --resume` goes on
    from there. Returns 'seeded', 'started' (it has a checkpoint or a summary already: nothing to
    do) or 'waiting' (the trunk has not reached the branch point yet)."""
    run_dir = os.path.join(sweep_dir, "runs", row["run"])
    if os.path.isfile(os.path.join(run_dir, "summary.json")) or ckpt.list_complete(run_dir):
        return "started"
    src = branch_point(sweep_dir, row)
    if not os.path.isfile(os.path.join(src, ckpt.META)):
        return "waiting"
    step = int(row["branch_step"])
    root = ckpt.ckpt_root(run_dir)
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".tmp_seed{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    final = os.path.join(root, ckpt.step_dir_name(step))
    if os.path.exists(final):  # another process seeded it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, final)
    # the trunk's record of the shared steps, so the branch's metrics.jsonl covers its whole run
    trunk_metrics = os.path.join(sweep_dir, "runs", row["branch_from"], "metrics.jsonl")
    if os.path.isfile(trunk_metrics):
        with open(trunk_metrics) as f:
            keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
        ckpt.write_atomic(os.path.join(run_dir, "metrics.jsonl"), "".join(keep).encode())
    ckpt.write_atomic(os.path.join(root, "latest"), ckpt.step_dir_name(step).encode())
    return "seeded"


def spent_report(rows: list[dict]) -> dict:
    """FLOPs the sweep spends (trunks whole, branches their decay) against the same grid unbranched."""
    grid = sum(float(r["target_flops"]) for r in rows)
    spent = sum(float(r.get("spent_flops") or r["target_flops"]) for r in rows)
    return {"runs": len(rows), "branches": sum(1 for r in rows if is_branch(r)), "flops_unbranched": grid,
            "flops_spent": spent, "ratio": spent / grid if grid else None}
