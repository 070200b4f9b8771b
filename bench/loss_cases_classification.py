"""Cases of the classification losses (plugins/classification_losses.py) for bench/loss_bench.py:
each dmlkit loss beside its pytorch-metric-learning 2.9 class with the same options (PML's defaults).

The manifold loss inverts an (N + C)-square matrix each step, in PML as in dmlkit, so at 11,318
classes one step takes minutes on a CPU: its case runs up to ``MANIFOLD_MAX_CLASSES`` classes.
"""

from __future__ import annotations

import torch

from dmlkit import get_registry

MANIFOLD_MAX_CLASSES = 2000


class PMLManifold(torch.nn.Module):
    """PML's ManifoldLoss with K = num_classes proxies and the labels as its proxy assignments
    (it takes no class labels), as dmlkit's ``manifold`` defines it."""

    def __init__(self, losses, num_classes: int, dim: int):
        super().__init__()
        self.loss = losses.ManifoldLoss(dim, K=num_classes)

    def forward(self, embeddings, labels, indices=None):
        return self.loss(embeddings, indices_tuple=labels)


def cases(num_classes: int, dim: int) -> list:
    """(name, build dmlkit (loss, miner), build PML (loss, miner) or None)."""
    reg = get_registry()
    ctx = {"num_classes": num_classes, "embedding_size": dim}
    try:
        from pytorch_metric_learning import losses
    except ImportError:
        losses = None

    def ours(name: str):
        return lambda: (reg.build("loss", name, context=ctx), None)

    def pml(make):
        return (lambda: (make(), None)) if losses is not None else None

    out = [
        ("arcface", ours("arcface"), pml(lambda: losses.ArcFaceLoss(num_classes, dim))),
        ("cosface", ours("cosface"), pml(lambda: losses.CosFaceLoss(num_classes, dim))),
        ("sphereface", ours("sphereface"), pml(lambda: losses.SphereFaceLoss(num_classes, dim))),
        (
            "large_margin_softmax",
            ours("large_margin_softmax"),
            pml(lambda: losses.LargeMarginSoftmaxLoss(num_classes, dim)),
        ),
        (
            "subcenter_arcface",
            ours("subcenter_arcface"),
            pml(lambda: losses.SubCenterArcFaceLoss(num_classes=num_classes, embedding_size=dim)),
        ),
        (
            "normalized_softmax",
            ours("normalized_softmax"),
            pml(lambda: losses.NormalizedSoftmaxLoss(num_classes, dim)),
        ),
        ("soft_triple", ours("soft_triple"), pml(lambda: losses.SoftTripleLoss(num_classes, dim))),
        ("p2sgrad", ours("p2sgrad"), pml(lambda: losses.P2SGradLoss(dim, num_classes))),
    ]
    if num_classes <= MANIFOLD_MAX_CLASSES:
        out.append(("manifold", ours("manifold"), pml(lambda: PMLManifold(losses, num_classes, dim))))
    return out


def _one_step(loss, emb: torch.Tensor, labels: torch.Tensor, clock) -> float:
    x = emb.detach().clone().requires_grad_(True)
    pml = type(loss).__module__.startswith("pytorch_metric_learning")
    start = clock()
    value = loss(x, labels, indices_tuple=None) if pml else loss(x, labels)
    value.backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return (clock() - start) * 1000


def main() -> None:
    """Interleaved timing, for a busy machine: each round times one dmlkit step and one PML step,
    in alternating order, so load that comes and goes hits both; reports the medians and the
    median of the per-round ratios PML / dmlkit. The batches are loss_bench.py's. ``--clock cpu``
    measures the process's CPU time instead of wall time (with ``--threads 1``: the work done,
    whatever else runs on the machine)."""
    import argparse
    import json
    import statistics
    import time

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--losses", default="", help="comma-separated names (default: all)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--classes", default="100,11318")
    ap.add_argument("--batches", default="256,1024")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    wanted = {w for w in args.losses.split(",") if w}
    dim = 512
    for classes in map(int, args.classes.split(",")):
        for batch in map(int, args.batches.split(",")):
            g = torch.Generator().manual_seed(0)
            emb = torch.randn(batch, dim, generator=g)
            groups = torch.randperm(classes, generator=g)[torch.arange(batch // 4) % classes]
            labels = groups.repeat_interleave(4)
            for name, ours, theirs in cases(classes, dim):
                if (wanted and name not in wanted) or theirs is None:
                    continue
                a, b = ours()[0], theirs()[0]
                for _ in range(2):  # warm-up
                    _one_step(a, emb, labels, clock), _one_step(b, emb, labels, clock)
                ta, tb = [], []
                for r in range(args.rounds):
                    first, second = (a, b) if r % 2 == 0 else (b, a)
                    t1, t2 = _one_step(first, emb, labels, clock), _one_step(second, emb, labels, clock)
                    ta.append(t1 if first is a else t2)
                    tb.append(t2 if first is a else t1)
                row = {
                    "loss": name,
                    "batch": batch,
                    "classes": classes,
                    "dmlkit_ms": round(statistics.median(ta), 2),
                    "pml_ms": round(statistics.median(tb), 2),
                    "ratio_median": round(statistics.median(y / x for x, y in zip(ta, tb)), 2),
                    "clock": args.clock,
                    "threads": torch.get_num_threads(),
                }
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
