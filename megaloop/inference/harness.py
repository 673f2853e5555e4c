"""`megaloop eval RUN --tasks T1,T2 [--recur 1,4,8]`: EleutherAI's lm-evaluation-harness on a
megaloop model, at each recurrence count asked (the optional extra `eval`: pip install megaloop[eval]).

`MegaloopLM` is an lm_eval LM: loglikelihood (multiple choice, cloze), loglikelihood_rolling
(perplexity tasks) and generate_until (greedy, over the loop-aware cache). Tasks are looked up
in megaloop's bundled offline tasks (megaloop/inference/tasks: corpus_next_line) and, for any
other name, in lm-eval's own registry (those download their data from the hub when first run).

Prints one table (task x metric by r) and writes RUN/lm_eval.json.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.nn.functional as F

from .. import checkpoint as ckpt
from ..errors import UserError

try:
    from lm_eval.api.model import LM
except ImportError:  # the optional extra is missing: run_tasks says how to install it
    LM = object


class MegaloopLM(LM):
    def __init__(self, model, tokenizer, num_recur: int, batch_size: int = 8, max_gen_toks: int = 64):
        super().__init__()
        self.model, self.tok, self.r, self.bs, self.max_gen_toks = model, tokenizer, num_recur, batch_size, max_gen_toks
        self.L = model.cfg.seq_len

    # ------------------------------------------------------------------ scoring
    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation, cut where the joint encoding splits them (a
        trailing space of the context belongs to the continuation, as in lm-eval's HF model)."""
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole = self.tok.encode(context + continuation)
        ctx = self.tok.encode(context) if context else []
        if whole[:len(ctx)] != ctx:  # tokens merged across the boundary: score the continuation alone
            return ctx, self.tok.encode(continuation)
        return ctx, whole[len(ctx):]

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), continuation is the greedy choice) per pair."""
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        out: list = [None] * len(pairs)
        for s in range(0, len(order), self.bs):
            chunk = order[s:s + self.bs]
            seqs = []
            for i in chunk:
                ctx, cont = pairs[i]
                full = ([self.tok.eos_id] + ctx if not ctx else ctx) + cont
                seqs.append((full[-(self.L + 1):][:-1], cont))
            T = max(len(x) for x, _ in seqs)
            ids = torch.full((len(seqs), T), self.tok.eos_id, dtype=torch.long)  # right-padded: causal
            for b, (x, _) in enumerate(seqs):
                ids[b, :len(x)] = torch.tensor(x)
            logp = F.log_softmax(self.model(ids, num_recur=self.r), -1)
            for b, (i, (x, cont)) in enumerate(zip(chunk, seqs)):
                n = min(len(cont), len(x))
                lp = logp[b, len(x) - n:len(x)]
                tgt = torch.tensor(cont[-n:])
                out[i] = (float(lp.gather(1, tgt[:, None]).sum()), bool((lp.argmax(-1) == tgt).all()))
        return out

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self._score([self._pair(*req.args) for req in requests])

    def loglikelihood_rolling(self, requests) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
        out = []
        for req in requests:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok.encode(req.args[0]), self.tok.eos_id, self.L, 1)]
            out.append(sum(ll for ll, _ in self._score(windows)))
        return out

    def generate_until(self, requests) -> list[str]:
        from .generate import generate
        out = []
        for req in requests:
            context, kw = req.args
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kw.get("max_gen_toks", self.max_gen_toks))
            ids = self.tok.encode(context) or [self.tok.eos_id]
            gen = generate(self.model, [ids], n, num_recur=self.r)
            new = gen.new_tokens[0]
            if self.tok.eos_id in new:
                new = new[:new.index(self.tok.eos_id)]
            text = self.tok.decode(new)
            for stop in until:
                text = text.split(stop)[0] if stop else text
            out.append(text)
        return out


def _metrics(task_result: dict) -> dict:
    """{'acc': 0.3, 'acc_stderr': 0.03, ...} from lm-eval's {'acc,none': ..., 'alias': ...}."""
    out = {}
    for key, value in task_result.items():
        name, _, filt = key.partition(",")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name if filt in ("", "none") else f"{name} ({filt})"] = float(value)
    return out


def run_tasks(path: str, tasks: list[str], recur: list[int], limit: Optional[int] = None,
              batch_size: int = 8, log=print) -> dict:
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("--tasks needs EleutherAI's lm-evaluation-harness: pip install 'megaloop[eval]' "
                        "(or pip install lm-eval)") from None
    from ..data.tokenizer import Tokenizer
    from ..pretrained import load_pretrained, tokenizer_path
    from .tasks import LOCAL_TASKS, TASKS_DIR

    model, cfg, tok_path = load_pretrained(path)
    tok = Tokenizer(tok_path or tokenizer_path(cfg, log=lambda *a: None))
    # Scanning lm-eval's thousands of built-in task files takes a while: only when one is asked.
    manager = TaskManager(include_path=TASKS_DIR, include_defaults=any(t not in LOCAL_TASKS for t in tasks))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-eval task(s) {', '.join(unknown)}; bundled offline: {', '.join(LOCAL_TASKS)}; "
                        f"`lm_eval ls tasks` lists lm-eval's own")
    by_r = {}
    for r in recur:
        res = lm_eval.simple_evaluate(model=MegaloopLM(model, tok, r, batch_size), tasks=tasks, task_manager=manager,
                                      limit=limit, log_samples=False, bootstrap_iters=1000, random_seed=0,
                                      numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
        by_r[str(r)] = {t: _metrics(v) for t, v in res["results"].items()}
    result = {"run": os.path.abspath(path), "tasks": tasks, "recur": recur, "limit": limit,
              "lm_eval_version": getattr(lm_eval, "__version__", None), "results": by_r}
    log(format_table(result))
    ckpt.write_atomic(os.path.join(path, "lm_eval.json"), json.dumps(result, indent=2).encode())
    log(f"wrote {os.path.join(path, 'lm_eval.json')}")
    return result


def format_table(result: dict) -> str:
    rs = [str(r) for r in result["recur"]]
    rows = []
    for task in sorted({t for v in result["results"].values() for t in v}):
        names = sorted({m for r in rs for m in result["results"][r].get(task, {}) if not m.endswith("_stderr")})
        for m in names:
            cells = []
            for r in rs:
                v = result["results"][r].get(task, {})
                cells.append(f"{v[m]:.4f}" + (f" ± {v[m + '_stderr']:.4f}" if f"{m}_stderr" in v else "")
                             if m in v else "-")
            rows.append((task, m, cells))
    head = f"{'task':<24} {'metric':<12} " + " ".join(f"{'r=' + r:>17}" for r in rs)
    return "\n".join([head, "-" * len(head)] + [f"{t:<24} {m:<12} " + " ".join(f"{c:>17}" for c in cells)
                                                 for t, m, cells in rows])
