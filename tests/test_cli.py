"""The `keras-taylor` command line tool (keras_taylor/cli.py)."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_taylor as kt
from keras_taylor import cli
from keras_taylor import export as export_lib

from conftest import images, make


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    make("plain").save(d / "plain.keras")
    kt.add_gates(make("plain")).save(d / "gated.keras")
    rng = np.random.default_rng(0)
    np.savez(
        d / "data.npz",
        x_train=rng.uniform(0, 1, (64, 16, 16, 3)).astype("float32"),
        y_train=rng.integers(0, 5, 64),
        x_test=rng.uniform(0, 1, (32, 16, 16, 3)).astype("float32"),
        y_test=rng.integers(0, 5, 32),
    )
    return d


def _check_report(report, path):
    model = keras.saving.load_model(path)
    prof = kt.profile(model)
    graph = kt.analyze(model, on_unknown="freeze")
    assert report["totals"]["flops"] == prof.flops > 0
    assert report["totals"]["params"] == prof.params == model.count_params()
    assert report["totals"]["prunable_groups"] == graph.num_groups
    assert sum(l["macs"] for l in report["layers"]) == prof.flops
    layers = {l["name"]: l for l in report["layers"]}
    assert layers["c1"]["output_channels"] == 8 and layers["c1"]["prunable_groups"] == 8
    assert layers["out"]["prunable_groups"] == 0  # reaches the model output


def test_report(files, capsys):
    path = str(files / "plain.keras")
    assert cli.main(["report", path, "--json"]) == 0
    _check_report(json.loads(capsys.readouterr().out), path)
    assert cli.main(["report", path]) == 0
    out = capsys.readouterr().out
    prof = kt.profile(keras.saving.load_model(path))
    assert f"FLOPs (MACs): {prof.flops:,}" in out and f"params:       {prof.params:,}" in out
    assert "c1" in out and "Conv2D" in out


def test_entry_point_subprocess(files):
    script = os.path.join(os.path.dirname(sys.executable), "keras-taylor")
    cmd = [script] if os.path.exists(script) else [sys.executable, "-m", "keras_taylor.cli"]
    path = str(files / "plain.keras")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(cmd + ["report", path, "--json"], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_report(json.loads(proc.stdout), path)


def test_prune_npz(files, capsys):
    out, plan_path = files / "pruned.keras", files / "plan.json"
    code = cli.main([
        "prune", str(files / "plain.keras"), "--data", str(files / "data.npz"),
        "--target-flops", "0.7", "--epochs", "2", "--batch-size", "16",
        "--prune-every", "1", "--channels-per-step", "2",
        "--output", str(out), "--plan-out", str(plan_path),
    ])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert "test accuracy" in stdout and "FLOPs (MACs)" in stdout
    original = keras.saving.load_model(files / "plain.keras")
    pruned = keras.saving.load_model(out)  # stock layers only: no custom_objects
    assert not kt.is_gated(pruned)
    assert all(not type(l).__module__.startswith("keras_taylor") for l in pruned.layers)
    before, after = kt.profile(original).flops, kt.profile(pruned).flops
    assert after <= 0.7 * before
    plan = kt.PruningPlan.load(str(plan_path))
    assert plan.num_removed > 0
    # The plan, applied to the original, gives the saved architecture.
    assert kt.profile(kt.apply_plan(original, plan)).flops == after
    assert pruned.predict(images(4), verbose=0).shape == (4, 5)


def test_export_saved_model(files, capsys):
    import tensorflow as tf

    path = files / "plain.keras"
    out = files / "saved"
    assert cli.main(["export", str(path), "--format", "saved_model", "--output", str(out)]) == 0
    assert "serving_default" not in capsys.readouterr().err
    served = tf.saved_model.load(str(out)).signatures["serving_default"]
    x = images(3)
    got = served(x=tf.constant(x))["output"].numpy()
    ref = keras.saving.load_model(path)(x, training=False).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # An existing output is not overwritten unless asked.
    assert cli.main(["export", str(path), "--format", "saved_model", "--output", str(out)]) == 2
    assert "--force" in capsys.readouterr().err


def _fails(capsys, argv, code, *words):
    assert cli.main(argv) == code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    for w in words:
        assert w in captured.err, captured.err
    return captured.err


def test_errors(files, tmp_path, capsys, monkeypatch):
    plain, data = str(files / "plain.keras"), str(files / "data.npz")
    missing = str(tmp_path / "nope.keras")
    _fails(capsys, ["report", missing], 2, "not found", "nope.keras")
    _fails(capsys, ["export", missing, "--format", "saved_model"], 2, "not found")
    _fails(capsys, ["prune", missing, "--data", data, "--target-flops", "0.5", "--epochs", "1"], 2, "not found")
    (tmp_path / "junk.keras").write_text("not a zip")
    _fails(capsys, ["report", str(tmp_path / "junk.keras")], 2, "not a Keras model file")
    _fails(capsys, ["report", str(tmp_path)], 2, "directory")
    _fails(capsys, ["export", str(files / "gated.keras"), "--format", "saved_model", "--output", str(tmp_path / "g")],
           2, "gated", "prune")
    assert not (tmp_path / "g").exists()
    for bad in ("1.5", "0", "-0.2", "half"):
        _fails(capsys, ["prune", plain, "--data", data, "--target-flops", bad, "--epochs", "1"], 2, "--target-flops")
    _fails(capsys, ["prune", plain, "--data", str(tmp_path / "none.npz"), "--target-flops", "0.5", "--epochs", "1"],
           2, "not found")
    np.savez(tmp_path / "partial.npz", x_train=np.zeros((4, 16, 16, 3)))
    _fails(capsys, ["prune", plain, "--data", str(tmp_path / "partial.npz"), "--target-flops", "0.5", "--epochs", "1"],
           2, "y_train")
    # Too few minibatches for one pruning step: refused before training.
    _fails(capsys, ["prune", plain, "--data", data, "--target-flops", "0.5", "--epochs", "1", "--prune-every", "100",
                    "--output", str(tmp_path / "p.keras")], 2, "--prune-every")
    _fails(capsys, ["prune", str(files / "gated.keras"), "--data", data, "--target-flops", "0.5", "--epochs", "1",
                    "--output", str(tmp_path / "p.keras")], 2, "gated")
    assert not (tmp_path / "p.keras").exists()
    monkeypatch.delattr(export_lib, "export_tflite", raising=False)
    _fails(capsys, ["export", plain, "--format", "tflite", "--output", str(tmp_path / "m.tflite")], 2,
           "not available", "export_tflite")
    _fails(capsys, [], 2, "usage")
    _fails(capsys, ["export", plain, "--format", "pickle"], 2, "invalid choice")


def test_prune_target_missed(files, tmp_path, capsys):
    """A run that ends above the target still writes its outputs, and exits 1."""
    out, plan_path = tmp_path / "p.keras", tmp_path / "p.json"
    code = cli.main([
        "prune", str(files / "plain.keras"), "--data", str(files / "data.npz"),
        "--target-flops", "0.2", "--epochs", "1", "--batch-size", "16",
        "--prune-every", "4", "--channels-per-step", "1",
        "--output", str(out), "--plan-out", str(plan_path),
    ])
    err = capsys.readouterr().err
    assert code == 1 and "above the target" in err and "Traceback" not in err
    assert out.exists() and kt.PruningPlan.load(str(plan_path)).num_removed == 1
