"""Export a (pruned) Keras 3 model for serving: SavedModel, TFLite, ONNX.

- `export_saved_model`: TensorFlow SavedModel for TF Serving (below).
- `export_tflite`: a TFLite (LiteRT) flatbuffer, float32, float16 weights or
  full-integer int8 post-training quantization.
- `export_onnx`: an ONNX model converted with `tf2onnx` (optional
  dependencies: `pip install "keras_taylor[onnx]"`).

Each writer can reload its artifact in its own runtime and compare it with the
Keras model on a batch (`check_inputs`). All three refuse gated models.

SavedModel:

The artifact is written with the public `keras.export.ExportArchive` API and
holds one endpoint, `serving_default`, the signature TF Serving calls when a
request names none. Its inputs are named after the model's `keras.Input`
layers (or `input_name`) and its outputs come back as a dict, so a TF Serving
response reads `{"outputs": {"output": [...]}}` rather than `output_0`.

A gated model (one holding `ChannelGate` layers) is refused: its gates would
be exported as extra variables and multiplications. Fold them first with
`keras_taylor.prune(model)` (removes pruned channels) or
`keras_taylor.strip_gates(model)` (keeps them as zero channels).
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_taylor import _compat

__all__ = ["export_onnx", "export_saved_model", "export_tflite"]

SIGNATURE_KEY = "serving_default"

# Names TF accepts for signature inputs and outputs (graph op names).
_NAME_RE = re.compile(r"^[A-Za-z0-9.][A-Za-z0-9_.\-]*$")


def export_saved_model(
    model: keras.Model,
    path: str,
    check_inputs: Any = None,
    atol: float = 1e-5,
    input_name: str | None = None,
    output_name: str = "output",
) -> dict:
    """Writes `model` as a TF SavedModel with a `serving_default` signature.

    The signature runs `model(x, training=False)` (BatchNormalization uses its
    moving statistics, Dropout is off) on inputs with a dynamic batch
    dimension, shape `(None, ...)`. Its inputs are keyword arguments named
    after the model's `keras.Input` layers, or `input_name`; its outputs are a
    dict:

    - a single output tensor is named `output_name`;
    - a list or tuple of outputs is named `f"{output_name}_{i}"`;
    - a dict of outputs keeps its keys.

    When `check_inputs` is given, the written SavedModel is reloaded with
    `tf.saved_model.load(path)` and its `serving_default` signature is compared
    with the Keras model on that batch.

    Args:
        model: a built Functional or Sequential `keras.Model` without
            `ChannelGate` layers.
        path: directory to write the SavedModel to.
        check_inputs: optional batch to check the export on: a numpy array for
            a single-input model, or a list of arrays (one per input, in
            `model.inputs` order) otherwise. Defaults to `None` (no check).
        atol: tolerance of the check, relative to the largest output magnitude:
            the check fails when `max|saved - keras| > atol * max(1,
            max|keras|)`. Defaults to `1e-5`.
        input_name: name of the signature input of a single-input model.
            Defaults to `None`, which uses the name of the model's
            `keras.Input` layer (e.g. `"input_layer"`). Must be `None` for a
            model with several inputs, whose inputs take their `keras.Input`
            layer names.
        output_name: name of the signature output (the key of the response in
            TF Serving). Defaults to `"output"`.

    Returns:
        A dict with:

        - `"path"`: the `path` written to.
        - `"signature_inputs"`: `{name: {"shape": tuple, "dtype": str}}` of the
            `serving_default` inputs; the batch dimension is `None`.
        - `"signature_outputs"`: the same for its outputs.
        - `"max_abs_diff"`: the largest absolute difference between the
            reloaded signature and the Keras model on `check_inputs`, or `None`
            when no check was run.

    Raises:
        ValueError: if `model` holds `ChannelGate` layers, is not a built
            Functional or Sequential model, or a name or `check_inputs` is
            invalid.
        RuntimeError: if the reloaded SavedModel differs from the Keras model
            on `check_inputs` by more than the tolerance.

    Example:

    ```python
    small = keras_taylor.prune(gated)
    info = keras_taylor.export.export_saved_model(
        small, "/models/resnet/1", check_inputs=x_val[:8]
    )
    # info["signature_inputs"] == {"input_layer": {"shape": (None, 224, 224, 3),
    #                                              "dtype": "float32"}}

    served = tf.saved_model.load("/models/resnet/1")
    probs = served.signatures["serving_default"](input_layer=x)["output"]
    ```
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            "Expected a keras.Model. "
            f"Received: model={model!r} of type {type(model).__name__}."
        )
    _check_no_gates(model)
    if not isinstance(output_name, str) or not _NAME_RE.match(output_name):
        raise ValueError(
            "Expected output_name to be a non-empty string of letters, digits, "
            f"'_', '.' or '-'. Received: output_name={output_name!r}."
        )
    if not isinstance(atol, (int, float)) or atol < 0:
        raise ValueError(f"Expected atol >= 0. Received: atol={atol!r}.")
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ValueError(
            f"Expected path to be a non-empty directory path. Received: path={path!r}."
        )
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(
            f"Expected path to be a directory (new or existing). Received: "
            f"path={str(path)!r}, which is a file."
        )

    names, specs, _ = _signature(model, input_name, None)
    endpoint = _write_archive(model, path, names, specs, output_name)

    concrete = endpoint.get_concrete_function()
    signature_inputs = {
        name: {"shape": (None,) + tuple(s.shape[1:]), "dtype": s.dtype}
        for name, s in zip(names, specs)
    }
    signature_outputs = {
        key: {
            "shape": tuple(t.shape.as_list()),
            "dtype": t.dtype.name,
        }
        for key, t in concrete.structured_outputs.items()
    }

    max_abs_diff = None
    if check_inputs is not None:
        max_abs_diff = _check_export(
            model, path, check_inputs, names, specs, output_name, atol
        )
    return {
        "path": str(path),
        "signature_inputs": signature_inputs,
        "signature_outputs": signature_outputs,
        "max_abs_diff": max_abs_diff,
    }


TFLITE_QUANTIZE = (None, "float16", "int8")
TFLITE_IO_DTYPES = ("float32", "int8")

# Default check tolerances of `export_tflite` (relative to max(1, max|output|)).
_TFLITE_DEFAULT_ATOL = {None: 1e-5, "float16": 1e-2, "int8": None}


def export_tflite(
    model: keras.Model,
    path: str,
    quantize: str | None = None,
    representative_data: Any = None,
    check_inputs: Any = None,
    atol: float | None = None,
    io_dtype: str = "float32",
    input_name: str | None = None,
    output_name: str = "output",
) -> dict:
    """Writes `model` as a TFLite (LiteRT) flatbuffer with a `serving_default` signature.

    The model is first written as a SavedModel holding the same
    `serving_default` signature as `export_saved_model` (inference mode,
    dynamic batch, inputs named after the `keras.Input` layers or
    `input_name`, outputs named `output_name`), then converted with
    `tf.lite.TFLiteConverter.from_saved_model` to TFLite builtin ops only (no
    Flex/TF-select ops, so the file runs on the plain LiteRT runtime).
    BatchNormalization is folded into the preceding convolution by the
    converter.

    `quantize` picks the arithmetic:

    - `None`: float32 weights and activations; matches Keras to float
      rounding.
    - `"float16"`: weights stored as float16 (about half the size),
      computed in float32 on CPU (dequantized at load) or in float16 on GPU
      delegates. No calibration data needed.
    - `"int8"`: full-integer post-training quantization: int8 weights
      (per-channel for convolutions), int8 activations calibrated on
      `representative_data`, int32 biases; every op must have an int8 kernel
      (`TFLITE_BUILTINS_INT8`), so the model runs on integer-only hardware
      (Edge TPU, NPUs, microcontrollers) without float fallbacks. About 4x
      smaller than float32. With the default `io_dtype="float32"` the model
      keeps float32 inputs and outputs (a quantize op at the input and a
      dequantize op at the output), so it is a drop-in replacement for the
      float model; `io_dtype="int8"` makes the inputs and outputs int8 too
      (the caller quantizes with the input's `(scale, zero_point)` from
      `interpreter.get_input_details()[i]["quantization"]`), as integer-only
      accelerators need.

    When `check_inputs` is given, the written file is run with the LiteRT
    interpreter (`ai_edge_litert.interpreter.Interpreter` when installed,
    otherwise `tf.lite.Interpreter`) through its `serving_default` signature
    and compared with the Keras model on that batch (int8 inputs and outputs
    are quantized/dequantized with their stored parameters).

    Args:
        model: a built Functional or Sequential `keras.Model` without
            `ChannelGate` layers.
        path: file to write the `.tflite` flatbuffer to; its directory is
            created if needed.
        quantize: `None`, `"float16"` or `"int8"`, see above. Defaults to
            `None`.
        representative_data: calibration inputs, required for
            `quantize="int8"` and refused otherwise: a numpy array of samples
            `(n, ...)` for a single-input model, or a list of arrays (one per
            input, in `model.inputs` order, same `n`). Each sample is fed with
            batch size 1; 100 to 500 typical training images are usually
            enough. A zero-argument callable returning an iterable of
            `{input_name: batch}` dicts (TFLite's `representative_dataset`
            format; every batch of the same shape) is also accepted.
        check_inputs: optional batch to check the export on: a numpy array for
            a single-input model, or a list of arrays (one per input, in
            `model.inputs` order) otherwise. Defaults to `None` (no check).
        atol: tolerance of the check, relative to the largest output
            magnitude: the check fails when `max|tflite - keras| > atol *
            max(1, max|keras|)`. Defaults to `None`, which means `1e-5` for
            float32, `1e-2` for float16 and no limit for int8 (the error and
            top-1 agreement are only reported: quantization error depends on
            the model and the calibration data).
        io_dtype: `"float32"` or `"int8"`: the dtype of the TFLite inputs and
            outputs; `"int8"` requires `quantize="int8"`. Defaults to
            `"float32"`.
        input_name: name of the signature input of a single-input model, as in
            `export_saved_model`. Defaults to `None` (the `keras.Input` layer
            name).
        output_name: name of the signature output, as in
            `export_saved_model`. Defaults to `"output"`.

    Returns:
        A dict with:

        - `"path"`: the file written.
        - `"size_bytes"`: its size.
        - `"quantize"`, `"io_dtype"`: as given.
        - `"signature_inputs"`, `"signature_outputs"`: `{name: {"shape":
            tuple, "dtype": str, "quantization": (scale, zero_point) or
            None}}` of the TFLite `serving_default` signature; the batch
            dimension is `None`.
        - `"max_abs_diff"`: the largest absolute difference between the
            TFLite and Keras outputs on `check_inputs` (int8 outputs
            dequantized), or `None` when no check was run.
        - `"max_abs_output"`: the largest `|keras output|` on `check_inputs`
            (the scale of `max_abs_diff`), or `None`.
        - `"top1_agreement"`: the fraction of `check_inputs` rows whose argmax
            over the last output axis is the same in TFLite and Keras, or
            `None` (no check, or no output with more than one entry per row).
        - `"runtime"`: the interpreter used for the check, e.g.
            `"ai_edge_litert 2.3.0"` or `"tf.lite 2.21.0"`, or `None`.

    Raises:
        ValueError: if `model` holds `ChannelGate` layers or is not a built
            Functional or Sequential model, or an argument is invalid.
        RuntimeError: if the converter fails (e.g. an op without an int8
            kernel under `quantize="int8"`), or the TFLite model differs from
            the Keras model on `check_inputs` by more than the tolerance.

    Example:

    ```python
    small = keras_taylor.prune(gated)
    info = keras_taylor.export.export_tflite(
        small, "small_int8.tflite", quantize="int8",
        representative_data=x_train[:300], check_inputs=x_val[:256],
    )
    print(info["size_bytes"], info["top1_agreement"])

    from ai_edge_litert.interpreter import Interpreter  # or tf.lite.Interpreter
    run = Interpreter("small_int8.tflite").get_signature_runner()
    probs = run(input_layer=x)["output"]
    ```
    """
    _check_model(model)
    _check_output_name(output_name)
    if quantize not in TFLITE_QUANTIZE:
        raise ValueError(
            f"Expected quantize to be one of {TFLITE_QUANTIZE}. "
            f"Received: quantize={quantize!r}."
        )
    if io_dtype not in TFLITE_IO_DTYPES:
        raise ValueError(
            f"Expected io_dtype to be one of {TFLITE_IO_DTYPES}. "
            f"Received: io_dtype={io_dtype!r}."
        )
    if io_dtype == "int8" and quantize != "int8":
        raise ValueError(
            "Expected io_dtype='float32' unless quantize='int8' (only a "
            "full-integer model can take int8 inputs). Received: "
            f"io_dtype={io_dtype!r} with quantize={quantize!r}."
        )
    if quantize == "int8" and representative_data is None:
        raise ValueError(
            "Expected representative_data (calibration inputs, e.g. "
            "x_train[:300]) with quantize='int8'. Received: "
            "representative_data=None."
        )
    if quantize != "int8" and representative_data is not None:
        raise ValueError(
            "Expected representative_data=None unless quantize='int8' (only "
            "int8 quantization is calibrated). Received: representative_data "
            f"of type {type(representative_data).__name__} with "
            f"quantize={quantize!r}."
        )
    if atol is not None:
        _check_atol(atol)
    _check_file_path(path)

    names, specs, arrays = _signature(model, input_name, check_inputs)
    dataset = None
    if quantize == "int8":
        dataset = _representative_dataset(representative_data, names, specs)

    import tempfile

    with tempfile.TemporaryDirectory(prefix="keras_taylor_tflite_") as tmp:
        _write_archive(model, tmp, names, specs, output_name)
        converter = tf.lite.TFLiteConverter.from_saved_model(
            tmp, signature_keys=[SIGNATURE_KEY]
        )
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if quantize == "float16":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
        elif quantize == "int8":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = dataset
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            io = tf.int8 if io_dtype == "int8" else tf.float32
            converter.inference_input_type = io
            converter.inference_output_type = io
        try:
            with warnings.catch_warnings():
                # int8 calibration runs `tf.lite.Interpreter`, which warns that
                # it is deprecated in favour of ai_edge_litert.
                warnings.filterwarnings("ignore", message=r"(?s).*tf\.lite\.Interpreter is deprecated")
                flatbuffer = converter.convert()
        except Exception as err:  # ConverterError, ValueError, RuntimeError
            hint = (
                " Some op has no int8 kernel; try quantize='float16' or None."
                if quantize == "int8"
                else ""
            )
            raise RuntimeError(
                f"TFLite conversion of model={model.name!r} failed "
                f"(quantize={quantize!r}, TFLite builtin ops only).{hint} "
                f"Converter error: {str(err)[-2000:]}"
            ) from err

    directory = os.path.dirname(os.path.abspath(str(path)))
    os.makedirs(directory, exist_ok=True)
    with open(path, "wb") as f:
        f.write(flatbuffer)

    interpreter, runtime = _tflite_interpreter(flatbuffer)
    details = interpreter.get_signature_runner(SIGNATURE_KEY)
    signature_inputs = {
        k: _tflite_tensor_info(d) for k, d in details.get_input_details().items()
    }
    signature_outputs = {
        k: _tflite_tensor_info(d) for k, d in details.get_output_details().items()
    }

    info = {
        "path": str(path),
        "size_bytes": os.path.getsize(path),
        "quantize": quantize,
        "io_dtype": io_dtype,
        "signature_inputs": signature_inputs,
        "signature_outputs": signature_outputs,
        "max_abs_diff": None,
        "max_abs_output": None,
        "top1_agreement": None,
        "runtime": None,
    }
    if arrays is None:
        return info

    runner = interpreter.get_signature_runner(SIGNATURE_KEY)
    in_details = runner.get_input_details()
    feed = {n: _tflite_quantize(a, in_details[n]) for n, a in zip(names, arrays)}
    try:
        got = runner(**feed)
    except RuntimeError as err:
        if "XNNPACK" not in str(err):
            raise
        warnings.warn(
            f"The XNNPACK delegate (LiteRT's default CPU backend) failed to "
            f"prepare the TFLite model written to {str(path)!r} ({err}); it "
            "was checked with the reference kernels instead. Deployments "
            "using XNNPACK may fail on it.",
            RuntimeWarning,
            stacklevel=2,
        )
        interpreter, runtime = _tflite_interpreter(flatbuffer, xnnpack=False)
        runner = interpreter.get_signature_runner(SIGNATURE_KEY)
        got = runner(**feed)
    out_details = runner.get_output_details()
    got = {k: _tflite_dequantize(v, out_details[k]) for k, v in got.items()}
    reference = _keras_outputs(model, arrays, output_name)
    max_abs_diff, max_ref, top1 = _compare(reference, got, "TFLite signature")
    info.update(
        max_abs_diff=max_abs_diff, max_abs_output=max_ref, top1_agreement=top1, runtime=runtime
    )
    limit = atol if atol is not None else _TFLITE_DEFAULT_ATOL[quantize]
    if limit is not None:
        _require_close(
            max_abs_diff, max_ref, limit, arrays, f"the TFLite model (quantize={quantize!r})",
            f" (top-1 agreement {top1}). The file was written to {str(path)!r}",
        )
    return info


def export_onnx(
    model: keras.Model,
    path: str,
    check_inputs: Any = None,
    atol: float = 1e-5,
    opset: int | None = None,
    input_name: str | None = None,
    output_name: str = "output",
) -> dict:
    """Writes `model` as an ONNX model, converted with `tf2onnx`.

    Needs the optional packages `tf2onnx` and `onnx` (and `onnxruntime` for
    `check_inputs`): `pip install "keras_taylor[onnx]"`.

    The model is traced as a `tf.function` running `model(x, training=False)`
    on inputs with a dynamic batch dimension and converted with
    `tf2onnx.convert.from_function` (`tf2onnx.convert.from_keras` does not
    handle Keras 3 models). The ONNX graph inputs are named after the
    model's `keras.Input` layers (or `input_name`) and keep the Keras layout
    (NHWC for images); its outputs are named like `export_saved_model`'s
    signature outputs (`output_name`, `f"{output_name}_{i}"`, or the keys of a
    dict output). When `check_inputs` is given, the file is run with
    `onnxruntime` (CPU) and compared with the Keras model.

    Args:
        model: a built Functional or Sequential `keras.Model` without
            `ChannelGate` layers.
        path: file to write the `.onnx` model to; its directory is created if
            needed.
        check_inputs: optional batch to check the export on: a numpy array for
            a single-input model, or a list of arrays (one per input, in
            `model.inputs` order) otherwise. Defaults to `None` (no check).
        atol: tolerance of the check, relative to the largest output magnitude:
            the check fails when `max|onnx - keras| > atol * max(1,
            max|keras|)`. Defaults to `1e-5`.
        opset: ONNX opset to target. Defaults to `None` (tf2onnx's default).
        input_name: name of the input of a single-input model. Defaults to
            `None` (the `keras.Input` layer name).
        output_name: name of the output. Defaults to `"output"`.

    Returns:
        A dict with `"path"`, `"size_bytes"`, `"opset"` (the ONNX default
        domain opset written), `"inputs"` and `"outputs"` (`{name: {"shape":
        tuple, "dtype": str}}` of the ONNX graph, batch dimension `None`),
        and `"max_abs_diff"` (onnxruntime vs Keras on `check_inputs`, or
        `None` when no check was run).

    Raises:
        ImportError: if `tf2onnx` or `onnx` is not installed, or
            `onnxruntime` is not installed and `check_inputs` is given.
        ValueError: if `model` holds `ChannelGate` layers or is not a built
            Functional or Sequential model, or an argument is invalid.
        RuntimeError: if the conversion fails, or onnxruntime differs from
            the Keras model on `check_inputs` by more than the tolerance.

    Example:

    ```python
    info = keras_taylor.export.export_onnx(small, "small.onnx", check_inputs=x_val[:8])
    import onnxruntime
    session = onnxruntime.InferenceSession("small.onnx")
    probs = session.run(["output"], {"input_layer": x})[0]
    ```
    """
    _check_model(model)
    _check_output_name(output_name)
    _check_atol(atol)
    if opset is not None and (
        isinstance(opset, bool) or not isinstance(opset, int) or opset < 1
    ):
        raise ValueError(
            f"Expected opset to be None or a positive int. Received: opset={opset!r}."
        )
    _check_file_path(path)
    names, specs, arrays = _signature(model, input_name, check_inputs)

    tf2onnx, onnx = _import_onnx_converter()
    ort = _import_onnxruntime() if arrays is not None else None

    tf_specs = [tf.TensorSpec(s.shape, s.dtype, name=n) for s, n in zip(specs, names)]
    single = len(specs) == 1

    @tf.function(input_signature=tf_specs, autograph=False)
    def serve(*xs):
        outputs = model(xs[0] if single else list(xs), training=False)
        return _name_outputs(outputs, output_name)

    directory = os.path.dirname(os.path.abspath(str(path)))
    os.makedirs(directory, exist_ok=True)
    try:
        model_proto = _tf2onnx_convert(tf2onnx, serve, names, opset, str(path))
    except Exception as err:
        raise RuntimeError(
            f"ONNX conversion of model={model.name!r} with tf2onnx "
            f"{getattr(tf2onnx, '__version__', '?')} (TensorFlow {tf.__version__}) "
            f"failed: {type(err).__name__}: {str(err)[-2000:]}"
        ) from err

    try:
        onnx.checker.check_model(model_proto)
    except Exception as err:
        os.remove(path)
        unknown = sorted(
            {n.op_type for n in model_proto.graph.node if n.domain in ("", "ai.onnx")}
            - {s.name for s in onnx.defs.get_all_schemas()}
        )
        raise RuntimeError(
            f"ONNX conversion of model={model.name!r} with tf2onnx "
            f"{getattr(tf2onnx, '__version__', '?')} produced an invalid model "
            f"(TensorFlow ops it could not convert: {unknown or 'none found'}); "
            f"nothing was written to {str(path)!r}. Checker error: "
            f"{str(err)[-1000:]}"
        ) from err

    def describe(values):
        out = {}
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
            if dims:
                dims[0] = None
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name
            out[v.name] = {"shape": tuple(dims), "dtype": dtype}
        return out

    opsets = {o.domain: o.version for o in model_proto.opset_import}
    info = {
        "path": str(path),
        "size_bytes": os.path.getsize(path),
        "opset": opsets.get("", opsets.get("ai.onnx")),
        "inputs": describe(model_proto.graph.input),
        "outputs": describe(model_proto.graph.output),
        "max_abs_diff": None,
    }
    if arrays is None:
        return info

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out_names = [o.name for o in session.get_outputs()]
    values = session.run(out_names, {n: a for n, a in zip(names, arrays)})
    got = dict(zip(out_names, values))
    reference = _keras_outputs(model, arrays, output_name)
    max_abs_diff, max_ref, _ = _compare(reference, got, "ONNX model")
    _require_close(max_abs_diff, max_ref, atol, arrays, "the ONNX model (onnxruntime)")
    info["max_abs_diff"] = max_abs_diff
    return info


def _tf2onnx_convert(tf2onnx, serve, names, opset, path):
    """Freezes `serve` and converts its graph with `tf2onnx.convert.from_graph_def`.

    `tf2onnx.convert.from_function` would turn constants captured by the
    function (e.g. a `Normalization` layer's mean and variance) into extra
    graph inputs; freezing first makes them constants.
    """
    import logging

    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    concrete = serve.get_concrete_function()
    frozen = convert_variables_to_constants_v2(
        concrete, lower_control_flow=False, aggressive_inlining=True
    )
    input_names = [t.name for t in frozen.inputs]
    if len(input_names) != len(names):
        raise RuntimeError(
            f"Expected the frozen graph to take {len(names)} input(s) {names}. "
            f"Received: {input_names}."
        )
    output_names = [t.name for t in frozen.outputs]
    graph_def = frozen.graph.as_graph_def(add_shapes=True)
    # Keras's TF backend runs grouped convolutions (Conv2D(groups>1)) in an
    # XLA-compiled `tf.function` (TF has no CPU kernel for them). tf2onnx
    # cannot convert the XLA call, but inlines it (and converts the grouped
    # Conv2D inside to an ONNX Conv with `group`) once it is a plain call.
    for node in graph_def.node:
        node.attr.pop("_XlaMustCompile", None)
    for function in graph_def.library.function:
        function.attr.pop("_XlaMustCompile", None)
        function.attr.pop("_noinline", None)
    rename = dict(zip(input_names, names))
    for key, tensor in concrete.structured_outputs.items():
        rename[tensor.name] = key
    # tf2onnx logs failed optional graph optimizations (with tracebacks) as
    # warnings; the converted graph is checked by the caller instead.
    logger = logging.getLogger("tf2onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        model_proto, _ = tf2onnx.convert.from_graph_def(
            graph_def,
            name="serving_default",
            input_names=input_names,
            output_names=output_names,
            opset=opset,
            tensors_to_rename=rename,
            output_path=path,
        )
    finally:
        logger.setLevel(level)
    return model_proto


_ONNX_INSTALL = 'pip install "keras_taylor[onnx]"  (or: pip install tf2onnx onnx onnxruntime)'


def _import_onnx_converter():
    try:
        import onnx
        import tf2onnx
    except ImportError as err:
        raise ImportError(
            f"export_onnx needs the tf2onnx and onnx packages ({err}). "
            f"Install them with: {_ONNX_INSTALL}"
        ) from err
    # tf2onnx <= 1.17 uses numpy APIs removed in numpy 2; Keras patches them
    # for its own `model.export(format="onnx")`.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # `hasattr(np, "object")`
        _compat.patch_tf2onnx()
    return tf2onnx, onnx


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError(
            "export_onnx(check_inputs=...) runs the model with onnxruntime, "
            f"which is not installed ({err}). Install it with: {_ONNX_INSTALL}, "
            "or pass check_inputs=None."
        ) from err
    return onnxruntime


def _tflite_interpreter(flatbuffer: bytes, xnnpack: bool = True) -> tuple:
    """A LiteRT interpreter on `flatbuffer`: ai_edge_litert's, else tf.lite's.

    With `xnnpack=False` the default delegates (XNNPACK) are off and the
    builtin reference kernels run.
    """
    try:
        from ai_edge_litert import interpreter as litert
    except ImportError:
        litert = None
    if litert is not None:
        from importlib import metadata

        try:
            version = metadata.version("ai-edge-litert")
        except metadata.PackageNotFoundError:
            version = "?"
        runtime = f"ai_edge_litert {version}"
        module = litert
    else:
        runtime = f"tf.lite {tf.__version__}"
        module = tf.lite
    kwargs = {}
    if not xnnpack:
        resolvers = getattr(module, "OpResolverType", None) or tf.lite.experimental.OpResolverType
        kwargs["experimental_op_resolver_type"] = resolvers.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        runtime += " (XNNPACK off)"
    with warnings.catch_warnings():
        # "tf.lite.Interpreter is deprecated ... use ai_edge_litert".
        warnings.filterwarnings("ignore", message=r"(?s).*Interpreter is deprecated")
        interpreter = module.Interpreter(model_content=flatbuffer, **kwargs)
    return interpreter, runtime


def _tflite_tensor_info(detail: dict) -> dict:
    shape = tuple(int(d) for d in detail["shape_signature"])
    shape = (None,) + tuple(None if d < 0 else d for d in shape[1:]) if shape else ()
    scale, zero_point = detail.get("quantization", (0.0, 0))
    quantization = (float(scale), int(zero_point)) if scale else None
    return {
        "shape": shape,
        "dtype": np.dtype(detail["dtype"]).name,
        "quantization": quantization,
    }


def _tflite_quantize(array: np.ndarray, detail: dict) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if dtype.kind in "iu" and scale:
        info = np.iinfo(dtype)
        q = np.round(array.astype(np.float64) / scale) + zero_point
        return np.clip(q, info.min, info.max).astype(dtype)
    return array.astype(dtype, copy=False)


def _tflite_dequantize(array: np.ndarray, detail: dict) -> np.ndarray:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if np.asarray(array).dtype.kind in "iu" and scale:
        return ((array.astype(np.float64) - zero_point) * scale).astype(np.float32)
    return np.asarray(array)


def _representative_dataset(data, names, specs):
    """`representative_data` as a TFLite `representative_dataset` callable."""
    if callable(data):
        return data
    arrays = _as_arrays(data, names, specs, arg="representative_data")
    n = arrays[0].shape[0]
    if n < 1:
        raise ValueError(
            "Expected representative_data to hold at least one sample. "
            f"Received: shapes {[a.shape for a in arrays]}."
        )
    if not all(np.all(np.isfinite(a)) for a in arrays if a.dtype.kind == "f"):
        raise ValueError("Expected representative_data to be finite (no NaN or inf).")

    def dataset():
        for i in range(n):
            yield {name: a[i : i + 1] for name, a in zip(names, arrays)}

    return dataset


def _check_model(model) -> None:
    if not isinstance(model, keras.Model):
        raise ValueError(
            "Expected a keras.Model. "
            f"Received: model={model!r} of type {type(model).__name__}."
        )
    _check_no_gates(model)


def _check_output_name(output_name) -> None:
    if not isinstance(output_name, str) or not _NAME_RE.match(output_name):
        raise ValueError(
            "Expected output_name to be a non-empty string of letters, digits, "
            f"'_', '.' or '-'. Received: output_name={output_name!r}."
        )


def _check_atol(atol) -> None:
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not atol >= 0:
        raise ValueError(f"Expected atol >= 0. Received: atol={atol!r}.")


def _check_file_path(path) -> None:
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ValueError(
            f"Expected path to be a non-empty file path. Received: path={path!r}."
        )
    if os.path.isdir(path):
        raise ValueError(
            f"Expected path to be a file (new or existing). Received: "
            f"path={str(path)!r}, which is a directory."
        )


def _input_specs(inputs, names) -> list:
    return [
        keras.InputSpec(
            shape=(None,) + tuple(t.shape[1:]),
            dtype=keras.backend.standardize_dtype(t.dtype),
            name=name,
        )
        for t, name in zip(inputs, names)
    ]


def _write_archive(model, path, names, specs, output_name):
    """Writes the `serving_default` SavedModel; returns its endpoint."""
    single = len(specs) == 1

    def serve(*xs):
        outputs = model(xs[0] if single else list(xs), training=False)
        return _name_outputs(outputs, output_name)

    archive = keras.export.ExportArchive()
    archive.track(model)
    endpoint = archive.add_endpoint(name=SIGNATURE_KEY, fn=serve, input_signature=specs)
    # `write_out` prints every endpoint unless told not to.
    archive.write_out(str(path), verbose=False)
    return endpoint


def _iter_layers(layer):
    """Yields every layer nested in `layer` (sub-models and wrapped layers)."""
    children = list(getattr(layer, "layers", None) or [])
    inner = getattr(layer, "layer", None)
    if isinstance(inner, keras.layers.Layer):
        children.append(inner)
    for child in children:
        yield child
        yield from _iter_layers(child)


def _check_no_gates(model: keras.Model) -> None:
    gated = [l.name for l in _iter_layers(model) if getattr(l, "is_channel_gate", False)]
    if gated:
        shown = ", ".join(repr(n) for n in gated[:5])
        more = f" and {len(gated) - 5} more" if len(gated) > 5 else ""
        raise ValueError(
            "Expected a model without ChannelGate layers; call "
            "`keras_taylor.prune(model)` (removes pruned channels) or "
            "`keras_taylor.strip_gates(model)` (folds the gates into their "
            f"layers) before exporting. Received: model={model.name!r} with "
            f"{len(gated)} ChannelGate layer(s): {shown}{more}."
        )


def _signature(model, input_name, check_inputs):
    """Serving input names and specs of `model`, and `check_inputs` as arrays (or None)."""
    inputs, functional = _model_inputs(model)
    names = _input_names(model, inputs, functional, input_name)
    specs = _input_specs(inputs, names)
    arrays = None if check_inputs is None else _as_arrays(check_inputs, names, specs)
    return names, specs, arrays


def _model_inputs(model: keras.Model) -> tuple:
    """Returns `(input_tensors, functional_graph)` of a Functional/Sequential model."""
    try:
        functional = _compat.functional_of(model)
    except ValueError as err:
        raise ValueError(
            "Expected a built Functional or Sequential keras.Model, whose input "
            "shapes are known. Received: "
            f"model={getattr(model, 'name', model)!r} of class "
            f"{type(model).__name__} (a subclassed model, or a Sequential "
            "model never built on an input shape)."
        ) from err
    return list(functional.inputs), functional


def _input_names(model: keras.Model, inputs, functional, input_name) -> list:
    """Signature input names: `input_name`, else the `keras.Input` layer names."""
    if input_name is not None:
        if len(inputs) != 1:
            raise ValueError(
                "Expected input_name=None for a model with several inputs "
                "(they are named after their keras.Input layers). Received: "
                f"input_name={input_name!r} for model={model.name!r} with "
                f"{len(inputs)} inputs."
            )
        if not isinstance(input_name, str) or not _NAME_RE.match(input_name):
            raise ValueError(
                "Expected input_name to be a non-empty string of letters, "
                f"digits, '_', '.' or '-'. Received: input_name={input_name!r}."
            )
        return [input_name]

    input_layers = [
        l for l in functional.layers if isinstance(l, keras.layers.InputLayer)
    ]
    names = []
    for i, tensor in enumerate(inputs):
        # KerasTensor names are "keras_tensor_N" unless `keras.Input(name=)`
        # was given; the InputLayer's name is the meaningful one.
        name = next(
            (l.name for l in input_layers if l.output is tensor),
            None,
        )
        if name is None:
            auto = tensor.name.startswith("keras_tensor")
            name = f"input_{i}" if auto else tensor.name
        name = re.sub(r"[^A-Za-z0-9_.\-]", "_", name)
        if not _NAME_RE.match(name):
            name = f"input_{name}"
        base, k = name, 1
        while name in names:
            name = f"{base}_{k}"
            k += 1
        names.append(name)
    return names


def _name_outputs(outputs, output_name: str) -> dict:
    if isinstance(outputs, dict):
        return {str(k): v for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        if len(outputs) == 1:
            return {output_name: outputs[0]}
        return {f"{output_name}_{i}": y for i, y in enumerate(outputs)}
    return {output_name: outputs}


def _as_arrays(check_inputs, names, specs, arg: str = "check_inputs") -> list:
    """`check_inputs` (an array, or a list with one array per input) as arrays."""
    arrays = list(check_inputs) if isinstance(check_inputs, (list, tuple)) else [check_inputs]
    if len(arrays) != len(specs):
        raise ValueError(
            f"Expected {arg} to hold {len(specs)} array(s), one per "
            f"model input {names}. Received: {len(arrays)} array(s)."
        )
    try:
        arrays = [np.asarray(a, dtype=s.dtype) for a, s in zip(arrays, specs)]
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"Expected {arg} to be numeric arrays of dtype "
            f"{[s.dtype for s in specs]}. Received: {err}"
        ) from err
    for a, s, name in zip(arrays, specs, names):
        if a.ndim < 1 or a.shape[1:] != tuple(s.shape[1:]):
            raise ValueError(
                f"Expected {arg} for input {name!r} of shape "
                f"(batch,) + {tuple(s.shape[1:])}. Received: shape={a.shape}."
            )
    if len({a.shape[0] for a in arrays}) != 1:
        raise ValueError(
            f"Expected the arrays of {arg} to share their batch size. "
            f"Received: shapes {[a.shape for a in arrays]}."
        )
    return arrays


def _keras_outputs(model, arrays, output_name) -> dict:
    outputs = model(arrays[0] if len(arrays) == 1 else arrays, training=False)
    return {
        k: keras.ops.convert_to_numpy(v)
        for k, v in _name_outputs(outputs, output_name).items()
    }


def _require_close(max_abs_diff, max_ref, atol, arrays, what: str, extra: str = "") -> None:
    """Raises unless `max_abs_diff <= atol * max(1, max|reference output|)`."""
    tolerance = atol * max(1.0, max_ref)
    if not max_abs_diff <= tolerance:
        raise RuntimeError(
            f"Expected {what} to match the Keras model within {tolerance:.3g} "
            f"(atol={atol} * max(1, max|output|={max_ref:.3g})). Received: max "
            f"abs diff={max_abs_diff:.3g} on check_inputs of shape "
            f"{[a.shape for a in arrays]}{extra}."
        )


def _compare(reference: dict, got: dict, what: str) -> tuple:
    """Returns `(max_abs_diff, max_abs_reference, top1_agreement)`.

    `top1_agreement` is the fraction of rows (over every output whose last
    axis has more than one entry) where the argmax over the last axis agrees,
    or `None` when no output has such an axis.
    """
    if set(got) != set(reference):
        raise RuntimeError(
            f"Expected the {what} outputs {sorted(reference)}. "
            f"Received: {sorted(got)}."
        )
    max_abs_diff = 0.0
    max_ref = 0.0
    agree = total = 0
    for key, ref in reference.items():
        out = np.asarray(got[key])
        if out.shape != ref.shape:
            raise RuntimeError(
                f"Expected the {what} output {key!r} of shape {ref.shape}. "
                f"Received: shape={out.shape}."
            )
        if ref.size:
            ref64 = ref.astype(np.float64)
            max_abs_diff = max(max_abs_diff, float(np.max(np.abs(out.astype(np.float64) - ref64))))
            max_ref = max(max_ref, float(np.max(np.abs(ref64))))
            if ref.ndim >= 1 and ref.shape[-1] > 1:
                hits = np.argmax(out, axis=-1) == np.argmax(ref, axis=-1)
                agree += int(np.sum(hits))
                total += hits.size
    top1 = agree / total if total else None
    return max_abs_diff, max_ref, top1


def _check_export(model, path, check_inputs, names, specs, output_name, atol) -> float:
    arrays = _as_arrays(check_inputs, names, specs)
    reference = _keras_outputs(model, arrays, output_name)

    signature = tf.saved_model.load(str(path)).signatures[SIGNATURE_KEY]
    served = signature(**{n: tf.constant(a) for n, a in zip(names, arrays)})
    served = {k: v.numpy() for k, v in served.items()}
    max_abs_diff, max_ref, _ = _compare(reference, served, "reloaded signature")
    _require_close(max_abs_diff, max_ref, atol, arrays, "the reloaded SavedModel")
    return max_abs_diff
