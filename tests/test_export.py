"""Export to safetensors, and eval / generate on both a run directory and an export folder."""
import json
import os

import pytest
import torch
import yaml

from conftest import tiny_raw
from megaloop import checkpoint as ckpt
from megaloop.cli import main
from megaloop.pretrained import load_pretrained
from megaloop.parallel.dcp_state import read_weights


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_corpus, data_cache):
    root = tmp_path_factory.mktemp("exp")
    raw = tiny_raw(tiny_corpus, data_cache, str(root / "run"), steps=3)
    (root / "c.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", str(root / "c.yaml")]) == 0
    return root


def test_export_roundtrip_and_plain_load(run):
    """Contract: the exported safetensors hold exactly the latest checkpoint's weights, and a
    plain single-process model built from the exported config loads them."""
    out = run / "export"
    assert main(["export", str(run / "run"), "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["config.yaml", "model.safetensors", "tokenizer.model"]
    model, cfg, tok = load_pretrained(str(out))
    ref = read_weights(ckpt.latest_path(str(run / "run")))
    sd = model.state_dict()
    assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    assert tok and os.path.isfile(tok)
    assert main(["export", str(run / "run"), "--out", str(out)]) == 2  # refuses to overwrite
    before = open(run / "run" / "summary.json").read()
    assert main(["eval", str(out), "--recur", "2"]) == 0  # eval works on the export folder too
    assert not (out / "summary.json").exists() and open(run / "run" / "summary.json").read() == before


def test_eval_on_run_and_generate(run, capsys):
    """Contract: eval at several r writes val_loss_by_r into summary.json (values equal to a
    direct evaluation); generate is deterministic when greedy and honours --recur."""
    assert main(["eval", str(run / "run"), "--recur", "1,3"]) == 0
    by_r = json.load(open(run / "run" / "summary.json"))["val_loss_by_r"]
    assert {"1", "2", "3"} <= set(by_r) and by_r["1"] != by_r["3"]
    from megaloop.data.loader import eval_batches
    from megaloop.data.prepare import ensure_prepared
    model, cfg, _ = load_pretrained(str(run / "run"))
    valid = ensure_prepared(cfg.data, cfg.model.vocab_size, log=lambda *a: None).valid
    tot = n = 0
    with torch.no_grad():
        for x, y in eval_batches(valid, cfg.model.seq_len, cfg.train.micro_batch_size, cfg.train.eval_tokens):
            tot += float(model(x, y, num_recur=3)) * y.numel()
            n += y.numel()
    assert by_r["3"] == pytest.approx(tot / n, rel=1e-6)
    capsys.readouterr()
    assert main(["generate", str(run / "run"), "--prompt", "The king", "--max-new-tokens", "8"]) == 0
    a = capsys.readouterr().out
    assert main(["generate", str(run / "run"), "--prompt", "The king", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == a and a.startswith("The king")


def test_generate_honours_recur(run, capsys):
    """Contract: `megaloop generate --recur R` decodes at R recurrences: its greedy text is the
    plain (uncached) LoopedLM.generate's at R, and its KV cache holds a slot of the recurrent group
    for each of the R recurrences (prelude + R x group + coda layers, as it reports on stderr)."""
    from megaloop.data.tokenizer import Tokenizer
    model, cfg, _ = load_pretrained(str(run / "run"))
    from megaloop.pretrained import tokenizer_path
    tok = Tokenizer(tokenizer_path(cfg))
    prompt = torch.tensor([tok.encode("The king")])
    m = cfg.model
    for r in (1, 3):
        ref = "The king" + tok.decode(model.generate(prompt, 12, num_recur=r)[0, prompt.size(1):].tolist())
        capsys.readouterr()
        assert main(["generate", str(run / "run"), "--prompt", "The king", "--max-new-tokens", "12", "--recur", str(r)]) == 0
        out = capsys.readouterr()
        assert out.out == ref + "\n", (r, out.out, ref)
        layers = m.n_prelude + r * m.n_recur_block + m.n_coda
        assert f"({layers} layers = prelude + {r} slots x recurrent group + coda" in out.err, out.err
