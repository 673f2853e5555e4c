"""The kernel backend a run's config names (`kernels:`) is the one its model runs, in every path
that builds a model: train, eval, generate (the model's own and the cached decoder) and export
(the export folder's loader).

The tests record the backend handed to every kernel call (KernelBackend.use_triton, wrapped: the
real decision still runs). The run is configured with `kernels: torch`, not the default `auto`, so
a path that built its model without the config's value would record 'auto' and fail. Last, its
export, switched to `kernels: triton`, is evaluated: every kernel call then runs Triton (under the
interpreter on CPU).
"""
import shutil
import os

import pytest
import torch
import yaml

from conftest import tiny_raw
from megaloop.cli import main
from megaloop.kernels import KernelBackend
from megaloop.pretrained import load_pretrained

CONFIGURED = "torch"


def record_into(calls: list, monkeypatch) -> list:
    """From now on (until monkeypatch undoes it) every kernel call appends (its backend's name,
    whether it ran Triton)."""
    decide = KernelBackend.use_triton

    def recording(self, tensor):
        calls.append((self.name, decide(self, tensor)))
        return calls[-1][1]

    monkeypatch.setattr(KernelBackend, "use_triton", recording)
    return calls


@pytest.fixture
def backends_used(monkeypatch):
    """(backend name, Triton or not) of every kernel call, in order."""
    return record_into([], monkeypatch)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_corpus, data_cache):
    root = tmp_path_factory.mktemp("backend")
    raw = tiny_raw(tiny_corpus, data_cache, str(root / "run"), steps=2, compile=False)
    raw["kernels"] = CONFIGURED
    (root / "c.yaml").write_text(yaml.safe_dump(raw))
    return root


def _only_configured(calls, configured=CONFIGURED):
    assert calls, "no kernel call was recorded"
    names = {name for name, _ in calls}
    assert names == {configured}, f"kernel calls ran with {sorted(names)}, configured {configured!r}"
    if configured == "torch":
        assert not any(ran for _, ran in calls), "a kernel call ran Triton under kernels: torch"


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


def test_a_switched_config_switches_the_implementation(trained, backends_used):
    """Contract: the same weights with `kernels: triton` in their config.yaml run every kernel call
    of `megaloop eval` through Triton (the torch run above ran none)."""
    pytest.importorskip("triton")
    src, out = trained[0] / "export", trained[0] / "export_triton"
    if not src.exists():
        assert main(["export", str(trained[0] / "run"), "--out", str(src)]) == 0
    shutil.copytree(src, out)
    cfg = yaml.safe_load(open(out / "config.yaml"))
    cfg["kernels"] = "triton"
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["eval", str(out), "--recur", "1"]) == 0
    _only_configured(backends_used, "triton")
    assert all(ran for _, ran in backends_used)
