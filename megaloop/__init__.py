"""megaloop: pretraining and measurement of looped (depth-recurrent) language models."""
import os as _os
import sys as _sys


def _unshadow_repo_root() -> None:
    """The repository's top-level kernels/ and analysis/ folders are installed as megaloop.kernels
    and megaloop.analysis. `python -m ...` started in the repository root puts that root (as '' or
    its path) on sys.path, where those folders would shadow the unrelated PyPI packages `kernels`
    (which transformers imports) and `analysis`. megaloop itself is found through its install, so
    the root is taken off the path."""
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    if not _os.path.isfile(_os.path.join(root, "kernels", "__init__.py")):
        return  # an installed copy, not a checkout: nothing shadows anything
    cwd = _os.getcwd()
    _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or cwd) != root]
    for name in ("kernels", "analysis"):  # imported from the root already: forget that module
        mod = _sys.modules.get(name)
        if mod is not None and _os.path.dirname(_os.path.dirname(getattr(mod, "__file__", "") or "")) == root:
            del _sys.modules[name]


_unshadow_repo_root()
