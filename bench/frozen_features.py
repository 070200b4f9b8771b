"""Retrieval with a frozen pretrained backbone's pooled features and no head: the baseline that
training must beat.

    python bench/frozen_features.py --data-root ../shared/data/CUB_200_2011 [--backbone efficientnet_lite0]
    python bench/frozen_features.py --data-root ../shared/data/CUB_200_2011 --save runs/cub-frozen  # + .npy files

Prints P@1 and MAP@R of average, max, their sum (dmlkit's ``avgmax``) and their
concatenation on the test split.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

from dmlkit import get_registry  # noqa: E402
from dmlkit.evaluation import retrieval_metrics  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--dataset", default="cub200")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--save", default="", help="folder to save the average-pooled test features and labels (.npy)")
    args = ap.parse_args()
    reg = get_registry()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = reg.build("backbone", args.backbone, pretrained=True).eval().to(dev)
    data = reg.build("dataset", args.dataset, root=args.data_root, context={"input_spec": net.input_spec})
    avg, mx = [], []
    with torch.no_grad():
        for x, _ in DataLoader(data.test, batch_size=64, num_workers=args.workers):
            f = net(x.to(dev)).float()
            avg.append(f.mean((2, 3)).cpu())
            mx.append(f.amax((2, 3)).cpu())
    a, m = torch.cat(avg), torch.cat(mx)
    if args.save:
        import numpy as np

        Path(args.save).mkdir(parents=True, exist_ok=True)
        np.save(Path(args.save) / "embeddings.npy", a.numpy())
        np.save(Path(args.save) / "labels.npy", data.test.labels)
    out = {**machine(), "dataset": args.dataset, "backbone": args.backbone, "rows": {}}
    for name, feats in (("avg", a), ("max", m), ("avg+max (sum)", a + m), ("avg,max (concat)", torch.cat([a, m], 1))):
        r = retrieval_metrics(feats, data.test.labels)
        out["rows"][name] = {"precision_at_1": r["precision_at_1"], "map_at_r": r["map_at_r"]}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
