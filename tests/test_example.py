"""The main job end to end on real Fashion-MNIST, at smoke size (--quick)."""

import json
import os
import subprocess
import sys

import pytest

from keras_taylor import datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RELOAD = """
import sys, numpy as np, tensorflow as tf, keras
x = np.load(sys.argv[2])
served = tf.saved_model.load(sys.argv[1]).signatures["serving_default"](image=tf.constant(x))["output"].numpy()
np.save(sys.argv[3], served)
"""


def _have_data() -> bool:
    try:
        datasets.load_fashion_mnist(source="idx")
        return True
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_quick_main_job(tmp_path):
    if not _have_data() and not os.environ.get("CI"):
        pytest.skip("Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)")
    out = tmp_path / "run"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "fashion_mnist.py"), "--quick", f"--output_dir={out}", "--latency_rounds=5"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Before / after" in proc.stdout and "kt_flops" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["flops_after"] <= 0.5 * res["flops_before"]
    assert res["params_after"] < res["params_before"]
    assert res["top1_before"] > 0.75 and res["top1_after"] > 0.75
    assert res["top1_before"] - res["top1_after"] < 0.05
    # The exported pruned model, reloaded in a fresh process, serves the same outputs.
    import keras
    import numpy as np

    pruned = keras.models.load_model(out / "pruned.keras")
    (x_train, _), _ = datasets.load_fashion_mnist(source="idx")
    x = datasets.as_float_images(x_train[:16])
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD, str(out / "saved_model"), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = np.load(tmp_path / "y.npy")
    ref = pruned(x, training=False).numpy()
    assert np.max(np.abs(served - ref)) <= 1e-5 * max(1.0, np.max(np.abs(ref)))
