"""examples/kerashub_classifier.py at smoke size (--quick): a KerasHub
classifier with random weights fine-tuned on Fashion-MNIST, pruned to 50%
FLOPs with TaylorPruning, saved, reloaded and exported."""

import json
import os
import subprocess
import sys

import pytest

from keras_taylor import datasets

pytest.importorskip("keras_hub")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _have_data() -> bool:
    try:
        datasets.load_fashion_mnist(source="idx")
        return True
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _have_data(), reason="Fashion-MNIST IDX files not installed")
def test_kerashub_classifier_example_quick(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "kerashub_classifier.py"), "--quick", f"--output_dir={tmp_path}"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["weights"].startswith("RANDOM")
    assert results["flops_ratio"] <= 0.5 + 1e-9
    assert results["params_ratio"] < 1.0
    assert results["flops_counted_at"] == [[32, 32, 3]]
    assert results["pruned_class"] == "Functional"
    assert 0.0 <= results["top1_after"] <= 1.0
    assert (tmp_path / "pruned.keras").exists() and (tmp_path / "saved_model").exists()
