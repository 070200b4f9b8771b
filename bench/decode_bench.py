"""Is JPEG decoding on the CPU embedding loop's critical path? Images/s of PIL and of torchvision's
decoder (``torchvision.io.decode_jpeg``) on the same files, one thread, alone and followed by the
test transform a run applies (resize, centre crop, to tensor, normalise), beside the backbone's
own images/s.

    python bench/decode_bench.py --images ../shared/data/CUB_200_2011/images --out decode.json

Rounds alternate between the decoders so that other load on the machine affects both alike; the
median of ``--rounds`` is reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", required=True)
    ap.add_argument("--count", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    files = sorted(Path(args.images).rglob("*.jpg"))[: args.count]
    if not files:
        ap.error(f"no .jpg files under {args.images}")
    norm = v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    resize = [v2.Resize(args.size, antialias=True), v2.CenterCrop(args.size)]
    pil_tf = v2.Compose([*resize, v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), norm])
    tv_tf = v2.Compose([*resize, v2.ToDtype(torch.float32, scale=True), norm])

    def pil(f: Path) -> Image.Image:
        with Image.open(f) as im:
            return im.convert("RGB")

    def tv(f: Path) -> torch.Tensor:
        return decode_jpeg(read_file(str(f)), mode=ImageReadMode.RGB)

    cases = {
        "PIL decode": pil,
        "torchvision decode": tv,
        "PIL decode + transform": lambda f: pil_tf(pil(f)),
        "torchvision decode + transform": lambda f: tv_tf(tv(f)),
    }
    for fn in cases.values():  # warm-up
        for f in files[:20]:
            fn(f)
    rates: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            start = time.perf_counter()
            for f in files:
                fn(f)
            rates[name].append(len(files) / (time.perf_counter() - start))
    with Image.open(files[0]) as im:
        size = im.size
    rows = [
        {"case": k, "images_per_s": statistics.median(v), "rounds": [round(x, 1) for x in v]} for k, v in rates.items()
    ]
    for r in rows:
        print(f"{r['case']:32} {r['images_per_s']:8.0f} images/s (median of {args.rounds}, one thread)")
    save({**machine(), "args": vars(args), "first_image_size": size, "rows": rows}, args.out) if args.out else None


if __name__ == "__main__":
    main()
