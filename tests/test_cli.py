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


# ---- issue 12: what a new user hit ------------------------------------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ratio_shows_enough_digits_to_differ_from_the_target():
    assert cli._ratio(0.50028, 0.5) == "0.5003"  # not "0.500" next to a target of 0.5
    assert cli._ratio(0.500004, 0.5) == "0.500004"
    assert cli._ratio(0.5, 0.5) == "0.500"
    assert cli._ratio(0.4991, 0.5) == "0.499"
    assert cli._ratio(0.331) == "0.331"


def _prune_argv(files, out, plan_path, *extra):
    return ["prune", str(files / "plain.keras"), "--data", str(files / "data.npz"),
            "--target-flops", "0.7", "--epochs", "1", "--batch-size", "16", "--prune-every", "1",
            "--channels-per-step", "4", "--output", str(out), "--plan-out", str(plan_path), *extra]


def test_prune_refuses_to_overwrite_without_force(files, tmp_path, capsys):
    out, plan_path = tmp_path / "p.keras", tmp_path / "p.json"
    out.write_text("keep me")
    _fails(capsys, _prune_argv(files, out, plan_path), 2, "exists", "--force")
    assert out.read_text() == "keep me" and not plan_path.exists()
    plan_path.write_text("{}")
    out.unlink()
    _fails(capsys, _prune_argv(files, out, plan_path), 2, "--plan-out", "--force")
    assert cli.main(_prune_argv(files, out, plan_path, "--force")) == 0
    assert kt.PruningPlan.load(str(plan_path)).num_removed > 0
    assert keras.saving.load_model(out).count_params() < make("plain").count_params()


def test_export_tflite_quantization(files, tmp_path, capsys):
    path = str(files / "plain.keras")
    _fails(capsys, ["export", path, "--format", "tflite", "--tflite-quantization", "int8",
                    "--output", str(tmp_path / "q.tflite")], 2, "--data")
    _fails(capsys, ["export", path, "--format", "saved_model", "--tflite-quantization", "float16",
                    "--output", str(tmp_path / "s")], 2, "--format tflite only")
    sizes = {}
    for quant, extra in ((None, []), ("float16", []), ("int8", ["--data", str(files / "data.npz"),
                                                                "--calibration-samples", "16"])):
        out = tmp_path / f"{quant}.tflite"
        argv = ["export", path, "--format", "tflite", "--output", str(out)] + extra
        if quant:
            argv += ["--tflite-quantization", quant]
        assert cli.main(argv) == 0, capsys.readouterr().err
        sizes[quant] = out.stat().st_size
    assert sizes["int8"] < sizes[None] and sizes["float16"] < sizes[None]


def test_report_on_a_gated_model_counts_live_channels(files, tmp_path, capsys):
    gated = kt.add_gates(make("plain"))
    gated.get_layer("b1").gate.assign(np.array([1, 0, 1, 0, 1, 0, 1, 1], "float32"))
    path = tmp_path / "half.keras"
    gated.save(path)
    assert cli.main(["report", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    layers = {l["name"]: l for l in report["layers"]}
    small = kt.prune(gated)
    assert layers["c1"]["output_channels"] == layers["b1"]["output_channels"] == small.get_layer("c1").filters == 5
    assert layers["c1"]["prunable_groups"] == 5
    assert layers["c2"]["macs"] == kt.profile(small).by_name()["c2"].flops
    assert report["totals"]["prunable_groups"] == kt.analyze(gated).num_groups - 3


def test_lambda_model_needs_unsafe_and_on_unknown_freeze(files, tmp_path, capsys):
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(6, 3, name="c1")(inputs)
    x = keras.layers.Conv2D(4, 3, name="c2")(x)
    x = keras.layers.Lambda(lambda t: t * 2.0, name="lam")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, keras.layers.Dense(5, name="out")(x), name="lam_model").save(tmp_path / "lam.keras")
    path = str(tmp_path / "lam.keras")
    _fails(capsys, ["report", path], 2, "Lambda", "--unsafe")
    assert cli.main(["report", path, "--unsafe"]) == 0
    assert "lam" in capsys.readouterr().out
    argv = ["prune", path, "--unsafe", "--data", str(files / "data.npz"), "--target-flops", "0.9", "--epochs", "1",
            "--batch-size", "16", "--prune-every", "1", "--channels-per-step", "1",
            "--output", str(tmp_path / "p.keras"), "--plan-out", str(tmp_path / "p.json")]
    _fails(capsys, argv, 2, "'lam'", "--on-unknown freeze")
    assert cli.main(argv + ["--on-unknown", "freeze"]) == 0, capsys.readouterr().err
    plan = kt.PruningPlan.load(str(tmp_path / "p.json"))
    assert set(plan.removed) == {"c1"}


def test_help_does_not_import_tensorflow():
    code = (
        "import sys, keras_taylor_cli\n"
        "sys.argv = ['keras-taylor', '--help']\n"
        "code = keras_taylor_cli.main()\n"
        "print('RESULT', code, 'tensorflow' in sys.modules, 'keras' in sys.modules)\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert "usage: keras-taylor" in proc.stdout and "report" in proc.stdout
    assert "RESULT 0 False False" in proc.stdout, proc.stdout[-500:] + proc.stderr[-500:]
    assert proc.stderr == ""


def test_commands_do_not_print_tensorflow_start_up_logs(files):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    proc = subprocess.run([sys.executable, "-m", "keras_taylor_cli", "report", str(files / "plain.keras"), "--json"],
                          capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["model"] == "plain"
    assert "oneDNN" not in proc.stderr and "I0000" not in proc.stderr, proc.stderr[-2000:]
