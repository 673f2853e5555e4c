"""`megaloop export RUN --format hf --out DIR`: a folder that Hugging Face transformers loads.

    DIR/config.json                 MegaloopConfig (model_type megaloop, auto_map to the code below)
    DIR/model.safetensors           the weights, under megaloop's parameter names
    DIR/configuration_megaloop.py   the modeling code (megaloop.inference.hf_modeling), which
    DIR/modeling_megaloop.py        needs torch + transformers only
    DIR/tokenization_megaloop.py    the lossless sentencepiece tokenizer, and its
    DIR/tokenizer.model, tokenizer_config.json, special_tokens_map.json
    DIR/generation_config.json
    DIR/config.yaml                 megaloop's own config, so megaloop eval/generate read DIR too

    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True, num_recur=8)
    tok = AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)

The folder is written beside DIR and renamed into place (megaloop.checkpoint.atomic_output_dir).
"""
from __future__ import annotations

import json
import os
import shutil

from .. import checkpoint as ckpt

CODE_FILES = ("configuration_megaloop.py", "modeling_megaloop.py", "tokenization_megaloop.py")
CODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_modeling")


def hf_config(cfg, tok) -> dict:
    m = cfg.model
    # trained_num_recur sizes hyperconnect's per-recurrence parameters: the deepest training draw
    return {
        "architectures": ["MegaloopForCausalLM"], "model_type": "megaloop",
        "auto_map": {"AutoConfig": "configuration_megaloop.MegaloopConfig",
                     "AutoModelForCausalLM": "modeling_megaloop.MegaloopForCausalLM"},
        "d_model": m.d_model, "n_head": m.n_head, "n_kv_head": m.kv_heads, "head_dim": m.hdim,
        "vocab_size": m.vocab_size, "seq_len": m.seq_len, "n_prelude": m.n_prelude,
        "n_recur_block": m.n_recur_block, "n_coda": m.n_coda, "num_recur": m.num_recur,
        "trained_num_recur": m.max_recur, "input_injection": m.input_injection, "num_lanes": m.num_lanes,
        "logit_softcap": m.logit_softcap, "mlp_ratio": m.mlp_ratio, "norm_eps": m.norm_eps,
        "rope_base": m.rope_base, "eos_token_id": tok.eos_id, "pad_token_id": tok.eos_id,
        "dtype": "float32", "use_cache": False, "tie_word_embeddings": False,
    }


def export_hf(path: str, out: str, force: bool = False) -> str:
    """Write the transformers folder for a run directory or export folder `path`."""
    from safetensors.torch import save_file

    from ..data.tokenizer import Tokenizer
    from ..pretrained import load_pretrained, tokenizer_path

    ckpt.check_out_dir(out, [path], force)  # never onto, around or into the source
    model, cfg, tok_path = load_pretrained(path)
    tok_path = tok_path or tokenizer_path(cfg)
    tok = Tokenizer(tok_path)
    with ckpt.atomic_output_dir(out, prefix=".export_hf_") as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt", "source": os.path.abspath(path)})
        _write_json(tmp, "config.json", hf_config(cfg, tok))
        _write_json(tmp, "generation_config.json", {"eos_token_id": tok.eos_id, "pad_token_id": tok.eos_id,
                                                    "use_cache": False, "do_sample": False})
        for name in CODE_FILES:
            shutil.copy(os.path.join(CODE_DIR, name), os.path.join(tmp, name))
        shutil.copy(tok_path, os.path.join(tmp, "tokenizer.model"))
        eos, unk = tok.id_to_piece(tok.eos_id), tok.id_to_piece(0)
        _write_json(tmp, "tokenizer_config.json", {
            "tokenizer_class": "MegaloopTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_megaloop.MegaloopTokenizer", None]},
            "eos_token": eos, "unk_token": unk, "pad_token": eos, "model_max_length": cfg.model.seq_len,
            "clean_up_tokenization_spaces": False})
        _write_json(tmp, "special_tokens_map.json", {"eos_token": eos, "unk_token": unk, "pad_token": eos})
        from ..config import save_config
        save_config(cfg, os.path.join(tmp, "config.yaml"))
    return out


def _write_json(folder: str, name: str, obj: dict) -> None:
    with open(os.path.join(folder, name), "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
