"""Verification and classification metrics (dmlkit.decisions) at SOP test size, beside the
retrieval metrics on the same embeddings.

    python bench/decisions_bench.py              # N=60,502, 11,316 classes, D=128
    python bench/decisions_bench.py --quick      # N=6,000, 1,100 classes
    python bench/decisions_bench.py --max-pairs 20000000 --out decisions.json

Synthetic embeddings as in eval_bench.py (class centres plus noise, 2-12 items per class). Times,
in one process, with peak resident-memory growth (sampled every 5 ms):

- ``verification_metrics`` (ROC AUC, EER, FNMR at FMR 1e-2/1e-3/1e-4): at SOP size the 1.8 billion
  pairs are beyond ``--max-pairs``, so all genuine pairs and a seeded sample of impostor pairs;
- ``decision_metrics`` with k-NN 1/5, nearest centroid, MRR, MAP@k and P@k at 1/10 and
  verification, in one scan;
- ``retrieval_metrics`` (P@1, R-Precision, MAP@R, Recall@K; faiss) for comparison.
One JSON line per measurement; ``--out`` saves them all.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402
from eval_bench import synthetic, timed  # noqa: E402

from dmlkit.decisions import MAX_PAIRS, decision_metrics, verification_metrics  # noqa: E402
from dmlkit.evaluation import retrieval_metrics  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--max-pairs", type=int, default=MAX_PAIRS)
    parser.add_argument("--memory-mb", type=float, default=256)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    n, classes = (6000, 1100) if args.quick else (60502, 11316)
    emb, labels = synthetic(n, args.dim, classes)
    rows = []
    runs = {
        "verification": lambda: verification_metrics(emb, labels, max_pairs=args.max_pairs, memory_mb=args.memory_mb),
        "decisions_all": lambda: decision_metrics(
            emb, labels, knn=(1, 5), ks=(1, 10), centroid=True, max_pairs=args.max_pairs, memory_mb=args.memory_mb
        ),
        "retrieval_faiss": lambda: retrieval_metrics(emb, labels, backend="faiss"),
    }
    for name, fn in runs.items():
        out, secs, mem = timed(fn)
        row = {
            "what": name,
            "n": n,
            "dim": args.dim,
            "classes": classes,
            "seconds": round(secs, 2),
            "peak_rss_mb": mem.rss_mb,
            "cpu_util": mem.cpu_util,
            "metrics": {k: v for k, v in out.items() if not isinstance(v, dict)},
            "machine": machine(),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        save({"rows": rows}, args.out)


if __name__ == "__main__":
    main()
