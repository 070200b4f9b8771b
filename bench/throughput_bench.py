"""Training images/s: dmlkit's training step against a bare PyTorch loop on the same synthetic
input (the GPU bound), and dmlkit's JPEG loader on real images (the data bound).

Two bare loops: the classifier below (what an image-classification loop reaches), and a loop
over dmlkit's own model, loss and optimizer without the trainer (``trainer_ratio``: the
trainer's own cost, its checks, events and bookkeeping). The three alternate in ``--rounds``
timed rounds and medians are reported, so that drift in the machine's speed hits all alike.

    python bench/throughput_bench.py --quick                       # CPU, resnet18, 64 px
    python bench/throughput_bench.py                               # GPU, resnet50, 224 px, batch 128 and 256, bf16
    python bench/throughput_bench.py --data-root ../shared/data/CUB_200_2011 --workers 14

The bare loop: torchvision ResNet-50 with its 1000-way classifier, channels_last, bf16
autocast, SGD with momentum, cross-entropy. dmlkit: the same backbone with the embedding head
(512-d) and ProxyNCA over 1000 classes, through ``Trainer.train_step`` (the loop's checks,
events and optimizer included).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402

from dmlkit import get_registry  # noqa: E402
from dmlkit.components import optimizer, param_groups  # noqa: E402
from dmlkit.config import default_config, merge, validate  # noqa: E402
from dmlkit.train import Trainer  # noqa: E402


def timed_steps(step, steps: int, warmup: int, batch: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def bare_loop(arch: str, x: torch.Tensor, y: torch.Tensor):
    net = getattr(torchvision.models, arch)(weights=None).to(x.device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def dmlkit_step(arch: str, x: torch.Tensor, y: torch.Tensor, run_dir: Path):
    cfg = merge(
        default_config(),
        {
            "backbone": {"name": arch, "image_size": x.shape[-1]},
            "loss": {"name": "proxynca"},
            "sampler": {"name": "random"},
            "train": {"embedding_size": 512, "optimizer": "sgd", "lr": 0.01, "batch_size": 64, "device": x.device.type},
        },
    )
    trainer = Trainer(validate(cfg, get_registry()), get_registry(), run_dir)
    # the digits split only sets the class count; the steps below get the synthetic batch
    trainer.loss = get_registry().build("loss", "proxynca", context={"num_classes": 1000, "embedding_size": 512})
    trainer.loss.to(x.device)
    trainer.optimizer = optimizer(
        param_groups(trainer.model, trainer.settings, [("loss", trainer.loss)]), trainer.settings
    )
    trainer.model.train()

    def bare_same():  # the same model, loss and optimizer without the trainer: its own cost
        with trainer.autocast():
            emb = trainer.net(x)
        loss = trainer.loss(emb, y)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()

    return (lambda: trainer.train_step(x, y)), bare_same


def jpeg_loader(data_root: str, workers: int, batch: int, batches: int, run_dir: Path) -> dict[str, float]:
    cfg = merge(
        default_config(),
        {
            "dataset": {"name": "cub200", "root": data_root},
            "backbone": {"name": "resnet50", "image_size": 224},
            "loss": {"name": "proxynca"},
            "sampler": {"name": "m_per_class", "m": 4},
            "train": {"batch_size": batch, "num_workers": workers},
        },
    )
    trainer = Trainer(validate(cfg, get_registry()), get_registry(), run_dir)
    seen, start = 0, time.perf_counter()
    for i, (x, _) in enumerate(trainer.loader(trainer.train_split)):
        if i == 1:  # the first batch pays for starting the workers
            seen, start = 0, time.perf_counter()
        seen += len(x)
        if i >= batches:
            break
    return {"loader_images_per_s": seen / (time.perf_counter() - start), "workers": workers, "batch": batch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batches", default="", help="comma-separated (default 128,256; --quick 16)")
    ap.add_argument("--steps", type=int, default=0, help="timed steps (default 30; --quick 3)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating timed rounds; medians reported")
    ap.add_argument("--data-root", default="")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    arch, size = ("resnet18", 64) if args.quick else ("resnet50", 224)
    batches = [int(b) for b in (args.batches or ("16" if args.quick else "128,256")).split(",")]
    steps, warmup = (args.steps or 3, 1) if args.quick else (args.steps or 30, 10)
    result = {**machine(), "arch": arch, "image_size": size, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for batch in batches:
            x = torch.randn(batch, 3, size, size, device=dev).to(memory_format=torch.channels_last)
            y = torch.randint(0, 1000, (batch,), device=dev)
            bare_step = bare_loop(arch, x, y)
            our_step, same_step = dmlkit_step(arch, x, y, Path(tmp) / f"b{batch}")
            # alternate the three in rounds so that drift in the machine's speed hits all alike
            bares, sames, ours_ = [], [], []
            for r in range(args.rounds):
                w = warmup if r == 0 else 0
                bares.append(timed_steps(bare_step, steps, w, batch, dev))
                sames.append(timed_steps(same_step, steps, w, batch, dev))
                ours_.append(timed_steps(our_step, steps, w, batch, dev))
            bare, same, ours = statistics.median(bares), statistics.median(sames), statistics.median(ours_)
            row = {
                "batch": batch,
                "device": str(dev),
                "bare_images_per_s": round(bare, 1),
                "dmlkit_images_per_s": round(ours, 1),
                "ratio": round(ours / bare, 3),
                "same_model_bare_images_per_s": round(same, 1),
                "trainer_ratio": round(ours / same, 3),
                "trainer_round_ratios": [round(o / b, 3) for o, b in zip(ours_, sames)],
            }
            result["rows"].append(row)
            print(row, flush=True)
        if args.data_root:
            row = jpeg_loader(
                args.data_root, args.workers, batches[-1], 20 if not args.quick else 3, Path(tmp) / "jpeg"
            )
            result["jpeg"] = row
            print(row, flush=True)
    save(result, args.out)


if __name__ == "__main__":
    main()
