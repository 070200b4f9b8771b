"""bench/gpu_suite.py --smoke: every GPU measurement's code path, tiny, on the CPU, so the suite never rots."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_smoke_runs_every_step(tmp_path):
    out = tmp_path / "suite.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    steps = {s["step"]: s for s in result["steps"]}
    assert set(steps) == {
        "eval",
        "eval_clustering",
        "losses",
        "ccp_selection",
        "throughput",
        "accuracy",
        "ccp_protocol",
        "oneshot",
    }
    assert all(s["status"] == "ok" for s in steps.values()), {k: s.get("why") for k, s in steps.items()}
    # each step's own result came back, with numbers in it
    ccp = steps["ccp_protocol"]["result"]
    assert {r["loss"] for r in ccp["runs"]} == {"contrastive", "ccp"} and all(r["map_at_r"] > 0 for r in ccp["runs"])
    assert steps["throughput"]["result"]["rows"][0]["ratio"] > 0
    assert steps["throughput"]["result"]["rows"][0]["trainer_ratio"] > 0


def test_ccp_protocol_paper_preset_gives_the_base_alone_the_same_protocol_as_ccp():
    """bench/ccp_protocol.py --preset paper: the base loss alone gets the supplement's CUB settings
    (C2 (0, 0.3841), MS (2, 40, 0.5)) and the same run protocol as CCP with preset=paper resolves
    to (lr 1e-5, batch 32 of 8 x 4, 25 steps per validation, patience 60), frozen or --full."""
    import argparse

    import dmlkit
    from dmlkit.config import resolve

    sys.path.insert(0, str(ROOT / "bench"))
    import ccp_protocol

    reg = dmlkit.get_registry()
    for full in (False, True):
        args = argparse.Namespace(data_root="cub", steps=3000, views=1, cache_dir="", full=full)
        for base, opts in (("contrastive", {"pos_margin": 0.0, "neg_margin": 0.3841}),
                           ("multi_similarity", {"alpha": 2.0, "beta": 40.0, "base": 0.5})):  # fmt: skip
            alone, _ = resolve(ccp_protocol.paper_config(args, {"name": base}, 0), reg)
            ccp, _ = resolve(ccp_protocol.paper_config(args, {"name": "ccp", "base": base}, 0), reg)
            assert {k: alone["loss"][k] for k in opts} == opts == ccp["loss"]["base_options"]
            assert alone["train"] == ccp["train"] and alone["sampler"] == ccp["sampler"]
            t = alone["train"]
            assert (t["lr"], t["batch_size"], t["scheduler"], t["patience"], t["epochs"]) == (1e-5, 32, "none", 60, 120)
            assert alone["sampler"]["m"] == 4 and alone["sampler"]["batches_per_epoch"] == 25
            assert t["freeze_backbone"] is (not full) and t["feature_cache"] is (not full)
