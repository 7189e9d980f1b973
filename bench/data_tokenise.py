"""Tokenising a large jsonl: peak RSS per rank and throughput, for the data path of a given checkout.

Generates N prompt/completion examples (the built-in E2E set, repeated with a running index so no
two lines are equal; not shipped), then starts R processes at once, as R ranks of one node would,
each calling ``bigtrain.data.load_examples`` on the file with a fresh cache directory, and reports
each one's peak RSS (``ru_maxrss``), wall time and what it did (tokenised, or waited and read the
cache). ``--repo DIR`` imports bigtrain from another checkout (e.g. a worktree of an older commit),
so the same figures can be taken before and after a change, on the same machine:

    python bench/data_tokenise.py --examples 1000000 --ranks 2 --out bench/results/data
    git worktree add /tmp/old 60fbfa3 && python bench/data_tokenise.py --repo /tmp/old --examples 1000000 --ranks 2
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_jsonl(path: Path, n: int) -> None:
    src = [json.loads(x) for x in (ROOT / "bigtrain/assets/e2e_train.jsonl").read_text("utf-8").splitlines()]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            ex = src[i % len(src)]
            f.write(json.dumps({"prompt": f"#{i} " + ex["prompt"], "completion": ex["completion"]},
                               ensure_ascii=False) + "\n")


def worker(data: str, cache: str, out: str) -> None:
    t0 = time.perf_counter()
    from bigtrain.config import DataConfig
    from bigtrain.data import load_examples, load_tokenizer

    os.environ["BIGTRAIN_DATA_CACHE"] = cache
    tok = load_tokenizer(None)
    t1 = time.perf_counter()
    ds, stats = load_examples(data, tok, DataConfig(max_length=128))
    t2 = time.perf_counter()
    n = 0
    for i in range(0, len(ds), max(1, len(ds) // 1000)):  # touch rows across the set, as sampling does
        n += len(ds[i]["input_ids"])
    Path(out).write_text(json.dumps({
        "rows": len(ds), "examples": stats["examples"], "cache": stats.get("cache", "none (no cache)"),
        "load_s": round(t2 - t1, 1), "startup_s": round(t1 - t0, 1),
        "peak_rss_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=1_000_000)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--repo", default=str(ROOT), help="checkout whose bigtrain is measured")
    ap.add_argument("--out", default=None, help="directory for results.json")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(*a.worker)
    with tempfile.TemporaryDirectory(prefix="bigtrain-data-bench-") as tmp:
        tmp = Path(tmp)
        data = tmp / "big.jsonl"
        make_jsonl(data, a.examples)
        size = data.stat().st_size
        env = dict(os.environ, PYTHONPATH=a.repo, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        t0 = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(data), str(tmp / "cache"),
                                   str(tmp / f"r{r}.json")], env=env) for r in range(a.ranks)]
        codes = [p.wait() for p in procs]
        wall = time.perf_counter() - t0
        if any(codes):
            raise SystemExit(f"a worker failed: {codes}")
        ranks = [json.loads((tmp / f"r{r}.json").read_text()) for r in range(a.ranks)]
    res = {"repo": a.repo, "examples": a.examples, "file_MB": round(size / 1e6, 1), "ranks": ranks,
           "wall_s": round(wall, 1), "examples_per_s": round(a.examples / max(r["load_s"] for r in ranks)),
           "cpus": os.cpu_count()}
    print(json.dumps(res, indent=1))
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        with open(Path(a.out) / "results.jsonl", "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
