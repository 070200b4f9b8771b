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
