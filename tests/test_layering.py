"""Layers point one way, and no module imports itself back in a circle.

Contract: every module of the package (megaloop/, kernels/ as megaloop.kernels, analysis/ as
megaloop.analysis) belongs to one layer of LAYERS, and imports (at the top or inside a function:
checked on the source with ast, so a lazy import counts too) only modules of its own layer or of
a layer that ALLOWED lists for it. The import graph between modules has no cycle. A failure names
every offending import, or every cycle, module by module.

The layers, from the bottom: errors/config -> kernels -> model -> parallel -> loop -> commands.
Beside them: data (below the loop, needing only errors/config), inference (decoding and its
evaluations, on top of the model and the loader of trained runs), and sweep and analysis on their
side (a sweep plans and collects runs; an analysis reads what sweeps and runs leave).
"""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# where each package's source lives (setup.py's package_dir)
SOURCES = {"megaloop": "megaloop", "megaloop.kernels": "kernels", "megaloop.analysis": "analysis"}

# layer -> module prefixes; the longest matching prefix decides (so a package's command module can
# sit in `commands` while the rest of the package sits lower)
LAYERS = {
    "errors/config": ("megaloop.errors", "megaloop.config", "megaloop.param_names"),
    "kernels": ("megaloop.kernels",),
    "model": ("megaloop.model", "megaloop.accounting", "megaloop.depth", "megaloop.mfu", "megaloop.optim",
              "megaloop.fp8"),
    "parallel": ("megaloop.parallel",),
    "data": ("megaloop.data",),
    "loop": ("megaloop.train", "megaloop.checkpoint", "megaloop.run_lock", "megaloop.divergence", "megaloop.faults",
             "megaloop.observe", "megaloop.convert", "megaloop.pretrained", "megaloop.evaluate", "megaloop.hooks"),
    "inference": ("megaloop.inference",),
    "sweep": ("megaloop.sweep",),
    "analysis": ("megaloop.analysis",),
    "commands": ("megaloop.cli", "megaloop.export", "megaloop.commands", "megaloop.inference.cli", "megaloop.sweep.suggest",
                 "megaloop.data.cli", "megaloop.sweep.cli", "megaloop.analysis.cli"),
}
# layer -> the other layers it may import
ALLOWED = {
    "errors/config": set(),
    "kernels": {"errors/config"},
    "model": {"errors/config", "kernels"},
    "parallel": {"errors/config", "kernels", "model"},
    "data": {"errors/config"},
    "loop": {"errors/config", "kernels", "model", "parallel", "data"},
    "inference": {"errors/config", "kernels", "model", "data", "loop"},
    "sweep": {"errors/config", "model", "loop"},
    "analysis": {"errors/config", "model", "data", "loop", "sweep"},
    "commands": {"errors/config", "kernels", "model", "parallel", "data", "loop", "inference", "sweep", "analysis"},
}


def package_modules() -> dict[str, str]:
    """{module name: file} of every module of the package."""
    out = {}
    for package, folder in SOURCES.items():
        base = os.path.join(ROOT, folder)
        for d, _, files in os.walk(base):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(d, f), base)[:-3].split(os.sep)
                    name = ".".join([package] + [p for p in rel if p != "__init__"])
                    out[name] = os.path.join(d, f)
    return out


def imported_modules(path: str, package: str) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved against `package`)."""
    out = set()
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[:len(base) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}  # `from .. import train` imports a module
    return out


def import_graph(modules: dict[str, str]) -> dict[str, set[str]]:
    """{module: the package modules it imports}; a name is resolved to its longest known module
    (`from .config import Config` -> megaloop.config), and a package's own __init__ is left out
    of its children's imports (importing a submodule runs it: that is no dependency)."""
    def resolve(name: str):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None
    graph = {}
    for mod, path in modules.items():
        package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
        targets = {resolve(n) for n in imported_modules(path, package)}
        graph[mod] = {t for t in targets if t and t != mod and not mod.startswith(t + ".")}
    return graph


def layer_of(module: str) -> str:
    if module == "megaloop":  # the empty top package
        return "errors/config"
    best = max(((p, layer) for layer, prefixes in LAYERS.items() for p in prefixes
                if module == p or module.startswith(p + ".")), key=lambda t: len(t[0]), default=(None, None))
    assert best[1] is not None, f"{module} is in no layer: add it to LAYERS in tests/test_layering.py"
    return best[1]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod in sorted(graph):
        a = layer_of(mod)
        for t in sorted(graph[mod]):
            b = layer_of(t)
            if b != a and b not in ALLOWED[a]:
                bad.append(f"{mod} ({a}) imports {t} ({b})")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_every_import_points_down_the_layers():
    bad = upward_imports(import_graph(package_modules()))
    assert not bad, "imports against the layers (tests/test_layering.py: LAYERS, ALLOWED):\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = import_graph(package_modules())
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_check_sees_relative_and_lazy_imports(tmp_path):
    """The checker itself: a lazy `from ..train import x` inside a function is found."""
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from ..train import build_model\n    from .. import faults\n")
    mods = imported_modules(str(f), "megaloop.parallel")
    assert "megaloop.train" in mods and "megaloop.faults" in mods


def test_the_check_names_an_upward_import_and_a_cycle():
    """The checker itself: the model importing inference (the circle this test was extended for)
    is named both as an upward import and as a cycle; an allowed downward import is not."""
    graph = {"megaloop.model": {"megaloop.inference.generate", "megaloop.kernels"},
             "megaloop.inference.generate": {"megaloop.model"}, "megaloop.kernels": set()}
    assert upward_imports(graph) == ["megaloop.model (model) imports megaloop.inference.generate (inference)"]
    assert cycles(graph) == [["megaloop.inference.generate", "megaloop.model"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
