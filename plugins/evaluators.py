"""Built-in evaluator: retrieval metrics (Recall@K, P@1, R-Precision, MAP@R) and, on request, NMI/AMI,
verification (ROC AUC, EER, FNMR@FMR), k-NN and nearest-centroid accuracy, MRR, MAP@k, Precision@k, and
bootstrap confidence intervals over queries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

import dmlkit
from dmlkit.decisions import FMRS, MACRO, MAX_PAIRS, bootstrap_ci, decision_metrics, fmr_key
from dmlkit.errors import OptionError
from dmlkit.evaluation import BACKENDS, KMEANS_INITS, clustering_metrics, retrieval_metrics

#: What a verification result says about its pairs besides the metrics.
PAIR_COUNTS = ("verification_pairs", "genuine_pairs", "impostor_pairs", "genuine_pairs_used", "impostor_pairs_used")


class RetrievalEvaluator:
    """Leave-one-out retrieval, or query against gallery when the test split has masks.

    k-NN by ``backend`` (faiss on CPU, torch on GPU, or auto) in chunks that fit
    ``memory_mb``; ``clustering`` adds NMI and AMI of k-means with k = number of classes.

    Args:
        ks: the K of Recall@K, a list (``--evaluator-opt ks=[1,2,4,8]``).
        backend: k-NN search: ``faiss`` (CPU), ``torch`` (chunked matrix products, GPU), or ``auto``.
        clustering: also NMI and AMI of k-means with k = the number of classes (slow at SOP size).
        per_class: also each class's P@1, R-Precision, MAP@R and Recall@K (in JSON output).
        normalize: L2-normalise the embeddings first (cosine neighbours).
        memory_mb: the memory one chunk of the search may take.
        seed: seed of the k-means start (1234, faiss's and pytorch-metric-learning's default: the same clustering).
        kmeans_restarts: k-means runs from different starts; the one with the lowest objective is kept (steadier NMI).
        kmeans_init: how k-means starts: ``random`` (faiss's, as pytorch-metric-learning) or ``k-means++``
            (scikit-learn's; with ``kmeans_restarts=10``, scikit-learn's KMeans within seed noise).
        verification: also ROC AUC, EER and FNMR at FMR 1e-2, 1e-3, 1e-4 of the query-gallery pairs
            (:func:`dmlkit.decisions.verification_metrics`; exact up to ``max_pairs`` pairs, sampled beyond).
        knn: also k-NN classification accuracy for each K of this list (``knn_accuracy_at_K``: majority of the
            K nearest, a tie to the nearest) and nearest-centroid accuracy, each also as the mean of the
            classes' accuracies (``..._macro``).
        ranking: also MRR and, for each of ``ks``, MAP@k and Precision@k.
        max_pairs: genuine (and impostor) pairs above which verification uses a seeded sample of this many.
        ci: also 95% bootstrap confidence intervals over queries (``ci``: metric -> [low, high]) of every
            per-query metric (all but verification and clustering).
        ci_resamples: bootstrap resamples of the queries.
        ci_seed: seed of the bootstrap draws (and of the verification pair sample).
    """

    def __init__(
        self,
        ks: Sequence[int] = (1, 2, 4, 8),
        backend: str = "auto",
        clustering: bool = False,
        per_class: bool = False,
        normalize: bool = True,
        memory_mb: float = 512,
        seed: int = 1234,
        kmeans_restarts: int = 1,
        kmeans_init: str = "random",
        verification: bool = False,
        knn: Sequence[int] = (),
        ranking: bool = False,
        max_pairs: int = MAX_PAIRS,
        ci: bool = False,
        ci_resamples: int = 1000,
        ci_seed: int = 0,
    ):
        if backend not in BACKENDS:
            raise OptionError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        if not ks or min(ks) < 1:
            raise OptionError(f"ks must be positive integers; got {list(ks)}")
        if memory_mb <= 0:
            raise OptionError(f"memory_mb must be > 0; got {memory_mb}")
        self.ks, self.backend, self.clustering, self.per_class = tuple(ks), backend, clustering, per_class
        if kmeans_restarts < 1:
            raise OptionError(f"kmeans_restarts must be >= 1; got {kmeans_restarts}")
        if kmeans_init not in KMEANS_INITS:
            raise OptionError(f"kmeans_init must be one of {', '.join(KMEANS_INITS)}; got {kmeans_init!r}")
        self.kmeans_init = kmeans_init
        self.normalize, self.memory_mb, self.seed, self.restarts = normalize, memory_mb, seed, kmeans_restarts
        if knn and min(knn) < 1:
            raise OptionError(f"knn must be positive integers; got {list(knn)}")
        if max_pairs < 1:
            raise OptionError(f"max_pairs must be >= 1; got {max_pairs}")
        if ci and ci_resamples < 10:
            raise OptionError(f"ci_resamples must be >= 10; got {ci_resamples}")
        self.verification, self.knn, self.ranking = verification, tuple(sorted(set(knn))), ranking
        self.max_pairs, self.ci, self.ci_resamples, self.ci_seed = max_pairs, ci, ci_resamples, ci_seed

    @property
    def metrics(self) -> dict[str, str]:
        """The metrics this evaluator reports, each with its direction ("max": higher is better)."""
        names = ["precision_at_1", "r_precision", "map_at_r", *(f"recall_at_{k}" for k in self.ks)]
        if self.clustering:
            names += ["nmi", "ami"]
        out = dict.fromkeys(names, "max")
        if self.verification:
            out.update({"roc_auc": "max", "eer": "min", **{fmr_key(f): "min" for f in FMRS}})
        if self.knn:
            out.update({f"knn_accuracy_at_{k}": "max" for k in self.knn}, nearest_centroid_accuracy="max")
            out.update({f"{name}_macro": "max" for name in list(out) if name.startswith(MACRO)})
        if self.ranking:
            out.update({"mrr": "max", **{f"{m}_at_{k}": "max" for k in self.ks for m in ("map", "precision")}})
        return out

    def __call__(
        self, embeddings: Any, labels: Any, query_mask: np.ndarray | None = None, gallery_mask: np.ndarray | None = None
    ) -> dict[str, Any]:
        out = retrieval_metrics(
            embeddings,
            labels,
            query_mask=query_mask,
            gallery_mask=gallery_mask,
            ks=self.ks,
            normalise=self.normalize,
            backend=self.backend,
            memory_mb=self.memory_mb,
            per_class=self.per_class,
            per_query=self.ci,
        )
        per_query = out.pop("per_query", {})
        if self.verification or self.knn or self.ranking:
            more = decision_metrics(
                embeddings,
                labels,
                query_mask,
                gallery_mask,
                verification=self.verification,
                knn=self.knn,
                ks=self.ks if self.ranking else (),
                centroid=bool(self.knn),
                normalise=self.normalize,
                max_pairs=self.max_pairs,
                seed=self.ci_seed,
                memory_mb=self.memory_mb,
                per_query=self.ci,
            )
            wanted = {*self.metrics, *PAIR_COUNTS}  # MRR is always computed, reported only with ranking
            per_query.update({k: v for k, v in more.pop("per_query", {}).items() if k in wanted})
            out.update({k: v for k, v in more.items() if k in wanted})
        if self.ci:
            out["ci"] = bootstrap_ci(per_query, self.ci_resamples, self.ci_seed)
            out["ci_level"], out["ci_resamples"] = 0.95, self.ci_resamples
        if self.clustering:
            out.update(
                clustering_metrics(embeddings, labels, normalise=self.normalize, seed=self.seed, restarts=self.restarts)
            )
        return out


@dmlkit.hookimpl
def register_evaluators(register):
    from dmlkit import ComponentSpec

    register(
        ComponentSpec(
            "retrieval", RetrievalEvaluator, "Recall@K, P@1, R-Precision, MAP@R (chunked k-NN), NMI/AMI on request"
        )
    )
