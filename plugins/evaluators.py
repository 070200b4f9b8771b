"""Built-in evaluator: retrieval metrics (Recall@K, P@1, R-Precision, MAP@R) and optionally NMI/AMI."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

import dmlkit
from dmlkit.errors import OptionError
from dmlkit.evaluation import BACKENDS, KMEANS_INITS, clustering_metrics, retrieval_metrics


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

    @property
    def metrics(self) -> dict[str, str]:
        """The metrics this evaluator reports, each with its direction ("max": higher is better)."""
        names = ["precision_at_1", "r_precision", "map_at_r", *(f"recall_at_{k}" for k in self.ks)]
        if self.clustering:
            names += ["nmi", "ami"]
        return dict.fromkeys(names, "max")

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
        )
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
