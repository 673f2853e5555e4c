"""Looped inference: the loop-aware KV cache, per-token exit, and the evaluations built on them.

cache.py     LoopKVCache: [prelude | kv_budget x n_recur_block slots | coda], ring-buffer window
decode.py    Decoder: the looped forward over the cache, with per-token exit
step.py      TokenBlock: the lean one-token step every decoded token takes
exit.py      exit criteria (kl, latent, entropy, entropy-diff, argmax) and their parsing
generate.py  generate(): prefill + cached decoding, batched, left-padded prompts
"""
