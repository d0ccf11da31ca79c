"""benchmarks/latency_quality.py --smoke: both variants, their latency ratios and the margin, and resuming."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "latency_quality.py"), "--smoke",
           f"--output={tmp_path / 'r.json'}", f"--work_dir={tmp_path / 'w'}", f"--cache_dir={tmp_path / 'c'}"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "r.json") as f:
        return json.load(f)


@pytest.mark.slow
def test_latency_quality_smoke_and_resume(tmp_path):
    results = run(tmp_path)
    cell = results["cells"]["resnet"]["0"]
    assert cell["L"]["metric"] == "latency" and cell["F"]["metric"] == "flops"
    assert cell["L"]["channels_per_step"] == cell["F"]["channels_per_step"]  # same pruning rate
    search = cell["F"]["search"]
    assert 1 <= len(search["history"]) <= 2 and search["flops_target"] == cell["F"]["target"]
    assert cell["F"]["flops_ratio"] <= cell["F"]["target"] + 1e-9  # the FLOPs variant reached its target
    comp = cell["compare"]
    for v in ("L", "F"):
        lo, hi = comp[v]["latency_ratio_range"]
        assert 0 < lo <= comp[v]["latency_ratio"] <= hi
        assert 0 <= comp[v]["top1"] <= 1 and comp[v]["flops_ratio"] < 1 and comp[v]["params_ratio"] < 1
    assert comp["margin_top1"] == pytest.approx(comp["L"]["top1"] - comp["F"]["top1"])
    assert comp["latency_ratio_gap"] == pytest.approx(comp["L"]["latency_ratio"] - comp["F"]["latency_ratio"])
    summary = results["summary"]["resnet"]
    assert summary["seeds"] == [0] and summary["margins_top1"] == [comp["margin_top1"]]
    again = run(tmp_path)  # resumed: the finished cell is not re-run
    assert again["cells"]["resnet"]["0"]["compare"] == comp and len(again["commands"]) == 2
