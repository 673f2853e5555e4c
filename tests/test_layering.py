"""Layers point one way: the training loop uses the engines, the engines never import the loop.

Contract: no module of megaloop.parallel imports (at the top or inside a function) a module of
the layers above it: the training loop and its helpers (train, checkpoint, run_lock, divergence, faults,
observe, the data loader and preparation), the commands (cli, export, eval / inference, sweep)
or analysis. The engine interface (Engine, StepStats) is defined in megaloop.parallel, and the
loop reaches the engines only through it. Checked on the source (ast), so a lazy import inside a
function counts too.
"""
from __future__ import annotations

import ast
import os

import megaloop.parallel

PARALLEL = os.path.dirname(megaloop.parallel.__file__)
ABOVE = ("megaloop.train", "megaloop.checkpoint", "megaloop.run_lock", "megaloop.divergence", "megaloop.faults", "megaloop.observe",
         "megaloop.data.loader", "megaloop.data.prepare", "megaloop.data.preprocess", "megaloop.data.cli",
         "megaloop.cli", "megaloop.export", "megaloop.inference", "megaloop.sweep", "megaloop.analysis",
         "megaloop.engine")


def imported_modules(path: str, package: str) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved against `package`)."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[:len(base) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}  # `from .. import train` imports a module
    return out


def test_engines_import_nothing_above_them():
    bad = []
    for name in sorted(os.listdir(PARALLEL)):
        if name.endswith(".py"):
            mods = imported_modules(os.path.join(PARALLEL, name), "megaloop.parallel")
            bad += [f"megaloop/parallel/{name} imports {m}" for m in sorted(mods)
                    if any(m == a or m.startswith(a + ".") for a in ABOVE)]
    assert not bad, "\n".join(bad)


def test_the_check_sees_relative_and_lazy_imports(tmp_path):
    """The checker itself: a lazy `from ..train import x` inside a function is found."""
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from ..train import build_model\n    from .. import faults\n")
    mods = imported_modules(str(f), "megaloop.parallel")
    assert "megaloop.train" in mods and "megaloop.faults" in mods
