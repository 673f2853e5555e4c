"""setup.py states the torch the code really needs.

Contract: the `torch>=X` floor in setup.py is at least the release that introduced every newer
torch API the code calls (the table below, each entry checked to be both called in the source
and present in the installed torch), so an install at the floor cannot fail at the first step.
"""
import os
import re

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# API -> (the release that introduced it, where it is called, how it is found there)
NEWER_APIS = {
    "torch.nn.utils.clip_grads_with_norm_": ((2, 6), "megaloop/parallel", "clip_grads_with_norm_("),
    "scaled_dot_product_attention(enable_gqa=...)": ((2, 5), "megaloop/model.py", "enable_gqa="),
}


def _floor() -> tuple[int, int]:
    with open(os.path.join(ROOT, "setup.py")) as f:
        m = re.search(r'"torch>=(\d+)\.(\d+)', f.read())
    assert m, "setup.py names no torch>=X.Y floor"
    return int(m.group(1)), int(m.group(2))


def _source(rel: str) -> str:
    path = os.path.join(ROOT, rel)
    files = [path] if path.endswith(".py") else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                                                 if f.endswith(".py")]
    text = ""
    for p in files:
        with open(p) as f:
            text += f.read()
    return text


def test_torch_floor_covers_every_newer_api_the_code_calls():
    floor = _floor()
    for api, (since, where, needle) in NEWER_APIS.items():
        assert needle in _source(where), f"{api} is no longer called in {where}: drop it from NEWER_APIS"
        assert floor >= since, f"setup.py says torch>={floor[0]}.{floor[1]}, but {api} needs {since[0]}.{since[1]}"
    assert hasattr(torch.nn.utils, "clip_grads_with_norm_")
