"""How much NMI moves with the k-means start, beside pytorch-metric-learning and scikit-learn.

    python bench/nmi_bench.py --embeddings E.npy --labels L.npy [--seeds 5]

E.npy / L.npy: any embeddings and labels (``dmlkit embed RUN``, or ``bench/frozen_features.py
--save``). Embeddings are L2-normalised first (as dmlkit's evaluator does), then clustered with
k = the number of classes by each method for each seed; one JSON line per method with the NMI's
mean, standard deviation, min and max over the seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

from dmlkit.evaluation import kmeans_labels, l2_normalise  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embeddings", required=True)
    ap.add_argument("--labels", required=True)
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score as nmi

    x = l2_normalise(np.load(args.embeddings).astype(np.float32))
    y = np.load(args.labels)
    k = len(np.unique(y))
    methods = {
        "dmlkit default = PML (faiss, random start, 1 run)": lambda s: kmeans_labels(x, k, seed=s, backend="faiss"),
        "dmlkit, random start, 10 restarts": lambda s: kmeans_labels(x, k, seed=s, restarts=10, backend="faiss"),
        "dmlkit, k-means++ start, 10 restarts": lambda s: kmeans_labels(
            x, k, seed=s, restarts=10, init="k-means++", backend="faiss"
        ),
        "scikit-learn KMeans, n_init 1": lambda s: KMeans(k, n_init=1, random_state=s).fit(x).labels_,
        "scikit-learn KMeans, n_init 10": lambda s: KMeans(k, n_init=10, random_state=s).fit(x).labels_,
    }
    print(json.dumps({**machine(), "n": len(x), "dim": x.shape[1], "classes": k}))
    for name, fn in methods.items():
        start = time.perf_counter()
        values = [nmi(y, fn(1234 + s)) for s in range(args.seeds)]
        row = {
            "method": name,
            "nmi_mean": round(statistics.mean(values), 4),
            "nmi_sd": round(statistics.pstdev(values), 4),
            "nmi_min": round(min(values), 4),
            "nmi_max": round(max(values), 4),
            "seconds_per_run": round((time.perf_counter() - start) / args.seeds, 2),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
