"""Embedding images/s: dmlkit's one embedding loop (:func:`dmlkit.embedding.embed_dataset`, what
evaluation, the feature cache, the proxy pool, ``embed`` and ``index`` run) against the best bare
PyTorch loop over the same model and the same in-memory images, with batch sizes and memory
formats swept. Images are synthetic tensors already transformed, so the loop's own cost is
measured, not JPEG decoding.

    python bench/embed_bench.py                       # CPU: smallcnn, resnet18, efficientnet_lite0, timm ViT
    python bench/embed_bench.py --images 256 --backbones resnet18 --out embed.json

Rounds alternate the bare loops and dmlkit's, and each number is the median of ``--rounds``
rounds, so that drift in the machine's speed hits all alike. ``ratio`` = dmlkit / best bare.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402

from dmlkit import get_registry  # noqa: E402
from dmlkit.embedding import embed_dataset  # noqa: E402
from dmlkit.model import EmbeddingHead, EmbeddingModel  # noqa: E402

#: backbone -> (options, channels, image size)
BACKBONES = {
    "smallcnn": ({}, 1, 56),
    "resnet18": ({"pretrained": False}, 3, 224),
    "efficientnet_lite0": ({"pretrained": False}, 3, 224),
    "timm_vit": ({"model": "vit_tiny_patch16_224", "pretrained": False}, 3, 224),
}


def build(name: str) -> torch.nn.Module:
    options, channels, _ = BACKBONES[name]
    backbone = get_registry().build("backbone", "timm" if name.startswith("timm") else name, **options)
    with torch.no_grad():
        probe = backbone(torch.zeros(1, channels, 64 if name != "timm_vit" else 224, 64 if name != "timm_vit" else 224))
    features = probe.shape[1]
    return EmbeddingModel(backbone, EmbeddingHead(features, 128)).eval()


def bare(model: torch.nn.Module, images: torch.Tensor, batch: int, channels_last: bool) -> float:
    """images/s of the plainest loop: inference mode, one forward per batch."""
    m = (
        model.to(memory_format=torch.channels_last)
        if channels_last
        else model.to(memory_format=torch.contiguous_format)
    )
    start = time.perf_counter()
    with torch.inference_mode():
        for x in images.split(batch):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            m(x)
    return len(images) / (time.perf_counter() - start)


def dmlkit_loop(model: torch.nn.Module, images: torch.Tensor, batch: int) -> float:
    model.to(memory_format=torch.contiguous_format)  # as the trainer leaves it on a CPU
    data = TensorDataset(images, torch.zeros(len(images), dtype=torch.long))
    start = time.perf_counter()
    embed_dataset(model, data, device=torch.device("cpu"), batch_size=batch, model=model)  # as the trainer calls it
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", default=",".join(BACKBONES))
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--batches", default="16,32,64,256", help="bare loop batch sizes swept")
    p.add_argument("--eval-batch", type=int, default=256, help="dmlkit's batch size (train.eval_batch_size)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="")
    args = p.parse_args()
    result = {"machine": machine(), "images": args.images, "rows": []}
    for name in args.backbones.split(","):
        try:
            model = build(name)
        except Exception as exc:  # e.g. timm absent
            print(f"{name}: skipped ({type(exc).__name__}: {exc})", flush=True)
            continue
        _, channels, size = BACKBONES[name]
        images = torch.randn(args.images, channels, size, size)
        configs = [(b, cl) for b in map(int, args.batches.split(",")) for cl in (False, True)]
        bare_rates: dict[tuple[int, bool], list[float]] = {c: [] for c in configs}
        ours: list[float] = []
        bare(model, images[:8], 8, False)  # warm-up
        for _ in range(args.rounds):
            for c in configs:
                bare_rates[c].append(bare(model, images, *c))
            ours.append(dmlkit_loop(model, images, args.eval_batch))
        medians = {c: statistics.median(v) for c, v in bare_rates.items()}
        best = max(medians, key=medians.get)
        row = {
            "backbone": name,
            "image_size": size,
            "bare": {f"batch{b}{'_channels_last' if cl else ''}": round(v, 1) for (b, cl), v in medians.items()},
            "best_bare": f"batch {best[0]}, {'channels_last' if best[1] else 'contiguous'}",
            "best_bare_images_per_s": round(medians[best], 1),
            "dmlkit_images_per_s": round(statistics.median(ours), 1),
            "ratio": round(statistics.median(ours) / medians[best], 3),
        }
        result["rows"].append(row)
        print(row, flush=True)
    save(result, args.out)


if __name__ == "__main__":
    main()
