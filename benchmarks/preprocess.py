"""Preprocess speed and memory, printed as JSON.

On the same text, measured side by side in one process (rounds interleaved, so load from other
programs hits every variant alike):
  * limit      : the tokenizer's own single-thread encode rate (Tokenizer.encode_batch in this
                 process, one thread): what one worker can at best reach;
  * workers_1  : `preprocess` with 1 encoding worker (reading, hashing and writing overlap it);
  * workers_2  : `preprocess` with 2 workers.
Rates are tokens/s of wall time; each variant's best round is reported (the least disturbed by
other load) with every round's figure beside it. Then the peak RSS of a fresh `preprocess`
process (the reading process and, separately, the largest worker) on generated corpora of
--rss-scales times the bundled corpus, to show that memory stays flat as the corpus grows.

The tokenizer is the default config's kind (sentencepiece unigram, model.vocab_size 4096), trained
once on the bundled corpus and cached in --work. The corpus is the bundled text, its documents
repeated (.jsonl.zst, streamed).

    python benchmarks/preprocess.py [--rate-scale 2] [--rss-scales 50 100] [--rounds 3] [--out FILE]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megaloop.data.documents import iter_documents  # noqa: E402
from emit import emit  # noqa: E402  (benchmarks/emit.py: scripts run with benchmarks/ on sys.path)


def bundled_documents() -> list[str]:
    return list(iter_documents(sorted(glob.glob(os.path.join(REPO, "data", "corpus", "*.txt.gz")))))


def write_corpus(path: str, docs: list[str], scale: int) -> int:
    """The bundled documents `scale` times, as .jsonl.zst; returns the characters written."""
    import zstandard
    if os.path.isfile(path):
        return -1
    chars = 0
    tmp = path + ".tmp"
    with open(tmp, "wb") as raw, zstandard.ZstdCompressor(level=3).stream_writer(raw) as w:
        for rep in range(scale):
            for d in docs:
                # split the plays into ~4 kB documents, like web text; tag the repeat so the
                # validation split (a hash of the text) takes its share of every repeat
                for i in range(0, len(d), 4000):
                    line = json.dumps({"text": d[i:i + 4000], "rep": rep}) + "\n"
                    w.write(line.encode())
                    chars += len(d[i:i + 4000])
    os.replace(tmp, path)
    return chars


def tokenizer(work: str, docs_path: str) -> str:
    from megaloop.data.tokenizer import train_tokenizer
    path = os.path.join(work, "tok.model")
    if not os.path.isfile(path):
        train_tokenizer(sorted(glob.glob(os.path.join(REPO, "data", "corpus", "*.txt.gz"))),
                        os.path.join(work, "tok"), 4096, "unigram")
    return path


def limit_rate(model: str, texts: list[str]) -> tuple[float, int]:
    """The library's own single-thread encode (sentencepiece, num_threads=1) of the chunks that
    preprocess sends to a worker: ids as Python lists, nothing else."""
    from megaloop.data.preprocess import _chunks
    from megaloop.data.tokenizer import Tokenizer
    sp = Tokenizer(model).sp
    chunks = list(_chunks(iter(texts)))
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    for chunk in chunks:
        n += sum(len(x) + 1 for x in sp.encode(chunk, num_threads=1))
    return n / (time.perf_counter() - t0), n, {"cpu_s": time.process_time() - c0}


def preprocess_rate(model: str, corpus: str, out: str, workers: int) -> tuple[float, int]:
    """Wall rate, and the CPU seconds of the reading process and of the workers together."""
    import resource
    from megaloop.data.preprocess import preprocess
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    st = preprocess([corpus], model, out, valid_fraction=0.02, workers=workers)
    wall = time.perf_counter() - t0
    me2, kids2 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    n = st.train_tokens + st.valid_tokens
    cpu = {"reader_cpu_s": me2.ru_utime + me2.ru_stime - me.ru_utime - me.ru_stime,
           "workers_cpu_s": kids2.ru_utime + kids2.ru_stime - kids.ru_utime - kids.ru_stime}
    return n / wall, n, cpu


RSS_CHILD = r"""
import json, resource, sys, time
from megaloop.data.preprocess import preprocess
t0 = time.perf_counter()
st = preprocess([sys.argv[1]], sys.argv[2], sys.argv[3], valid_fraction=0.02, workers=int(sys.argv[4]))
wall = time.perf_counter() - t0
print(json.dumps({"main_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "largest_worker_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "tokens": st.train_tokens + st.valid_tokens, "docs": st.train_docs + st.valid_docs,
                  "wall_s": wall, "tokens_per_s": (st.train_tokens + st.valid_tokens) / wall}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate-scale", type=int, default=2, help="rate corpus = this many times the bundled one")
    ap.add_argument("--rss-scales", type=int, nargs="*", default=[50, 100])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rss-workers", type=int, default=2)
    ap.add_argument("--work", default="/tmp/megaloop_bench_preprocess")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    docs = bundled_documents()
    bundled_chars = sum(map(len, docs))
    model = tokenizer(args.work, args.work)
    rate_corpus = os.path.join(args.work, f"rate_x{args.rate_scale}.jsonl.zst")
    write_corpus(rate_corpus, docs, args.rate_scale)
    texts = list(iter_documents([rate_corpus]))
    rounds: dict = {"limit": [], "workers_1": [], "workers_2": []}
    cpu: dict = {"limit": [], "workers_1": [], "workers_2": []}
    tokens = {}
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        r, tokens["limit"], c = limit_rate(model, texts)
        rounds["limit"].append(r)
        cpu["limit"].append(c)
        for w in (1, 2):
            r, tokens[f"workers_{w}"], c = preprocess_rate(model, rate_corpus, os.path.join(args.work, f"out{w}"), w)
            rounds[f"workers_{w}"].append(r)
            cpu[f"workers_{w}"].append(c)
    load_after = os.getloadavg()
    best = {k: max(v) for k, v in rounds.items()}
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_1m_before_after": [round(load_before[0], 2), round(load_after[0], 2)]},
        "tokenizer": "sentencepiece unigram, 4096 tokens (the default config's kind), trained on the bundled corpus",
        "rate_corpus": {"scale_x_bundled": args.rate_scale, "chars": bundled_chars * args.rate_scale,
                        "tokens": tokens["limit"]},
        "tokens_per_s_best": {k: round(v) for k, v in best.items()},
        "tokens_per_s_rounds": {k: [round(x) for x in v] for k, v in rounds.items()},
        "workers_1_over_limit": round(best["workers_1"] / best["limit"], 3),
        # CPU seconds per million tokens (least of the rounds): what each part costs whatever the
        # load; the workers' figure against the limit's is the encode overhead of a worker, the
        # reader's must stay below a worker's for 1 worker + the reader to keep pace on 2 cores
        "cpu_s_per_mtok": {
            "limit_encode": round(min(c["cpu_s"] for c in cpu["limit"]) / tokens["limit"] * 1e6, 3),
            **{f"workers_{w}_{part}": round(min(c[f"{part}_cpu_s"] for c in cpu[f"workers_{w}"])
                                            / tokens[f"workers_{w}"] * 1e6, 3)
               for w in (1, 2) for part in ("reader", "workers")}},
        "workers_2_over_workers_1": round(best["workers_2"] / best["workers_1"], 3),
        "targets": {"workers_1_over_limit": 0.9, "workers_2_over_workers_1": 1.7, "peak_rss_mib": 1024},
        "rss": [],
    }
    assert tokens["workers_1"] == tokens["workers_2"] == tokens["limit"], tokens
    for scale in args.rss_scales:
        corpus = os.path.join(args.work, f"rss_x{scale}.jsonl.zst")
        write_corpus(corpus, docs, scale)
        out = subprocess.run([sys.executable, "-c", RSS_CHILD, corpus, model, os.path.join(args.work, f"rss{scale}"),
                              str(args.rss_workers)], capture_output=True, text=True, cwd=REPO, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row.update(scale_x_bundled=scale, chars=bundled_chars * scale, workers=args.rss_workers,
                   loadavg_1m_after=round(os.getloadavg()[0], 2))
        result["rss"].append(row)
    emit(result, args.out)


if __name__ == "__main__":
    main()
