"""Tests for `keras_taylor.export.export_tflite` and `export_onnx`.

A small residual net is gated, a third of its channels are zeroed and it is
pruned; the exports of the pruned model are run in their own runtimes (LiteRT
interpreter, onnxruntime) and compared with Keras.
"""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest

import keras_taylor as kt
from keras_taylor.export import export_onnx, export_tflite

from conftest import images, make, rel_err


@pytest.fixture(scope="module")
def pruned():
    gated = kt.add_gates(make("residual"))
    for layer in gated.layers:
        if isinstance(layer, kt.ChannelGate):
            values = np.ones(tuple(layer.gate.shape), "float32")
            values[::3] = 0.0
            layer.gate.assign(values)
    model = kt.prune(gated)
    assert model.count_params() < gated.count_params()
    return model


@pytest.fixture(scope="module")
def batch():
    return images(64, seed=1)


@pytest.fixture(scope="module")
def tflite_files(pruned, batch, tmp_path_factory):
    root = tmp_path_factory.mktemp("tflite")
    calibration = images(100, seed=2)
    float_info = export_tflite(pruned, str(root / "float.tflite"), check_inputs=batch)
    int8_info = export_tflite(
        pruned,
        str(root / "int8.tflite"),
        quantize="int8",
        representative_data=calibration,
        check_inputs=batch,
    )
    return float_info, int8_info


def _run_tflite(path, x):
    from keras_taylor.export.tflite import _tflite_interpreter

    with open(path, "rb") as f:
        interpreter, _ = _tflite_interpreter(f.read())
    runner = interpreter.get_signature_runner("serving_default")
    (name,) = runner.get_input_details()
    return runner(**{name: x})


def test_tflite_float_matches_keras(pruned, batch, tflite_files):
    info, _ = tflite_files
    assert info["quantize"] is None and info["io_dtype"] == "float32"
    assert info["size_bytes"] == os.path.getsize(info["path"]) > 0
    assert info["signature_outputs"]["output"]["shape"] == (None, 5)
    (spec,) = info["signature_inputs"].values()
    assert spec["shape"] == (None, 16, 16, 3) and spec["dtype"] == "float32"
    assert info["top1_agreement"] == 1.0
    want = keras.ops.convert_to_numpy(pruned(batch, training=False))
    # An independent run of the file (other batch size than the check).
    got = _run_tflite(info["path"], batch[:7])["output"]
    assert rel_err(got, want[:7]) <= 1e-5
    assert info["max_abs_diff"] <= 1e-5 * max(1.0, info["max_abs_output"])


def test_tflite_int8_top1_and_size(tflite_files, batch, pruned):
    float_info, info = tflite_files
    assert info["quantize"] == "int8"
    assert info["top1_agreement"] >= 0.9
    assert info["size_bytes"] < float_info["size_bytes"]
    # Float I/O, int8 inside.
    (spec,) = info["signature_inputs"].values()
    assert spec["dtype"] == "float32"
    want = keras.ops.convert_to_numpy(pruned(batch, training=False))
    got = _run_tflite(info["path"], batch)["output"]
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.9
    assert info["max_abs_diff"] < 0.1 * info["max_abs_output"]


def test_tflite_int8_io(pruned, batch, tmp_path):
    info = export_tflite(
        pruned,
        str(tmp_path / "io.tflite"),
        quantize="int8",
        io_dtype="int8",
        representative_data=images(32, seed=3),
        check_inputs=batch[:16],
    )
    (spec,) = info["signature_inputs"].values()
    assert spec["dtype"] == "int8" and spec["quantization"] is not None
    assert info["signature_outputs"]["output"]["dtype"] == "int8"
    assert info["top1_agreement"] >= 0.9


def test_tflite_float16_no_check(pruned, tmp_path):
    info = export_tflite(pruned, str(tmp_path / "sub" / "f16.tflite"), quantize="float16")
    assert os.path.exists(info["path"])
    assert info["max_abs_diff"] is None and info["top1_agreement"] is None


def test_onnx_matches_keras(pruned, batch, tmp_path):
    ort = pytest.importorskip(
        "onnxruntime", reason="export_onnx needs tf2onnx, onnx, onnxruntime (pip install 'keras_taylor[onnx]')"
    )
    pytest.importorskip("tf2onnx", reason="export_onnx needs tf2onnx (pip install 'keras_taylor[onnx]')")
    info = export_onnx(pruned, str(tmp_path / "m.onnx"), check_inputs=batch[:8])
    assert info["max_abs_diff"] is not None
    (in_name,) = info["inputs"]
    assert info["inputs"][in_name] == {"shape": (None, 16, 16, 3), "dtype": "float32"}
    assert info["outputs"] == {"output": {"shape": (None, 5), "dtype": "float32"}}
    session = ort.InferenceSession(info["path"], providers=["CPUExecutionProvider"])
    (got,) = session.run(["output"], {in_name: batch})
    want = keras.ops.convert_to_numpy(pruned(batch, training=False))
    assert rel_err(got, want) <= 1e-5


def test_onnx_grouped_conv_and_constants(tmp_path):
    """Grouped convs (XLA calls on the TF backend) and Normalization constants."""
    pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'keras_taylor[onnx]')")
    pytest.importorskip("tf2onnx", reason="needs tf2onnx (pip install 'keras_taylor[onnx]')")
    x = images(4, seed=5)
    for name in ("grouped", "preprocessing"):
        info = export_onnx(make(name), str(tmp_path / f"{name}.onnx"), check_inputs=x)
        assert info["max_abs_diff"] <= 1e-5


@keras.saving.register_keras_serializable(package="test_formats")
class _FakeChannelGate(keras.layers.Layer):
    is_channel_gate = True

    def call(self, inputs):
        return inputs


def _gated():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(2, 3)(inputs)
    x = _FakeChannelGate(name="conv_gate")(x)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))


@pytest.mark.parametrize("fn", [export_tflite, export_onnx])
def test_refuses_gated_model(fn, tmp_path):
    path = tmp_path / "gated.bin"
    with pytest.raises(ValueError, match=r"keras_taylor\.prune\(model\)") as err:
        fn(_gated(), str(path))
    assert "conv_gate" in str(err.value)
    assert not path.exists()


def test_invalid_arguments(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    x = np.ones((2, 4), "float32")
    cases = [
        (dict(quantize="int4"), "quantize"),
        (dict(quantize="int8"), "representative_data"),
        (dict(representative_data=x), "representative_data"),
        (dict(io_dtype="int8"), "io_dtype"),
        (dict(io_dtype="uint8", quantize="int8", representative_data=x), "io_dtype"),
        (dict(quantize="int8", representative_data=np.ones((2, 3))), r"representative_data .* shape"),
        (dict(check_inputs=np.ones((2, 5))), r"check_inputs .* shape"),
        (dict(atol=-1.0), "atol"),
        (dict(output_name="bad name"), "output_name"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            export_tflite(model, str(tmp_path / "m.tflite"), **kwargs)
    with pytest.raises(ValueError, match="path"):
        export_tflite(model, str(tmp_path))  # a directory
    with pytest.raises(ValueError, match="Expected a keras.Model"):
        export_tflite("model", str(tmp_path / "m.tflite"))
    with pytest.raises(ValueError, match="Expected a built Functional or Sequential"):
        export_tflite(keras.Sequential([keras.layers.Dense(2)]), str(tmp_path / "m.tflite"))
    for kwargs, match in [
        (dict(opset=0), "opset"),
        (dict(atol="x"), "atol"),
        (dict(check_inputs=np.ones((2, 5))), r"check_inputs .* shape"),
    ]:
        with pytest.raises(ValueError, match=match):
            export_onnx(model, str(tmp_path / "m.onnx"), **kwargs)
    assert not any(tmp_path.iterdir())


def test_onnx_missing_package_message(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "tf2onnx" or name.startswith("tf2onnx."):
            raise ImportError("No module named 'tf2onnx'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ImportError, match=r"keras_taylor\[onnx\]"):
        export_onnx(model, str(tmp_path / "m.onnx"))
