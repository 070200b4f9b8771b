"""Forward + backward time per step of each loss (and miner), beside pytorch-metric-learning.

    python bench/loss_bench.py                 # batch 256 and 1024, D=512, 100 and 11,318 classes
    python bench/loss_bench.py --quick         # batch 256 only, fewer repeats
    python bench/loss_bench.py --out r.json

Labels are 4 samples per class (as an m_per_class sampler gives); proxy losses own one
proxy per class. Times are medians over repeats after warm-up, with CUDA synchronised; dmlkit
and PML take turns step by step, so that a shared machine's load falls on both alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402

from dmlkit import get_registry


def cases(num_classes: int, dim: int):
    """(name, build dmlkit (loss, miner), build PML (loss, miner) or None)."""
    reg = get_registry()
    ctx = {"num_classes": num_classes, "embedding_size": dim}
    try:
        from pytorch_metric_learning import distances, losses, miners
    except ImportError:
        losses = None

    def pml(fn):
        return fn if losses is not None else None

    return [
        (
            "proxynca",
            lambda: (reg.build("loss", "proxynca", context=ctx), None),
            pml(lambda: (losses.ProxyNCALoss(num_classes, dim, softmax_scale=9), None)),
        ),
        (
            "proxy_anchor",
            lambda: (reg.build("loss", "proxy_anchor", context=ctx), None),
            pml(lambda: (losses.ProxyAnchorLoss(num_classes, dim, margin=0.1, alpha=32), None)),
        ),
        (
            "multi_similarity",
            lambda: (reg.build("loss", "multi_similarity"), None),
            pml(lambda: (losses.MultiSimilarityLoss(2, 50, 0.5), None)),
        ),
        (
            "contrastive",
            lambda: (reg.build("loss", "contrastive"), None),
            pml(lambda: (losses.ContrastiveLoss(0.0, 0.5), None)),
        ),
        (
            "triplet (all triplets)",
            lambda: (reg.build("loss", "triplet", reduction="mean_nonzero"), None),
            pml(lambda: (losses.TripletMarginLoss(0.2, distance=distances.LpDistance(power=2)), None)),
        ),
        (
            "triplet + semihard",
            lambda: (reg.build("loss", "triplet"), reg.build("miner", "semihard")),
            pml(lambda: (losses.TripletMarginLoss(0.2), miners.TripletMarginMiner(0.2, type_of_triplets="semihard"))),
        ),
        ("ranked_list", lambda: (reg.build("loss", "ranked_list"), None), None),
        *_family_cases(num_classes, dim),
    ]


def _family_cases(num_classes: int, dim: int) -> list:
    """The cases of each loss family's ``bench/loss_cases_<family>.py`` (its ``cases(num_classes, dim)``)."""
    import importlib

    out = []
    for path in sorted(Path(__file__).parent.glob("loss_cases_*.py")):
        out += importlib.import_module(path.stem).cases(num_classes, dim)
    return out


def step_times(sides: list, emb, labels, repeats: int) -> list:
    """Median ms per forward + backward step of each side, a (loss, miner) or None (not run), or the
    MemoryError it raised. The sides take turns step by step (3 warm-up rounds, then ``repeats``),
    so that the load of a shared machine falls on each alike."""
    dev = emb.device
    sides = [side if side is None else (side[0].to(dev), side[1]) for side in sides]
    times: list = [[] for _ in sides]
    for i in range(repeats + 3):
        for k, side in enumerate(sides):
            if side is None or isinstance(times[k], MemoryError):
                continue
            try:
                elapsed = _step(*side, emb, labels)
            except MemoryError as exc:  # a case refuses a PML loss too large for the machine
                times[k] = exc
                continue
            if i >= 3:
                times[k].append(elapsed)
    return [t if isinstance(t, MemoryError) or not t else statistics.median(t) * 1000 for t in times]


def _step(loss, miner, emb, labels) -> float:
    x = emb.detach().clone().requires_grad_(True)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    idx = miner(x, labels) if miner is not None else None
    value = loss(x, labels, indices_tuple=idx) if _is_pml(loss) else loss(x, labels, indices=idx)
    value.backward()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def _is_pml(loss) -> bool:
    return type(loss).__module__.startswith("pytorch_metric_learning")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="")
    ap.add_argument("--losses", default="", help="comma-separated names to run (default: all)")
    ap.add_argument("--classes", default="100,11318", help="comma-separated class counts (default: 100,11318)")
    ap.add_argument("--repeats", type=int, default=0, help="timed rounds per row (default: 5 on a CPU, 30 on a GPU)")
    args = ap.parse_args()
    wanted = {w.strip() for w in args.losses.split(",") if w.strip()}
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    repeats = args.repeats or (5 if args.quick or dev.type == "cpu" else 30)
    batches = (256,) if args.quick else (256, 1024)
    dim = 512
    result = {**machine(), "device": str(dev), "dim": dim, "rows": []}
    for classes in (int(c) for c in args.classes.split(",")):
        for batch in batches:
            g = torch.Generator().manual_seed(0)
            emb = torch.randn(batch, dim, generator=g).to(dev)
            groups = torch.randperm(classes, generator=g)[torch.arange(batch // 4) % classes]  # 4 per class
            labels = groups.repeat_interleave(4).to(dev)
            for name, ours, theirs in cases(classes, dim):
                if wanted and name not in wanted:
                    continue
                ours_ms, pml_ms = step_times([ours(), theirs() if theirs else None], emb, labels, repeats)
                row = {"loss": name, "batch": batch, "classes": classes, "dmlkit_ms": round(ours_ms, 3)}
                if isinstance(pml_ms, MemoryError):
                    row["pml_ms"], row["pml_not_run"] = None, str(pml_ms)
                elif pml_ms is not None:
                    row["pml_ms"] = round(pml_ms, 3)
                    row["speedup"] = round(row["pml_ms"] / row["dmlkit_ms"], 2)
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
    save(result, args.out)


if __name__ == "__main__":
    main()
