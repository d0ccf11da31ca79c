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


def test_recalibrate_bn_averages_batch_statistics():
    # keras.applications' BN momentum 0.999 leaves the moving statistics near
    # their initial values after a short training: they are recomputed as the
    # mean of the batch statistics, the momentum restored, other BN untouched.
    code = """
import sys
sys.path.insert(0, "benchmarks")
import numpy as np, keras, tensorflow as tf
import latency_quality as lq
inp = keras.Input((4,))
slow = keras.layers.BatchNormalization(momentum=0.999, name="slow")(inp)
fast = keras.layers.BatchNormalization(momentum=0.9, name="fast")(slow)
model = keras.Model(inp, fast)
x = np.random.default_rng(0).normal(5.0, 2.0, (96, 4)).astype("float32")
ds = tf.data.Dataset.from_tensor_slices((x, np.zeros(96, "int32"))).batch(32)
assert lq.recalibrate_bn(model, ds, 2) == 1
bn = model.get_layer("slow")
want = np.mean([x[:32].mean(0), x[32:64].mean(0)], axis=0)
np.testing.assert_allclose(bn.moving_mean.numpy(), want, rtol=1e-5)
assert bn.momentum == 0.999
np.testing.assert_allclose(model.get_layer("fast").moving_mean.numpy(), 0.0)
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
