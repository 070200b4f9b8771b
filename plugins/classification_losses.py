"""Classification losses with learnable class weights, each equal to its pytorch-metric-learning 2.9
(PML) class: the margin-softmax family (L-Softmax, SphereFace, CosFace, ArcFace, sub-center
ArcFace), normalized softmax, SoftTriple, P2SGrad, and the manifold loss with its proxies.

Conventions shared by every loss here:
- the class weights (centers, proxies) live in a core :class:`dmlkit.proxies.ProxyBank`
  (``bank``, [C, K, D]), so the trainer gives them their learning-rate group
  (``lr_multiplier``), ``proxy_init`` can initialise them from embedded training samples, and a
  wrapper such as CCP can resize the bank and set ``bank.transform`` (its unit-ball projection),
  which every loss applies to the vectors it uses;
- with several vectors per class (``sub_centers``, ``centers_per_class``, or CCP resizing the
  bank) a class's similarity is its most similar vector's (sub-center ArcFace's rule), except
  SoftTriple, which soft-assigns over its centers;
- mined ``indices`` weight each sample by how often it appears in the mined tuples, divided by
  the largest count (PML's ``convert_to_weights``); mined tuples that are all empty give a zero
  loss (PML then weights every sample 1, as if nothing had been mined);
- a reference set is refused with a ``ValueError``: these losses compare the batch with their
  class weights, as in PML, which refuses ``ref_emb`` for all of them;
- classification losses have ``get_logits(embeddings) -> [N, C]``, equal to PML's;
- PML's ``distance``, ``reducer``, ``weight_init_func`` and regulariser options are not offered:
  each loss uses PML's default (cosine similarity, the mean over samples, PML's initialisation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

import dmlkit
from dmlkit.errors import OptionError
from dmlkit.losses import Indices, MetricLoss
from dmlkit.proxies import ProxyBank, check_initializer


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise OptionError(message)


def _as_float(x: Tensor) -> Tensor:
    """float64 stays float64 (for exact comparisons); anything else computes in float32."""
    return x if x.dtype == torch.float64 else x.float()


def miner_weights(indices: Indices, n: int, like: Tensor) -> Tensor:
    """[n] weight of each sample: how often it appears anywhere in the mined tuples, divided by
    the largest count (PML's ``convert_to_weights``); all zeros when nothing was mined."""
    flat = torch.cat([torch.as_tensor(t, device=like.device).reshape(-1).long() for t in indices])
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= n):
        raise ValueError(f"a mined index is outside the batch of {n}")
    counts = torch.bincount(flat, minlength=n).to(like.dtype)
    return counts / counts.max() if flat.numel() else counts


def scaled_product(x: Tensor, w: Tensor) -> Tensor:
    """[N, M] ``(x_i / |x_i|) . w_j``: x normalised before the product when that touches fewer
    numbers (M >= D), else the product divided by the norms after it (the same values)."""
    if w.shape[0] >= x.shape[1]:
        return F.normalize(x, dim=1) @ w.T
    return (x @ w.T) / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _log1p_sum_exp(v: Tensor, keep: Tensor) -> Tensor:
    """log(1 + sum_j exp(v_ij)) over the kept j of each row (0 for a row with none)."""
    v = v.masked_fill(~keep, -math.inf)
    return torch.logsumexp(torch.cat([torch.zeros_like(v[:, :1]), v], dim=1), dim=1)


class ClassWeightLoss(MetricLoss):
    """Base of the losses here: class vectors in a :class:`~dmlkit.proxies.ProxyBank`, a loss per
    sample (``sample_losses``), averaged with PML's miner weights; no reference set."""

    #: ``dmlkit show`` lists the initializer's options as ``proxy_init.NAME``
    nested_options = {"proxy_init": ("proxy_initializer", None)}
    #: the name errors use
    loss_name = ""
    #: cosine similarity (True) or dot products; a class attribute where a loss offers no such option
    normalize = True

    @staticmethod
    def validate_options(options: dict) -> None:
        """The proxy initializer and its options exist (checked before any data loads)."""
        check_initializer(options.get("proxy_init", ""))

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        per_class: int = 1,
        lr_multiplier: float = 1.0,
        proxy_init: str | dict = "",
        pool_rounds: int = 8,
        std: float = 1.0,
    ):
        super().__init__()
        _check(lr_multiplier >= 0, f"lr_multiplier must be >= 0; got {lr_multiplier}")
        _check(pool_rounds >= 1, f"pool_rounds must be >= 1; got {pool_rounds}")
        self.bank = ProxyBank(
            num_classes,
            per_class,
            embedding_size,
            lr_multiplier=lr_multiplier,
            proxy_init=proxy_init,
            pool_rounds=pool_rounds,
            init="normal",
            std=std,
        )
        self.num_classes = num_classes

    # -- the class vectors ---------------------------------------------------------------
    def weights(self, dtype: torch.dtype) -> Tensor:
        """[C*K, D] the class vectors (row c*K + k is vector k of class c), through
        ``bank.transform`` when a wrapper set one."""
        v = self.bank.vectors.reshape(-1, self.bank.dim).to(dtype)
        return v if self.bank.transform is None else self.bank.transform(v)

    def similarity(self, x: Tensor, w: Tensor) -> Tensor:
        """[N, M] cosine similarities, or with ``normalize=False`` dot products of the vectors as they are."""
        return scaled_product(x, F.normalize(w, dim=1)) if self.normalize else x @ w.T

    def class_similarity(self, emb: Tensor, w: Tensor) -> tuple[Tensor, Tensor | None]:
        """[N, C] each class's similarity (its most similar vector's when it has several), and
        [N, C] which of its K vectors that is (None with one vector per class)."""
        sim = self.similarity(emb, w)
        k = self.bank.per_class
        if k == 1:
            return sim, None
        best = sim.view(len(emb), -1, k).max(2)
        return best.values, best.indices

    # -- the loss ------------------------------------------------------------------------
    def compute(self, emb, labels, ref, ref_labels, indices):
        if ref is not None:
            raise ValueError(
                f"{self.loss_name} compares the batch with its class weights and takes no reference set "
                "(ref_embeddings); call it as loss(embeddings, labels)"
            )
        rows = self.bank.rows(labels)
        losses = self.sample_losses(emb, rows)
        if indices is None:
            return losses.mean()
        return (losses * miner_weights(indices, len(emb), losses)).mean()

    def sample_losses(self, emb: Tensor, rows: Tensor) -> Tensor:
        """[N] the loss of each sample; ``rows`` are the bank rows of its labels."""
        raise NotImplementedError


class ClassifierLoss(ClassWeightLoss):
    """A class-weight loss that is a classifier: it gives class logits."""

    def get_logits(self, embeddings: Tensor) -> Tensor:
        """[N, C] class logits (bank row order), as PML's ``get_logits``."""
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            emb = _as_float(embeddings)
            return self.logits(emb, self.weights(emb.dtype))

    def logits(self, emb: Tensor, w: Tensor) -> Tensor:
        """[N, C] the logits of ``emb`` given the class vectors ``w`` [C*K, D]."""
        raise NotImplementedError


# ================================================================================= margin softmax
class MarginSoftmaxLoss(ClassifierLoss):
    """Softmax cross-entropy whose target logit gets an angular margin: the shared part of
    L-Softmax, SphereFace, CosFace and ArcFace (``target_cosine`` and ``scale_logits`` differ)."""

    def sample_losses(self, emb, rows):
        w = self.weights(emb.dtype)
        cos, best = self.class_similarity(emb, w)
        target = self.target_cosine(cos.gather(1, rows[:, None])[:, 0])
        logits = self.scale_logits(cos.scatter(1, rows[:, None], target[:, None]), emb, w, best)
        return F.cross_entropy(logits, rows, reduction="none")

    def logits(self, emb, w):
        cos, best = self.class_similarity(emb, w)
        return self.scale_logits(cos, emb, w, best)

    def target_cosine(self, cos: Tensor) -> Tensor:
        """The target class's cosine with the margin applied."""
        raise NotImplementedError

    def scale_logits(self, logits: Tensor, emb: Tensor, w: Tensor, best: Tensor | None) -> Tensor:
        return logits * self.scale


class LargeMarginSoftmaxLoss(MarginSoftmaxLoss):
    """Large-margin softmax, L-Softmax (Liu, Wen, Yu, Yang, "Large-Margin Softmax Loss for
    Convolutional Neural Networks", ICML 2016).

    Logit of class c: ``|w_c| |x| cos(theta_c)``, and for the target class
    ``|w_y| |x| psi(theta_y)`` with ``psi(theta) = (-1)^k cos(m theta) - 2k`` on
    ``[k pi/m, (k+1) pi/m]``, all times ``scale``; softmax cross-entropy. The norms are part
    of the logits, so there is no ``normalize`` option. Class weights start as PML's, N(0, 1).
    With several vectors per class (a wrapper resizing the bank), a class's cosine is its most
    similar vector's, and that vector's norm scales its logit. Equal to PML's
    ``LargeMarginSoftmaxLoss``; the paper anneals a softmax mix-in during training, which
    neither PML nor dmlkit does.

    Args:
        num_classes: training classes (supplied by the trainer).
        embedding_size: embedding dimension (supplied by the trainer).
        margin: the integer angular multiplier m (1 is plain softmax).
        scale: factor on every logit.
        lr_multiplier: factor on the base learning rate for the class weights.
        proxy_init: a proxy initializer for the class weights, a name or ``{name = ..., options}``; empty for random.
        pool_rounds: training samples embedded per class for the initializer.
    """

    loss_name = "large_margin_softmax"

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: int = 4,
        scale: float = 1.0,
        lr_multiplier: float = 1.0,
        proxy_init: str | dict = "",
        pool_rounds: int = 8,
    ):
        super().__init__(num_classes, embedding_size, 1, lr_multiplier, proxy_init, pool_rounds)
        _check(
            isinstance(margin, int) and not isinstance(margin, bool) and margin >= 1,
            f"margin must be an integer >= 1 (the angle multiplier m); got {margin!r}",
        )
        _check(scale > 0, f"scale must be > 0; got {scale}")
        self.margin, self.scale = margin, scale

    def target_cosine(self, cos):
        # cos(m theta) as the Chebyshev polynomial T_m(cos theta): the paper's equation 7
        prev, cur = torch.ones_like(cos), cos
        for _ in range(self.margin - 1):
            prev, cur = cur, 2 * cos * cur - prev
        with torch.no_grad():
            k = torch.floor(torch.acos(cos.clamp(-1, 1)) / (math.pi / self.margin))
        return (1 - 2 * torch.remainder(k, 2)) * cur - 2 * k

    def scale_logits(self, logits, emb, w, best):
        norms = w.norm(dim=1)  # [C*K]
        if best is None:
            w_norm = norms[None, :]
        else:  # the norm of each class's chosen vector
            k = self.bank.per_class
            w_norm = norms.view(-1, k).expand(len(emb), -1, -1).gather(2, best[..., None])[..., 0]
        return logits * w_norm * emb.norm(dim=1, keepdim=True) * self.scale


class SphereFaceLoss(LargeMarginSoftmaxLoss):
    """SphereFace, A-Softmax (Liu, Wen, Yu, Li, Raj, Song, "SphereFace: Deep Hypersphere
    Embedding for Face Recognition", CVPR 2017).

    L-Softmax with normalised class weights: logits ``|x| cos(theta_c)``, the target's
    ``|x| psi(theta_y)``, times ``scale``. Equal to PML's ``SphereFaceLoss``; the paper
    anneals a softmax mix-in during training, which neither PML nor dmlkit does.

    Args:
        num_classes: training classes (supplied by the trainer).
        embedding_size: embedding dimension (supplied by the trainer).
        margin: the integer angular multiplier m (1 is plain normalised-weight softmax).
        scale: factor on every logit.
        lr_multiplier: factor on the base learning rate for the class weights.
        proxy_init: a proxy initializer for the class weights, a name or ``{name = ..., options}``; empty for random.
        pool_rounds: training samples embedded per class for the initializer.
    """

    loss_name = "sphereface"

    def scale_logits(self, logits, emb, w, best):
        return logits * emb.norm(dim=1, keepdim=True) * self.scale


class CosFaceLoss(MarginSoftmaxLoss):
    """CosFace, large-margin cosine loss (Wang et al., "CosFace: Large Margin Cosine Loss for Deep
    Face Recognition", CVPR 2018).

    Logits ``scale * cos(theta_c)``, the target's ``scale * (cos(theta_y) - margin)``; softmax
    cross-entropy. Class weights start as PML's, N(0, 1). With several vectors per class (a
    wrapper resizing the bank), a class's cosine is its most similar vector's. Equal to PML's
    ``CosFaceLoss`` (PML's defaults: the paper uses scale 64 and margin 0.35 too).

    Args:
        num_classes: training classes (supplied by the trainer).
        embedding_size: embedding dimension (supplied by the trainer).
        margin: subtracted from the target class's cosine.
        scale: factor on the cosines.
        normalize: cosine similarity (True) or the dot product of the vectors as they are (False, CCP's unit ball).
        lr_multiplier: factor on the base learning rate for the class weights.
        proxy_init: a proxy initializer for the class weights, a name or ``{name = ..., options}``; empty for random.
        pool_rounds: training samples embedded per class for the initializer.
    """

    loss_name = "cosface"

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 0.35,
        scale: float = 64.0,
        normalize: bool = True,
        lr_multiplier: float = 1.0,
        proxy_init: str | dict = "",
        pool_rounds: int = 8,
    ):
        super().__init__(num_classes, embedding_size, 1, lr_multiplier, proxy_init, pool_rounds)
        _check(margin >= 0, f"margin must be >= 0; got {margin}")
        _check(scale > 0, f"scale must be > 0; got {scale}")
        self.margin, self.scale, self.normalize = margin, scale, normalize

    def target_cosine(self, cos):
        return cos - self.margin


class ArcFaceLoss(MarginSoftmaxLoss):
    """ArcFace, additive angular margin (Deng, Guo, Xue, Zafeiriou, "ArcFace: Additive Angular
    Margin Loss for Deep Face Recognition", CVPR 2019).

    Logits ``scale * cos(theta_c)``, the target's ``scale * cos(theta_y + m)`` while
    ``theta_y <= pi - m``, and ``scale * (cos(theta_y) - m sin(m))`` beyond (keeping the logit
    decreasing in the angle); ``margin`` is in degrees (PML's 28.6 = 0.5 rad, the paper's
    0.5). Class weights start as PML's, N(0, 1). With several vectors per class (a wrapper
    resizing the bank) a class's cosine is its most similar vector's, which is sub-center
    ArcFace (``subcenter_arcface``). Equal to PML's ``ArcFaceLoss``.

    Args:
        num_classes: training classes (supplied by the trainer).
        embedding_size: embedding dimension (supplied by the trainer).
        margin: the additive angular margin, in degrees.
        scale: factor on the cosines.
        normalize: cosine similarity (True) or the dot product of the vectors as they are (False, CCP's unit ball).
        lr_multiplier: factor on the base learning rate for the class weights.
        proxy_init: a proxy initializer for the class weights, a name or ``{name = ..., options}``; empty for random.
        pool_rounds: training samples embedded per class for the initializer.
    """

    loss_name = "arcface"

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 28.6,
        scale: float = 64.0,
        normalize: bool = True,
        lr_multiplier: float = 1.0,
        proxy_init: str | dict = "",
        pool_rounds: int = 8,
    ):
        super().__init__(num_classes, embedding_size, 1, lr_multiplier, proxy_init, pool_rounds)
        _check(0 <= margin < 180, f"margin is an angle in degrees, in [0, 180); got {margin}")
        _check(scale > 0, f"scale must be > 0; got {scale}")
        self.margin, self.scale, self.normalize = margin, scale, normalize

    def target_cosine(self, cos):
        m = math.radians(self.margin)
        theta = torch.acos(cos.clamp(-1, 1))
        return torch.where(theta <= math.pi - m, torch.cos(theta + m), torch.cos(theta) - m * math.sin(m))


class SubCenterArcFaceLoss(ArcFaceLoss):
    """Sub-center ArcFace (Deng, Guo, Liu, Gong, Zafeiriou, "Sub-center ArcFace: Boosting Face
    Recognition by Large-scale Noisy Web Faces", ECCV 2020).

    ArcFace with ``sub_centers`` vectors per class; a class's cosine is its most similar
    sub-center's. :meth:`get_outliers` finds each class's dominant sub-center and the samples
    farther than ``threshold`` degrees from it (the paper's data cleaning). Equal to PML's
    ``SubCenterArcFaceLoss``; the bank holds the sub-centers (``bank.per_class``), so CCP can
    resize and re-initialise them.

    Args:
        num_classes: training classes (supplied by the trainer).
        embedding_size: embedding dimension (supplied by the trainer).
        margin: the additive angular margin, in degrees.
        scale: factor on the cosines.
        sub_centers: vectors per class (K).
        normalize: cosine similarity (True) or the dot product of the vectors as they are (False, CCP's unit ball).
        lr_multiplier: factor on the base learning rate for the sub-centers.
        proxy_init: a proxy initializer for the sub-centers, a name or ``{name = ..., options}``; empty for random.
        pool_rounds: training samples embedded per class for the initializer.
    """

    loss_name = "subcenter_arcface"

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 28.6,
        scale: float = 64.0,
        sub_centers: int = 3,
        normalize: bool = True,
        lr_multiplier: float = 1.0,
        proxy_init: str | dict = "",
        pool_rounds: int = 8,
    ):
        _check(sub_centers >= 1, f"sub_centers must be >= 1; got {sub_centers}")
        super().__init__(num_classes, embedding_size, margin, scale, normalize, lr_multiplier, proxy_init, pool_rounds)
        self.bank.resize(sub_centers)

    @property
    def sub_centers(self) -> int:
        return self.bank.per_class

    @torch.no_grad()
    def get_outliers(
        self, embeddings: Tensor, labels: Tensor, threshold: float = 75.0, return_dominant_centers: bool = True
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Samples far from their class's dominant sub-center.

        For each class in ``labels``, the dominant sub-center is the one most of its samples are
        nearest to (ties: the first); a sample is an outlier when its angle to its class's
        dominant sub-center exceeds ``threshold`` degrees. Returns the outliers' indices, grouped
        by class in label order and ascending within a class (PML's order), and with
        ``return_dominant_centers`` also the dominant sub-centers [C, D], one row per class
        (bank row order), NaN for a class absent from ``labels``.

        Differs from PML, whose ``get_outliers`` returns the pair even when
        ``return_dominant_centers=False``, and its dominant centers as [D, C] with uninitialised
        memory in the columns of absent classes.
        """
        emb = _as_float(embeddings)
        rows = self.bank.rows(labels.to(emb.device))
        k = self.bank.per_class
        w = self.weights(emb.dtype).view(self.num_classes, k, -1)  # [C, K, D]
        sim = torch.einsum("nd,nkd->nk", *self._pair(emb, w[rows]))  # [N, K] to the own class's sub-centers
        nearest = sim.argmax(1)
        counts = torch.bincount(rows * k + nearest, minlength=self.num_classes * k).view(-1, k)
        dominant = counts.argmax(1)  # [C]; the first sub-center on ties
        own = sim.gather(1, dominant[rows][:, None])[:, 0]
        outliers = (own < math.cos(math.radians(threshold))).nonzero()[:, 0]
        outliers = outliers[torch.sort(rows[outliers], stable=True).indices]
        if not return_dominant_centers:
            return outliers
        centers = w[torch.arange(self.num_classes, device=w.device), dominant].clone()
        centers[counts.sum(1) == 0] = math.nan
        return outliers, centers

    def _pair(self, emb: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        if self.normalize:
            return F.normalize(emb, dim=-1), F.normalize(w, dim=-1)
        return emb, w


# ============================================================================ normalized softmax
class NormalizedSoftmaxLoss(ClassifierLoss):
    """Normalized softmax (Zhai & Wu, "Classification is a Strong Baseline for Deep Metric
    Learning", BMVC 2019; NormFace, Wang et al., ACM MM 2017).

    Softmax cross-entropy over ``cos(x, w_c) / temperature``. Class weights start as PML's,
    N(0, 1). With several vectors per class (a wrapper resizing the bank), a class's cosine is
    its most similar vector's. Equal to PML's ``NormalizedSoftmaxLoss``. (``softmax`` with
    ``normalized=true`` is the same logits with ``scale = 1/temperature`` but its own weight
    initialisation and multi-vector rule.)

    Args:
        num_classes: training classes (supplied by the trainer).
        embedding_size: embedding dimension (supplied by the trainer).
        temperature: divides the cosines (the paper's 0.05).
        normalize: cosine similarity (True) or the dot product of the vectors as they are (False, CCP's unit ball).
        lr_multiplier: factor on the base learning rate for the class weights.
        proxy_init: a proxy initializer for the class weights, a name or ``{name = ..., options}``; empty for random.
        pool_rounds: training samples embedded per class for the initializer.
    """

    loss_name = "normalized_softmax"

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        temperature: float = 0.05,
        normalize: bool = True,
        lr_multiplier: float = 1.0,
        proxy_init: str | dict = "",
        pool_rounds: int = 8,
    ):
        super().__init__(num_classes, embedding_size, 1, lr_multiplier, proxy_init, pool_rounds)
        _check(temperature > 0, f"temperature must be > 0; got {temperature}")
        self.temperature, self.normalize = temperature, normalize

    def logits(self, emb, w):
        return self.class_similarity(emb, w)[0] / self.temperature

    def sample_losses(self, emb, rows):
        return F.cross_entropy(self.logits(emb, self.weights(emb.dtype)), rows, reduction="none")


# ==================================================================================== soft triple
class _SoftAssign(torch.autograd.Function):
    """sum_k softmax(s / gamma)_k s_k over the last axis, with a backward that keeps one [N, C, K]
    tensor (autograd's would keep several): d/ds_k = p_k (1 + (s_k - out) / gamma)."""

    @staticmethod
    def forward(ctx, s: Tensor, gamma: float) -> Tensor:
        p = torch.softmax(s / gamma, dim=2)
        out = (p * s).sum(2)
        ctx.save_for_backward(s, p, out)
        ctx.gamma = gamma
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        s, p, out = ctx.saved_tensors
        g = (s - out[..., None]).div_(ctx.gamma).add_(1).mul_(p).mul_(grad[..., None])
        return g, None


class SoftTripleLoss(ClassifierLoss):
    """SoftTriple loss (Qian, Shang, Sun, Hu, Li, Jin, "SoftTriple Loss: Deep Metric Learning
    Without Triplet Sampling", ICCV 2019).

    Each class has K centers; the similarity to class c is ``sum_k softmax_k(s_ck / gamma)
    s_ck`` with ``s_ck`` the cosine to center k, and the loss is softmax cross-entropy over
    ``la * (similarity - margin [c = y])``. Centers start as PML's (Kaiming-uniform). Equal to
    PML's ``SoftTripleLoss``; ``tau`` adds the paper's regulariser on same-class centers,
    ``tau * sum_c sum_{j<k} sqrt(2 + 1e-5 - 2 <w_cj, w_ck>) / (C K (K - 1))`` (the authors'
    code; paper default 0.2), which PML 2.9 lacks (so 0 here). The paper trains the centers at
    100 times the network's learning rate (``lr_multiplier``).

    Args:
        num_classes: training classes (supplied by the trainer).
        embedding_size: embedding dimension (supplied by the trainer).
        centers_per_class: K, the centers of each class.
        la: the scale lambda of the logits.
        gamma: the temperature of the soft assignment to a class's centers.
        margin: the margin delta subtracted from the target class's similarity.
        tau: weight of the regulariser that merges a class's centers (the paper's 0.2; 0 is PML).
        normalize: cosine similarity (True) or the dot product of the vectors as they are (False, CCP's unit ball).
        lr_multiplier: factor on the base learning rate for the centers.
        proxy_init: a proxy initializer for the centers, a name or ``{name = ..., options}``; empty for random.
        pool_rounds: training samples embedded per class for the initializer.
    """

    loss_name = "soft_triple"

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        centers_per_class: int = 10,
        la: float = 20.0,
        gamma: float = 0.1,
        margin: float = 0.01,
        tau: float = 0.0,
        normalize: bool = True,
        lr_multiplier: float = 100.0,
        proxy_init: str | dict = "",
        pool_rounds: int = 10,
    ):
        _check(centers_per_class >= 1, f"centers_per_class must be >= 1; got {centers_per_class}")
        super().__init__(num_classes, embedding_size, centers_per_class, lr_multiplier, proxy_init, pool_rounds)
        _check(la > 0, f"la must be > 0; got {la}")
        _check(gamma > 0, f"gamma must be > 0; got {gamma}")
        _check(margin >= 0, f"margin must be >= 0; got {margin}")
        _check(tau >= 0, f"tau must be >= 0; got {tau}")
        self.la, self.gamma, self.margin, self.tau, self.normalize = la, gamma, margin, tau, normalize
        with torch.no_grad():  # PML's kaiming_uniform_(a=sqrt(5)) on [D, C*K]: U(-b, b), b = 1/sqrt(C*K)
            bound = 1.0 / math.sqrt(num_classes * centers_per_class)
            self.bank.vectors.uniform_(-bound, bound)

    @property
    def centers_per_class(self) -> int:
        return self.bank.per_class

    def logits(self, emb, w):
        """[N, C] each class's soft-assigned similarity (PML's ``get_logits``: without la or margin)."""
        sim = self.similarity(emb, w).view(len(emb), self.num_classes, self.bank.per_class)
        return _SoftAssign.apply(sim, self.gamma)

    def sample_losses(self, emb, rows):
        w = self.weights(emb.dtype)
        z = self.la * self.logits(emb, w)
        z = z.scatter_add(1, rows[:, None], torch.full_like(z[:, :1], -self.la * self.margin))
        return F.cross_entropy(z, rows, reduction="none")

    def compute(self, emb, labels, ref, ref_labels, indices):
        loss = super().compute(emb, labels, ref, ref_labels, indices)
        k = self.bank.per_class
        if self.tau == 0 or k == 1:
            return loss
        w = self.weights(emb.dtype).view(self.num_classes, k, -1)
        if self.normalize:
            w = F.normalize(w, dim=2)
        sim = w @ w.transpose(1, 2)  # [C, K, K]
        upper = torch.ones(k, k, dtype=torch.bool, device=w.device).triu(1)
        reg = torch.sqrt(2.0 + 1e-5 - 2.0 * sim[:, upper]).sum() / (self.num_classes * k * (k - 1))
        return loss + self.tau * reg


# ======================================================================================= p2sgrad
class P2SGradLoss(ClassifierLoss):
    """P2SGrad (Zhang, Zhao, Yan, Li, Liu, Wang, Huang, "P2SGrad: Refined Gradients for Optimizing
    Deep Face Models", CVPR 2019).

    The mean squared error between the cosines ``cos(x, w_c)`` (clamped to [-1, 1]) and the
    one-hot target, over samples and classes: the loss whose gradient is the paper's
    equation 11. As in PML and the authors' code, the class weights are projected onto the unit
    sphere, in place, before each call (so their gradient is not projected); their start is
    PML's, uniform in [-1, 1] then unit-normalised. With several vectors per class (a wrapper
    resizing the bank), a class's cosine is its most similar vector's. Equal to PML's
    ``P2SGradLoss``, which refuses mined tuples: here they weight the samples as in the other
    losses of this family. PML 2.9 has no ``get_logits`` for it; here it gives the cosines.

    Args:
        num_classes: training classes (supplied by the trainer).
        embedding_size: embedding dimension (supplied by the trainer).
        normalize: divide by the embedding's norm (True), or use the vectors as they are (False, CCP's unit ball).
        lr_multiplier: factor on the base learning rate for the class weights.
        proxy_init: a proxy initializer for the class weights, a name or ``{name = ..., options}``; empty for random.
        pool_rounds: training samples embedded per class for the initializer.
    """

    loss_name = "p2sgrad"

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        normalize: bool = True,
        lr_multiplier: float = 1.0,
        proxy_init: str | dict = "",
        pool_rounds: int = 8,
    ):
        super().__init__(num_classes, embedding_size, 1, lr_multiplier, proxy_init, pool_rounds)
        self.normalize = normalize
        with torch.no_grad():
            self.bank.vectors.uniform_(-1, 1)
            self.project()

    @torch.no_grad()
    def project(self) -> None:
        """Rows of norm above 1e-5 onto the unit sphere, in place (PML's ``renorm(2, 1, 1e-5).mul(1e5)``)."""
        self.bank.vectors.view(-1, self.bank.dim).renorm_(2, 0, 1e-5).mul_(1e5)

    def similarity(self, x, w):
        return scaled_product(x, w) if self.normalize else x @ w.T  # PML's (x w) / |x|

    def logits(self, emb, w):
        """[N, C] the clamped cosines to the class weights (unit-normalised, as each call projects them)."""
        return self.class_similarity(emb, F.normalize(w, dim=1))[0].clamp(-1, 1)

    def sample_losses(self, emb, rows):
        self.project()  # then the weights are used as they are: their gradient is PML's, not projected
        cos = self.class_similarity(emb, self.weights(emb.dtype))[0].clamp(-1, 1)
        # mean_c (cos_c - [c = y])^2 without a one-hot [N, C] tensor
        return (cos.square().sum(1) - 2 * cos.gather(1, rows[:, None])[:, 0] + 1) / cos.shape[1]


# ====================================================================================== manifold
class ManifoldLoss(ClassWeightLoss):
    """Manifold similarity loss with proxies (Aziere & Todorovic, "Ensemble Deep Manifold
    Similarity Learning using Hard Proxies", CVPR 2019).

    The batch and the proxies form one graph: ``S_ij = exp(max(cos_ij, 0) / 0.5)`` off the
    diagonal, ``S_bar = D^-1/2 S D^-1/2``, and the random walk's closed form
    ``F = (1 - alpha) (I - alpha S_bar)^-1`` gives each sample's affinity ``F_ik`` to proxy k.
    With c(i) the sample's own proxy, the intrinsic loss is the mean of
    ``log(1 + sum_{k != c(i)} exp([F_ik - F_ic(i) + margin]_+))`` over the terms that violate
    (only ``[.]_+ > 0`` enters), the context loss the same on ``cos(F_i, F_k)`` between rows of
    F, and the loss ``intrinsic + lambdaC * context``.

    Each class has its own proxy, so c(i) is the proxy of the sample's label: equal to PML's
    ``ManifoldLoss`` with ``K = num_classes`` proxies and the labels passed as its proxy
    assignments (PML takes no class labels: without assignments it draws random ones each call,
    which this loss never does). The graph has N + C nodes and the loss inverts an
    (N + C)-square matrix, so its cost grows as (N + C)^3: thousands of classes are slow (in PML
    as well). With several proxies per class (``proxies_per_class``, or CCP resizing the bank),
    c(i) is the class's proxy with the largest affinity and the class's other proxies leave both
    sums. ``lambdaC = inf`` keeps the context loss alone, as PML's documentation says (PML then
    returns inf or nan). Mined tuples weight each sample's terms as in the other losses here
    (PML takes its ``indices_tuple`` as proxy assignments). Proxies start as PML's, N(0, 1).

    Args:
        num_classes: training classes (supplied by the trainer).
        embedding_size: embedding dimension (supplied by the trainer).
        lambdaC: weight of the context loss (inf: the context loss alone).
        alpha: the random walk's propagation factor, in (0, 1).
        margin: the margin m in both losses.
        proxies_per_class: proxies of each class; the one with the largest affinity is a sample's own.
        normalize: cosine similarity (True) or the dot product of the vectors as they are (False, CCP's unit ball).
        lr_multiplier: factor on the base learning rate for the proxies.
        proxy_init: a proxy initializer, a name or ``{name = ..., options}``; empty for random.
        pool_rounds: training samples embedded per class for the initializer.
    """

    loss_name = "manifold"

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        lambdaC: float = 1.0,  # noqa: N803 (PML's option name)
        alpha: float = 0.8,
        margin: float = 5e-4,
        proxies_per_class: int = 1,
        normalize: bool = True,
        lr_multiplier: float = 1.0,
        proxy_init: str | dict = "",
        pool_rounds: int = 8,
    ):
        _check(proxies_per_class >= 1, f"proxies_per_class must be >= 1; got {proxies_per_class}")
        super().__init__(num_classes, embedding_size, proxies_per_class, lr_multiplier, proxy_init, pool_rounds)
        _check(lambdaC >= 0, f"lambdaC must be >= 0 (inf: the context loss alone); got {lambdaC}")
        _check(0 < alpha < 1, f"alpha must be in (0, 1); got {alpha}")
        _check(0 <= margin < math.inf, f"margin must be a finite number >= 0; got {margin}")
        self.lambdaC, self.alpha, self.margin, self.normalize = lambdaC, alpha, margin, normalize

    @property
    def proxies_per_class(self) -> int:
        return self.bank.per_class

    def sample_losses(self, emb, rows):
        n = len(emb)
        z = torch.cat([emb, self.weights(emb.dtype)])
        if self.normalize:
            z = F.normalize(z, dim=1)
        s = torch.exp((z @ z.T).clamp_min(0) / 0.5)
        eye = torch.eye(len(z), dtype=z.dtype, device=z.device)
        s = s.masked_fill(eye.bool(), 0)
        d = s.sum(1).rsqrt()
        affinity = (1 - self.alpha) * torch.linalg.inv(eye - self.alpha * (d[:, None] * s * d[None, :]))
        f_int = affinity[:n, n:]  # [N, C*K] sample-to-proxy affinities
        # the context: cosine between a sample's row of F and each proxy's row
        rows_f = F.normalize(affinity, dim=1)
        f_ctx = rows_f[:n] @ rows_f[n:].T
        own, keep = self._own_proxy(f_int, rows)
        out = 0.0 if math.isinf(self.lambdaC) else self._hinge(f_int, own, keep)
        if self.lambdaC == 0:
            return out
        ctx = self._hinge(f_ctx, own, keep)
        return ctx if math.isinf(self.lambdaC) else out + self.lambdaC * ctx

    def _own_proxy(self, f_int: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """[N] each sample's own proxy column, [N, C*K] the columns that may enter its sums."""
        k = self.bank.per_class
        cols = torch.arange(f_int.shape[1], device=f_int.device)
        if k == 1:
            own = rows
            keep = cols[None, :] != own[:, None]
        else:
            with torch.no_grad():
                own_class = f_int.view(len(f_int), -1, k)[torch.arange(len(f_int)), rows]  # [N, K]
                own = rows * k + own_class.argmax(1)
            keep = (cols[None, :] // k) != rows[:, None]
        return own, keep

    def _hinge(self, f: Tensor, own: Tensor, keep: Tensor) -> Tensor:
        v = f - f.gather(1, own[:, None]) + self.margin
        return _log1p_sum_exp(v, keep & (v >= 0))


# ====================================================================================== register
@dmlkit.hookimpl
def register_losses(register):
    spec = dmlkit.ComponentSpec
    register(spec("arcface", ArcFaceLoss, "ArcFace additive angular margin softmax (Deng et al. 2019)"))
    register(spec("cosface", CosFaceLoss, "CosFace large-margin cosine softmax (Wang et al. 2018)"))
    register(spec("sphereface", SphereFaceLoss, "SphereFace angular softmax, A-Softmax (Liu et al. 2017)"))
    register(
        spec(
            "large_margin_softmax",
            LargeMarginSoftmaxLoss,
            "Large-margin softmax, L-Softmax (Liu et al. 2016)",
            aliases=("lsoftmax",),
        )
    )
    register(
        spec(
            "subcenter_arcface",
            SubCenterArcFaceLoss,
            "Sub-center ArcFace with outlier detection (Deng et al. 2020)",
            aliases=("sub_center_arcface",),
        )
    )
    register(
        spec(
            "normalized_softmax",
            NormalizedSoftmaxLoss,
            "Normalized softmax with a temperature (Zhai & Wu 2019)",
        )
    )
    register(
        spec(
            "soft_triple",
            SoftTripleLoss,
            "SoftTriple: softmax over K centers per class (Qian et al. 2019)",
            aliases=("softtriple",),
        )
    )
    register(spec("p2sgrad", P2SGradLoss, "P2SGrad: cosine-to-one-hot squared error (Zhang et al. 2019)"))
    register(
        spec(
            "manifold",
            ManifoldLoss,
            "Manifold similarity loss with proxies, random-walk affinities (Aziere & Todorovic 2019)",
        )
    )
