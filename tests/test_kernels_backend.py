"""The kernel backend a run's config names (`kernels:`) is the one its model runs, in every path
that builds a model: train, eval, generate (the model's own and the cached decoder) and export
(the export folder's loader).

The tests record the backend handed to every kernel call (KernelBackend.use_triton, wrapped: the
real decision still runs). The run is configured with `kernels: torch`, not the default `auto`, so
a path that built its model without the config's value would record 'auto' and fail.
"""
import os

import pytest
import torch
import yaml

from conftest import tiny_raw
from megaloop.cli import main
from megaloop.kernels import KernelBackend
from megaloop.pretrained import load_pretrained

CONFIGURED = "torch"


def record_into(names: list, monkeypatch) -> list:
    """From now on (until monkeypatch undoes it) every kernel call appends its backend's name."""
    decide = KernelBackend.use_triton

    def recording(self, tensor):
        names.append(self.name)
        return decide(self, tensor)

    monkeypatch.setattr(KernelBackend, "use_triton", recording)
    return names


@pytest.fixture
def backends_used(monkeypatch):
    """The names of the backends the kernel calls were given, in order."""
    return record_into([], monkeypatch)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_corpus, data_cache):
    root = tmp_path_factory.mktemp("backend")
    raw = tiny_raw(tiny_corpus, data_cache, str(root / "run"), steps=2, compile=False)
    raw["kernels"] = CONFIGURED
    (root / "c.yaml").write_text(yaml.safe_dump(raw))
    return root


def _only_configured(names):
    assert names, "no kernel call was recorded"
    assert set(names) == {CONFIGURED}, f"kernel calls ran with {sorted(set(names))}, configured {CONFIGURED!r}"


@pytest.fixture(scope="module")
def trained(run):
    """The run trained once (module scope: its recording is the train test's)."""
    with pytest.MonkeyPatch.context() as mp:
        recorded = record_into([], mp)
        assert main(["train", str(run / "c.yaml")]) == 0
    return run, recorded


def test_train_uses_the_configured_backend(trained):
    """Contract: every kernel call of `megaloop train` (steps and evaluations) gets the backend
    that cfg.kernels names."""
    _only_configured(trained[1])


def test_eval_uses_the_configured_backend(trained, backends_used):
    """Contract: `megaloop eval` on the run builds its model with the run's config.yaml `kernels`."""
    assert main(["eval", str(trained[0] / "run"), "--recur", "1"]) == 0
    _only_configured(backends_used)


def test_generate_uses_the_configured_backend(trained, backends_used, capsys):
    """Contract: the loaded model carries the configured backend; its own (uncached) generate and
    `megaloop generate` (the cached decoder of megaloop.inference) run with it."""
    model, cfg, _ = load_pretrained(str(trained[0] / "run"))
    assert model.kernels == KernelBackend(CONFIGURED) == KernelBackend(cfg.kernels)
    model.generate(torch.zeros(1, 3, dtype=torch.long), 2)
    _only_configured(backends_used)
    backends_used.clear()
    assert main(["generate", str(trained[0] / "run"), "--prompt", "The king", "--max-new-tokens", "3"]) == 0
    _only_configured(backends_used)


def test_export_keeps_the_configured_backend(trained, backends_used):
    """Contract: an export folder keeps the run's `kernels` value, and the model loaded from it
    (eval, generate and the HF export read exports through the same loader) runs with it."""
    out = trained[0] / "export"
    assert main(["export", str(trained[0] / "run"), "--out", str(out)]) == 0
    assert yaml.safe_load(open(os.path.join(out, "config.yaml")))["kernels"] == CONFIGURED
    model, _, _ = load_pretrained(str(out))
    assert model.kernels == KernelBackend(CONFIGURED)
    idx = torch.zeros(1, 4, dtype=torch.long)
    model(idx, idx)
    _only_configured(backends_used)
