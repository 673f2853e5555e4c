"""Loading a trained run: the model, config and tokenizer of a run directory (its latest checkpoint)
or of a `megaloop export` folder. The one loader that eval, generate, export and the inference
tools share; it sits below all of them and imports none of them.
"""
from __future__ import annotations

import os
from typing import Optional

from . import checkpoint as ckpt
from .config import Config, load_config
from .errors import UserError
from .model import LoopedLM


def tokenizer_path(cfg: Config, log=lambda *a: None) -> str:
    """The tokenizer a config trains with (prepared, and built if missing, from cfg.data)."""
    from .data.prepare import ensure_prepared
    return ensure_prepared(cfg.data, cfg.model.vocab_size, log=log).tokenizer_path


def load_pretrained(path: str, device: str = "cpu") -> tuple[LoopedLM, Config, Optional[str]]:
    """(model in eval mode, config, tokenizer path or None) from an export folder or a run dir. The
    model runs its kernels with the backend its config.yaml names (`kernels:`)."""
    cfg_path = os.path.join(path, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise UserError(f"{path} is not a run directory or an export folder (no config.yaml)")
    cfg = load_config(cfg_path)
    model = LoopedLM(cfg.model, kernels=cfg.kernels)
    weights = os.path.join(path, "model.safetensors")
    if os.path.isfile(weights):
        from safetensors.torch import load_file
        try:
            state = load_file(weights)
        except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt file
            raise UserError(f"{weights} is corrupt ({e}); re-export it with megaloop export") from None
        tok = os.path.join(path, "tokenizer.model")
        tok = tok if os.path.isfile(tok) else None
    else:
        latest = ckpt.latest_path(path)
        if latest is None:
            raise UserError(f"{path} has no complete checkpoint yet; train it first")
        from .parallel.dcp_state import read_weights
        state, tok = read_weights(latest), None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"the weights in {path} do not fit its config ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), cfg, tok
