"""Inference from the command line: generate with cache and exit, eval --exit, Hugging Face
export, lm-eval tasks, and one clear error for each bad input."""
import json
import os

import pytest
import torch
import yaml

from conftest import tiny_raw
from megaloop.cli import main
from megaloop.pretrained import load_pretrained


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_corpus, data_cache):
    """A tiny trained run (hyperconnect, GQA), its weights then perturbed off the init so that
    every lane parameter matters, saved back as an export folder `model`."""
    root = tmp_path_factory.mktemp("inf")
    raw = tiny_raw(tiny_corpus, data_cache, str(root / "run"), steps=2)
    raw["model"].update(input_injection="hyperconnect", n_kv_head=1, num_recur=3)
    (root / "c.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", str(root / "c.yaml")]) == 0
    assert main(["export", str(root / "run"), "--out", str(root / "model")]) == 0
    model, _, _ = load_pretrained(str(root / "model"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "model" / "model.safetensors"))
    return root


def err(capsys):
    e = capsys.readouterr().err.strip().splitlines()
    return e[-1] if e else ""


@pytest.mark.parametrize("argv,needle", [
    (["--kv-budget", "0"], "--kv-budget must be between 1 and 3"),
    (["--kv-budget", "4"], "--kv-budget must be between 1 and 3"),
    (["--exit", "wobble:0.1"], "unknown exit criterion 'wobble'"),
    (["--exit", "kl:abc"], "is not a number"),
    (["--exit", "kl"], "has no threshold"),
])
def test_generate_bad_input(run, capsys, argv, needle):
    """Contract: a kv budget outside 1..r, an unknown criterion or a non-numeric threshold is one
    clear line on stderr and exit status 2."""
    assert main(["generate", str(run / "model"), "--max-new-tokens", "2", *argv]) == 2
    e = capsys.readouterr().err.strip().splitlines()
    assert len(e) == 1 and needle in e[0] and "Traceback" not in e[0]


def test_bad_export_format_and_eval_exit_input(run, capsys):
    """Contract: an unknown export format and a bad --exit / --thresholds of eval are one clear
    line each, status 2, and nothing is written."""
    out = run / "never"
    assert main(["export", str(run / "model"), "--format", "onnx", "--out", str(out)]) == 2
    assert "unknown export format 'onnx'" in err(capsys) and not out.exists()
    assert main(["eval", str(run / "model"), "--exit", "kl", "--thresholds", "0.1,x"]) == 2
    assert "is not a number" in err(capsys)
    assert main(["eval", str(run / "model"), "--exit", "nope:1"]) == 2
    assert "unknown exit criterion" in err(capsys)


def test_generate_with_cache_budget_and_exit(run, capsys):
    """Contract: generate with --kv-budget / --exit / --max-recur prints the text, the cache's
    memory and the mean recurrences used; the greedy text with the exact cache equals --no-cache."""
    path = str(run / "model")
    assert main(["generate", path, "--prompt", "The king", "--max-new-tokens", "12"]) == 0
    cached = capsys.readouterr()
    assert "kv cache:" in cached.err and "MiB" in cached.err
    assert main(["generate", path, "--prompt", "The king", "--max-new-tokens", "12", "--no-cache"]) == 0
    assert capsys.readouterr().out == cached.out
    assert main(["generate", path, "--prompt", "The king", "--max-new-tokens", "12", "--kv-budget", "1",
                 "--exit", "kl:0.01", "--max-recur", "6"]) == 0
    res = capsys.readouterr()
    assert res.out.startswith("The king") and "mean recurrences" in res.err and "of 6" in res.err


def test_eval_exit_sweep_and_plot(run, capsys):
    """Contract: eval --exit reports val loss and mean recurrences per threshold; a threshold no
    token reaches gives the full forward's loss at max_recur (teacher-forced cached decoding is
    exact); the JSON lands beside the model and the plot is written."""
    path, plot = str(run / "model"), str(run / "exit.png")
    assert main(["eval", path, "--exit", "latent", "--thresholds", "0,0.5", "--max-recur", "4",
                 "--tokens", "64", "--plot", plot]) == 0
    res = json.load(open(run / "model" / "exit_eval.json"))
    never, loose = res["exit"]
    assert never["mean_recurrences"] == 4 and loose["mean_recurrences"] < 4
    assert never["val_loss"] == pytest.approx(res["fixed_depth"]["4"], abs=1e-5)
    assert os.path.getsize(plot) > 1000
    assert "mean_recur" in capsys.readouterr().out


def test_hf_export_loads_in_transformers(run, capsys):
    """Contract: export --format hf writes a folder AutoModelForCausalLM loads with
    trust_remote_code; its fp32 logits equal megaloop's to 1e-5 at the trained r and at a
    num_recur set at load time; model.generate equals megaloop's greedy tokens; the tokenizer
    round-trips; a non-empty --out is refused without --force, and --force never touches the source."""
    transformers = pytest.importorskip("transformers")
    src, out = run / "model", run / "hf"
    assert main(["export", str(src), "--format", "hf", "--out", str(out)]) == 0
    for f in ("config.json", "model.safetensors", "modeling_megaloop.py", "tokenizer.model", "tokenizer_config.json"):
        assert (out / f).is_file()
    ref, _, tok_path = load_pretrained(str(src))
    ids = torch.randint(0, ref.cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    for r in (None, 5):
        kw = {} if r is None else {"num_recur": r}
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, **kw).eval()
        with torch.no_grad():
            got, want = hf(ids).logits, ref(ids, num_recur=r)
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (r, (got - want).abs().max())
    gen = hf.generate(ids[:1, :6], max_new_tokens=8, do_sample=False)
    assert gen[0].tolist() == ref.generate(ids[:1, :6], 8, num_recur=5)[0].tolist()
    tok = transformers.AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    from megaloop.data.tokenizer import Tokenizer
    text = "The king,  sweet\nlady ▁ honour!"
    assert tok(text).input_ids == Tokenizer(tok_path).encode(text) and tok.decode(tok(text).input_ids) == text
    capsys.readouterr()
    assert main(["export", str(src), "--format", "hf", "--out", str(out)]) == 2
    assert "not empty" in err(capsys)
    before = sorted(os.listdir(src))
    assert main(["export", str(src), "--format", "hf", "--out", str(src), "--force"]) == 2
    assert "would destroy the source" in err(capsys) and sorted(os.listdir(src)) == before
    assert main(["export", str(src), "--format", "hf", "--out", str(out), "--force"]) == 0


@pytest.mark.slow
def test_lm_eval_offline_task_end_to_end(run, capsys, monkeypatch):
    """Contract: eval --tasks runs lm-evaluation-harness on the bundled offline task at each r,
    prints one table and writes lm_eval.json; accuracies are real fractions of the examples and
    the scores depend on r (the model really ran at each depth)."""
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    path = str(run / "model")
    assert main(["eval", path, "--tasks", "corpus_next_line", "--recur", "1,3", "--limit", "12"]) == 0
    out = capsys.readouterr().out
    assert "corpus_next_line" in out and "r=1" in out and "r=3" in out
    res = json.load(open(run / "model" / "lm_eval.json"))
    for r in ("1", "3"):
        m = res["results"][r]["corpus_next_line"]
        assert 0 <= m["acc"] <= 1 and round(m["acc"] * 12) == pytest.approx(m["acc"] * 12)
    from megaloop.inference.harness import MegaloopLM
    from megaloop.data.tokenizer import Tokenizer
    model, _, tok_path = load_pretrained(path)
    lm1, lm3 = MegaloopLM(model, Tokenizer(tok_path), 1), MegaloopLM(model, Tokenizer(tok_path), 3)
    pair = [lm1._pair("The king", " and the queen")]
    ll1, ll3 = lm1._score(pair)[0][0], lm3._score(pair)[0][0]
    ids = lm1._pair("The king", " and the queen")
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[0] + ids[1]])[:, :-1], num_recur=3), -1)[0]
    n = len(ids[1])
    want = sum(float(logp[len(ids[0]) - 1 + i, t]) for i, t in enumerate(ids[1]))
    assert ll3 == pytest.approx(want, abs=1e-4) and ll1 != pytest.approx(ll3, abs=1e-6) and n > 0
    assert main(["eval", path, "--tasks", "no_such_task_xyz"]) == 2
    assert "unknown lm-eval task" in err(capsys)
