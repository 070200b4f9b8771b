"""CCP against its base loss at equal budget: C2, multi-similarity, triplet and ProxyNCA, each
alone and wrapped by CCP, several seeds, on the CUB-200-2011 subset.

    python bench/ccp_protocol.py --data-root ../shared/data/CUB_200_2011            # CPU: frozen features
    python bench/ccp_protocol.py --data-root ../shared/data/CUB_200_2011 --full     # GPU: fine-tuning

CPU mode (default): a frozen ImageNet EfficientNet-Lite0 whose pooled (avg+max) features are
cached once per augmentation view (``train.feature_cache``); a linear 1280 -> 128 head and the
loss train on them, batches of 8 classes x 4 images (the paper's), Adam 1e-4 (weight decay
1e-4, clipping at 10 for every run, CCP's recommendation), ``--steps`` steps. ``--full``:
the backbone is fine-tuned too (BatchNorm frozen, backbone at 0.1x), which needs a GPU.

``--preset paper``: the paper's protocol and per-dataset settings instead (``preset=paper`` of the
ccp loss: Adam 1e-5 constant, batch 32 = 8 classes x 4, 128-d, validation every 25 steps, stop
after 60 validations without improvement, weight decay before clipping, norms exempt, value
clipping; the supplement's C2 / triplet / MS settings for CUB), applied alike to the base loss
alone and to CCP, on frozen features or with ``--full``; ``--steps`` is the most steps a run may take. ``--select-patience 3 10 30``
first chooses CCP's plateau patience on validation (the ``--bases``' first loss, seed 100; these
runs never read the test set), then runs the table with the chosen one (the base losses alone
get no such selection: they have no plateau rule).

Every run holds out a quarter of the training classes (class-disjoint) and validates every 25
steps; the reported epoch is the best by validation MAP@R, for the base loss as for CCP; the
test split is read once, at that epoch. Results (test P@1 and MAP@R per run, mean and spread
per method, the number of CCP instances) go to ``--out`` (JSON) and a printed table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402

from dmlkit import get_registry  # noqa: E402
from dmlkit.config import resolve  # noqa: E402
from dmlkit.train import Trainer  # noqa: E402

BASES = ("contrastive", "multi_similarity", "triplet", "proxynca")


def config(args: argparse.Namespace, loss: dict, seed: int) -> dict:
    train = {
        "seed": seed,
        "batch_size": 32,
        "optimizer": "adam",
        "lr": args.lr,
        "weight_decay": 1e-4,
        "grad_clip": 10.0,
        "scheduler": "none",
        "embedding_size": 128,
        "head_init": "random",
        "pooling": "avgmax",
        "val_fraction": 0.25,
        "val_split": "classes",
        "val_every_steps": 25,
        "eval_batch_size": 128,
        "num_workers": 2,
    }
    if args.full:
        train.update(freeze_bn=True, backbone_lr_multiplier=0.1)
    else:
        train.update(freeze_backbone=True, feature_cache=True, cache_views=args.views, cache_dir=args.cache_dir)
    if args.dataset == "digits":  # a smoke test of the code path: small CNN, random frozen weights
        data, backbone = {"name": "digits"}, {"name": "smallcnn"}
        train.update(val_split="samples", pooling="avg")
    else:
        data, backbone = {"name": "cub200", "root": args.data_root}, {"name": "efficientnet_lite0", "pretrained": True}
    return {
        "dataset": data,
        "backbone": backbone,
        "sampler": {"name": "m_per_class", "m": 8 if args.dataset == "digits" else 4},  # digits: 5 classes
        "loss": loss,
        "train": train,
    }


def paper_config(args: argparse.Namespace, loss: dict, seed: int) -> dict:
    """The paper's protocol for the base loss alone or for CCP (``preset=paper``), on frozen features
    or (``--full``) fine-tuning the whole network."""
    from dmlkit_plugins.ccp import PAPER_DATASET_OPTIONS, paper_settings

    base = loss.get("base", loss["name"])
    data = {"name": "cub200", "root": args.data_root}
    preset = paper_settings({"base": base}, {"dataset": data})
    steps_per_epoch = preset["sampler"]["batches_per_epoch"]
    train = {
        **preset["train"],
        "seed": seed,
        "epochs": max(1, args.steps // steps_per_epoch),  # the most a run may take; patience stops it earlier
        "head_init": "random",
        "pooling": "avgmax",
        "eval_batch_size": 128,
        "num_workers": 2,
    }
    if not args.full:  # frozen features; with --full the whole network trains at the paper's lr, BN frozen
        train.update(freeze_backbone=True, feature_cache=True, cache_views=args.views, cache_dir=args.cache_dir)
    if loss["name"] == "ccp":
        loss = {**loss, "preset": "paper"}
    else:  # the base alone: the supplement's settings for the dataset, on normalised embeddings
        loss = {**loss, **PAPER_DATASET_OPTIONS.get(base, {}).get("cub200", {})}
    backbone = {"name": "efficientnet_lite0", "pretrained": True}
    return {"dataset": data, "backbone": backbone, "sampler": preset["sampler"], "loss": loss, "train": train}


def run_one(
    args: argparse.Namespace, loss: dict, seed: int, out_dir: Path, console: Console, test: bool = True
) -> dict:
    reg = get_registry()
    paper = args.preset == "paper"
    cfg, _ = resolve(paper_config(args, loss, seed) if paper else config(args, loss, seed), reg)
    cfg["train"]["normalize_embeddings"] = loss["name"] != "ccp"  # the base losses normalise; CCP's ball does not
    if not paper:
        steps_per_epoch = len(Trainer(cfg, reg, out_dir, console=Console(quiet=True)).sampler)
        cfg["train"]["epochs"] = max(1, round(args.steps / steps_per_epoch))  # the schedule spans the whole budget
    trainer = Trainer(cfg, reg, out_dir, console=console)
    start = time.perf_counter()
    trainer.fit(test=test)
    seconds = time.perf_counter() - start
    best = trainer.selection.best
    res = trainer.results or {"best_epoch": best["epoch"], "best_value": best["value"], "test": {}}
    events = [e for h in trainer.history for e in h.get("events", []) if e.get("event") == "ccp_instance"]
    return {
        "loss": loss["name"],
        "base": loss.get("base", loss["name"]),
        "seed": seed,
        "patience": loss.get("patience"),
        "steps": trainer.step,
        "stopped_early": trainer.epoch < cfg["train"]["epochs"],
        "best_epoch": res["best_epoch"],
        "val_map_at_r": res["best_value"],
        "precision_at_1": res["test"].get("precision_at_1"),
        "map_at_r": res["test"].get("map_at_r"),
        "ccp_instances": len(events),
        "ccp_plateau_reinits": sum(e["reason"].endswith("plateau") for e in events),
        "seconds": round(seconds, 1),
    }


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for base in dict.fromkeys(r["base"] for r in rows):
        for method in ("base", "ccp"):
            sel = [r for r in rows if r["base"] == base and (r["loss"] == "ccp") == (method == "ccp")]
            if not sel:
                continue
            row = {"base": base, "method": base if method == "base" else f"ccp({base})", "seeds": len(sel)}
            for k in ("precision_at_1", "map_at_r"):
                vals = [r[k] for r in sel]
                row[k] = statistics.mean(vals)
                row[k + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            row["plateau_reinits"] = [r["ccp_plateau_reinits"] for r in sel] if method == "ccp" else None
            out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default="")
    ap.add_argument("--dataset", default="cub200", choices=("cub200", "digits"), help="digits: a quick smoke run")
    ap.add_argument("--bases", nargs="+", default=list(BASES))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--views", type=int, default=2, help="augmentation views cached per training image")
    ap.add_argument("--cache-dir", default="", help="feature cache folder (default ~/.cache/dmlkit/features)")
    ap.add_argument("--full", action="store_true", help="fine-tune the backbone too (a GPU job)")
    ap.add_argument("--preset", default="", choices=("", "paper"), help="paper: the paper's protocol and settings")
    ap.add_argument("--select-patience", type=int, nargs="*", default=[], help="CCP plateau patiences to choose from")
    ap.add_argument("--runs", default="runs/ccp_protocol")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.dataset == "cub200" and not args.data_root:
        ap.error("--data-root is needed for cub200 (e.g. ../shared/data/CUB_200_2011)")
    if args.preset and args.dataset != "cub200":
        ap.error("--preset paper has the paper's settings for cub200 (not digits)")
    console = Console(quiet=True)
    chosen, selection = None, []
    for patience in args.select_patience:  # chosen on validation only: these runs never read the test set
        row = run_one(args, {"name": "ccp", "base": args.bases[0], "patience": patience}, 100, Path(args.runs)
                      / f"select-p{patience}", console, test=False)  # fmt: skip
        selection.append({k: row[k] for k in ("patience", "steps", "best_epoch", "val_map_at_r", "ccp_instances")})
        print(json.dumps(selection[-1]), flush=True)
    if selection:
        chosen = max(selection, key=lambda r: r["val_map_at_r"])["patience"]
        print(f"chosen on validation: CCP patience {chosen}", flush=True)
    rows = []
    for base in args.bases:
        for seed in args.seeds:
            ccp = {"name": "ccp", "base": base, **({"patience": chosen} if chosen is not None else {})}
            for loss in ({"name": base}, ccp):
                tag = f"{loss['name']}-{base}-s{seed}"
                row = run_one(args, loss, seed, Path(args.runs) / tag, console)
                rows.append(row)
                print(json.dumps(row), flush=True)
    table = summarise(rows)
    print(f"{'method':28} {'P@1':>16} {'MAP@R':>16}  plateau re-inits")
    for t in table:
        print(
            f"{t['method']:28} {t['precision_at_1']:.4f} ± {t['precision_at_1_sd']:.4f} "
            f"{t['map_at_r']:.4f} ± {t['map_at_r_sd']:.4f}  {t['plateau_reinits'] or ''}"
        )
    result = {**machine(), "args": vars(args), "selection": selection, "runs": rows, "summary": table}
    if args.out:
        save(result, args.out)


if __name__ == "__main__":
    main()
