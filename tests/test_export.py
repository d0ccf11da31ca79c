"""Tests for `keras_taylor.export.export_saved_model`.

The exported SavedModels are reloaded in a fresh Python process (no Keras
objects, no keras_taylor import) to check that they stand alone, as TF Serving
would load them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_taylor.export import export_saved_model

BATCH_SIZES = (1, 5)


def _functional_cnn() -> keras.Model:
    inputs = keras.Input((16, 16, 1), name="pixels_in")  # auto names (input_layer_N) vary
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3)(x)
    model = keras.Model(inputs, outputs, name="functional_cnn")
    _randomize_batchnorm(model)
    return model


def _sequential_cnn() -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input((12, 12, 2)),
            keras.layers.Conv2D(3, 3, padding="same"),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("relu"),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(2),
        ],
        name="sequential_cnn",
    )
    _randomize_batchnorm(model)
    return model


def _randomize_batchnorm(model: keras.Model) -> None:
    """Non-trivial BN statistics, so that `training=False` matters."""
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, gamma.shape).astype("float32"),
                    rng.normal(0.0, 0.5, beta.shape).astype("float32"),
                    rng.normal(0.0, 0.5, mean.shape).astype("float32"),
                    rng.uniform(0.5, 2.0, var.shape).astype("float32"),
                ]
            )


# Run in a fresh interpreter: load each SavedModel, call `serving_default` on
# every saved batch, save the outputs and describe the signature.
_RELOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf

    jobs = json.load(open(sys.argv[1]))
    report = {}
    for job in jobs:
        loaded = tf.saved_model.load(job["saved_model"])
        fn = loaded.signatures["serving_default"]
        _, kwargs = fn.structured_input_signature
        report[job["key"]] = {
            "signatures": sorted(loaded.signatures.keys()),
            "inputs": {k: [list(s.shape), s.dtype.name] for k, s in kwargs.items()},
            "outputs": {
                k: [list(t.shape), t.dtype.name]
                for k, t in fn.structured_outputs.items()
            },
        }
        for x_path, y_path in job["batches"]:
            x = np.load(x_path)
            out = fn(**{job["input_name"]: tf.constant(x)})
            np.savez(y_path, **{k: v.numpy() for k, v in out.items()})
    json.dump(report, open(sys.argv[2], "w"))
    """
)

def _pruned_resnet() -> keras.Model:
    """A ResNet with ~30% of its channel groups pruned by surgery."""
    import keras_taylor as kt
    from keras_taylor import models

    model = models.resnet(input_shape=(16, 16, 3), num_classes=4, widths=(4, 8), blocks_per_stage=1)
    _randomize_batchnorm(model)
    gated = kt.add_gates(model)
    graph = kt.analyze(gated)
    rng = np.random.default_rng(1)
    removed = rng.choice(graph.num_groups, size=graph.num_groups * 3 // 10, replace=False)
    pruned = kt.apply_plan(gated, kt.PruningPlan.from_groups(graph, removed))
    assert kt.profile(pruned).flops < kt.profile(model).flops
    return pruned


# key -> (model builder, export kwargs, expected input name, expected output name)
_CASES = {
    "pruned_resnet": (_pruned_resnet, {}, "image", "output"),
    "functional": (_functional_cnn, {}, "pixels_in", "output"),
    "sequential": (
        _sequential_cnn,
        {"input_name": "pixels", "output_name": "logits"},
        "pixels",
        "logits",
    ),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Exports both models, reloads them in one fresh process, returns all."""
    keras.utils.set_random_seed(0)
    root = tmp_path_factory.mktemp("export")
    rng = np.random.default_rng(0)
    results, jobs = {}, []
    for key, (build, kwargs, in_name, out_name) in _CASES.items():
        model = build()
        path = str(root / key)
        shape = tuple(model.inputs[0].shape[1:])
        info = export_saved_model(
            model,
            path,
            check_inputs=rng.normal(size=(4,) + shape).astype("float32"),
            **kwargs,
        )
        batches, job_batches = {}, []
        for n in BATCH_SIZES:
            x = rng.normal(size=(n,) + shape).astype("float32")
            x_path, y_path = str(root / f"{key}_x{n}.npy"), str(root / f"{key}_y{n}.npz")
            np.save(x_path, x)
            batches[n] = (x, y_path)
            job_batches.append([x_path, y_path])
        jobs.append(
            {"key": key, "saved_model": path, "input_name": in_name, "batches": job_batches}
        )
        results[key] = {
            "model": model,
            "info": info,
            "batches": batches,
            "input_name": in_name,
            "output_name": out_name,
            "shape": shape,
        }

    jobs_path, report_path = root / "jobs.json", root / "report.json"
    jobs_path.write_text(json.dumps(jobs))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, "-c", _RELOAD_SCRIPT, str(jobs_path), str(report_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(report_path.read_text())
    for key in results:
        results[key]["report"] = report[key]
    return results


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("key", sorted(_CASES))
def test_reloaded_signature_matches_keras(exported, key, batch_size):
    case = exported[key]
    x, y_path = case["batches"][batch_size]
    served = dict(np.load(y_path))
    assert list(served) == [case["output_name"]]
    got = served[case["output_name"]]
    want = keras.ops.convert_to_numpy(case["model"](x, training=False))
    assert got.shape == want.shape == (batch_size, want.shape[1])
    tol = 1e-5 * float(np.max(np.abs(want))) + 1e-6
    assert float(np.max(np.abs(got - want))) <= tol


@pytest.mark.parametrize("key", sorted(_CASES))
def test_signature_names_and_dynamic_batch(exported, key):
    case = exported[key]
    report = case["report"]
    assert report["signatures"] == ["serving_default"]
    assert report["inputs"] == {
        case["input_name"]: [[None, *case["shape"]], "float32"]
    }
    assert list(report["outputs"]) == [case["output_name"]]
    out_shape, out_dtype = report["outputs"][case["output_name"]]
    assert out_shape[0] is None and out_dtype == "float32"


@pytest.mark.parametrize("key", sorted(_CASES))
def test_returned_info(exported, key):
    case = exported[key]
    info = case["info"]
    assert set(info) == {"path", "signature_inputs", "signature_outputs", "max_abs_diff"}
    assert info["signature_inputs"] == {
        case["input_name"]: {"shape": (None, *case["shape"]), "dtype": "float32"}
    }
    (out_key, out_spec), = info["signature_outputs"].items()
    assert out_key == case["output_name"]
    assert out_spec["shape"][0] is None and out_spec["dtype"] == "float32"
    assert info["max_abs_diff"] is not None and 0.0 <= info["max_abs_diff"] <= 1e-5


def test_no_check_gives_no_diff(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    info = export_saved_model(model, str(tmp_path / "m"))
    assert info["max_abs_diff"] is None
    assert (tmp_path / "m" / "saved_model.pb").exists()


@keras.saving.register_keras_serializable(package="test")
class _FakeChannelGate(keras.layers.Layer):
    """Stands in for `keras_taylor.ChannelGate` (only the marker matters)."""

    is_channel_gate = True

    def call(self, inputs):
        return inputs


def test_refuses_gated_model(tmp_path):
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(2, 3)(inputs)
    x = _FakeChannelGate(name="conv_gate")(x)
    outputs = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, outputs)
    with pytest.raises(ValueError, match=r"keras_taylor\.prune\(model\)") as err:
        export_saved_model(model, str(tmp_path / "gated"))
    assert "keras_taylor.strip_gates(model)" in str(err.value)
    assert "conv_gate" in str(err.value)
    assert not (tmp_path / "gated").exists()


def test_refuses_gate_in_nested_model(tmp_path):
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), _FakeChannelGate()])
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inner(inputs)))
    with pytest.raises(ValueError, match="ChannelGate"):
        export_saved_model(model, str(tmp_path / "nested"))


def test_mismatch_raises(tmp_path, monkeypatch):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    real_load = tf.saved_model.load

    class _Perturbed:
        def __init__(self, loaded):
            fn = loaded.signatures["serving_default"]
            self.signatures = {
                "serving_default": lambda **kw: {k: v + 1e-2 for k, v in fn(**kw).items()}
            }

    monkeypatch.setattr(
        tf.saved_model, "load", lambda path: _Perturbed(real_load(path))
    )
    with pytest.raises(RuntimeError, match="Expected the reloaded SavedModel to match"):
        export_saved_model(
            model, str(tmp_path / "m"), check_inputs=np.ones((3, 4), "float32")
        )


def test_invalid_arguments(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="output_name"):
        export_saved_model(model, str(tmp_path / "a"), output_name="bad name")
    with pytest.raises(ValueError, match=r"check_inputs .* shape"):
        export_saved_model(
            model, str(tmp_path / "b"), check_inputs=np.ones((2, 5), "float32")
        )

    a, b = keras.Input((3,)), keras.Input((2,))
    two_inputs = keras.Model([a, b], keras.layers.Concatenate()([a, b]))
    with pytest.raises(ValueError, match="input_name=None"):
        export_saved_model(two_inputs, str(tmp_path / "c"), input_name="x")

    unbuilt = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="Expected a built Functional or Sequential"):
        export_saved_model(unbuilt, str(tmp_path / "d"))


def test_multi_input_model_uses_input_layer_names(tmp_path):
    a = keras.Input((3,), name="image_features")
    b = keras.Input((2,), name="meta")
    model = keras.Model([a, b], keras.layers.Dense(2)(keras.layers.Concatenate()([a, b])))
    xa, xb = np.ones((2, 3), "float32"), np.full((2, 2), 0.5, "float32")
    info = export_saved_model(model, str(tmp_path / "m"), check_inputs=[xa, xb])
    assert list(info["signature_inputs"]) == ["image_features", "meta"]
    assert info["max_abs_diff"] <= 1e-5


@pytest.mark.parametrize("key", sorted(_CASES))
def test_saved_model_cli_shows_the_signature(exported, key):
    """TF Serving's view: `saved_model_cli show` lists the named, batch-dynamic signature."""
    import shutil

    cli = shutil.which("saved_model_cli") or os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    if not os.path.exists(cli):
        pytest.skip("saved_model_cli is not installed with this TensorFlow")
    case = exported[key]
    proc = subprocess.run(
        [cli, "show", "--dir", case["info"]["path"], "--tag_set", "serve", "--signature_def", "serving_default"],
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert f"inputs['{case['input_name']}']" in out and f"outputs['{case['output_name']}']" in out
    assert f"shape: (-1, {', '.join(str(d) for d in case['shape'])})" in out
    assert "Method name is: tensorflow/serving/predict" in out
