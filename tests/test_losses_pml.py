"""dmlkit's losses against pytorch-metric-learning's on the same batches (skipped without PML)."""

import pytest
from test_losses import batch

from dmlkit_plugins.losses import ContrastiveLoss, MultiSimilarityLoss, ProxyAnchorLoss, ProxyNCALoss, TripletLoss

pml_losses = pytest.importorskip("pytorch_metric_learning.losses", reason="PML not installed")
from pytorch_metric_learning.distances import LpDistance  # noqa: E402


def test_pml_triplet_margin_loss():
    emb, labels = batch(seed=20)
    ref = pml_losses.TripletMarginLoss(margin=0.2, distance=LpDistance(power=2))(emb, labels)
    ours = TripletLoss(margin=0.2, squared=True, reduction="mean_nonzero")(emb, labels)
    assert float(ours) == pytest.approx(float(ref), abs=1e-5)


def test_pml_contrastive_loss():
    emb, labels = batch(seed=21)
    ref = pml_losses.ContrastiveLoss(pos_margin=0.0, neg_margin=0.5)(emb, labels)
    assert float(ContrastiveLoss(0.0, 0.5)(emb, labels)) == pytest.approx(float(ref), abs=1e-5)


def test_pml_multi_similarity_loss():
    emb, labels = batch(seed=22)
    ref = pml_losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)(emb, labels)
    assert float(MultiSimilarityLoss(2, 50, 0.5)(emb, labels)) == pytest.approx(float(ref), abs=1e-5)


def test_pml_proxy_nca_and_proxy_anchor():
    emb, labels = batch(seed=23)
    ours = ProxyNCALoss(6, 8, scale=3.0)
    theirs = pml_losses.ProxyNCALoss(6, 8, softmax_scale=9)
    theirs.proxies.data.copy_(ours.proxies.data)
    assert float(ours(emb, labels)) == pytest.approx(float(theirs(emb, labels)), abs=1e-4)
    ours = ProxyAnchorLoss(6, 8)
    theirs = pml_losses.ProxyAnchorLoss(6, 8, margin=0.1, alpha=32)
    theirs.proxies.data.copy_(ours.proxies.data)
    assert float(ours(emb, labels)) == pytest.approx(float(theirs(emb, labels)), abs=1e-4)
