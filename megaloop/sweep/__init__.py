"""Sweeps: plan an iso-depth grid into run configs, run it locally or on SLURM, collect the fit table."""
from .plan import PlannedRun, expand, read_manifest, write_plan
from .spec import SweepSpec, load_sweep, parse_sweep

__all__ = ["PlannedRun", "SweepSpec", "expand", "load_sweep", "parse_sweep", "read_manifest", "write_plan"]
