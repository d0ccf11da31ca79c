"""`export_tflite`: a TFLite (LiteRT) flatbuffer, float32, float16 weights or
full-integer int8 post-training quantization.

The pieces: `_check_args` (every argument check, before any work),
`_convert` (SavedModel signature -> `TFLiteConverter`), `_signature_info` and
`_run_signature` (LiteRT interpreter: ai_edge_litert's, else tf.lite's), and
the int8 helpers (`_representative_dataset`, `_tflite_quantize`,
`_tflite_dequantize`).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from typing import Any

import keras
import numpy as np

from keras_taylor import _compat
from keras_taylor.export import _common


TFLITE_QUANTIZE = (None, "float16", "int8")
TFLITE_IO_DTYPES = ("float32", "int8")

# Default check tolerances of `export_tflite` (relative to max(1, max|output|)).
_DEFAULT_ATOL = {None: 1e-5, "float16": 1e-2, "int8": None}


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
    size, agreement = info["size_bytes"], info["top1_agreement"]  # bytes, top-1 match vs Keras

    Interpreter = tf.lite.Interpreter  # or: from ai_edge_litert.interpreter import Interpreter
    run = Interpreter("small_int8.tflite").get_signature_runner()
    probs = run(input_layer=x)["output"]
    ```
    """
    _check_args(model, path, quantize, representative_data, atol, io_dtype, output_name)
    names, specs, arrays = _common.signature(model, input_name, check_inputs)
    dataset = None
    if quantize == "int8":
        dataset = _representative_dataset(representative_data, names, specs)

    flatbuffer = _convert(model, names, specs, output_name, quantize, dataset, io_dtype)
    _common.make_parent_dir(path)
    with open(path, "wb") as f:
        f.write(flatbuffer)

    signature_inputs, signature_outputs = _signature_info(flatbuffer)
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

    got, runtime = _run_signature(flatbuffer, names, arrays, path)
    reference = _common.keras_outputs(model, arrays, output_name)
    max_abs_diff, max_ref, top1 = _common.compare(reference, got, "TFLite signature")
    info.update(
        max_abs_diff=max_abs_diff, max_abs_output=max_ref, top1_agreement=top1, runtime=runtime
    )
    limit = atol if atol is not None else _DEFAULT_ATOL[quantize]
    if limit is not None:
        _common.require_close(
            max_abs_diff, max_ref, limit, arrays, f"the TFLite model (quantize={quantize!r})",
            f" (top-1 agreement {top1}). The file was written to {str(path)!r}",
        )
    return info


def _check_args(model, path, quantize, representative_data, atol, io_dtype, output_name) -> None:
    """Every argument check of `export_tflite`, before any conversion work."""
    _common.check_model(model)
    _common.check_output_name(output_name)
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
        _common.check_atol(atol)
    _common.check_file_path(path)


def _convert(model, names, specs, output_name, quantize, dataset, io_dtype) -> bytes:
    """The TFLite flatbuffer of `model`'s `serving_default` signature.

    Writes the signature as a SavedModel in a temporary directory and converts
    it with `tf.lite.TFLiteConverter.from_saved_model`, builtin ops only.
    """
    tf = _compat.import_tensorflow("keras_taylor.export.export_tflite")
    with tempfile.TemporaryDirectory(prefix="keras_taylor_tflite_") as tmp:
        _common.write_archive(model, tmp, names, specs, output_name)
        converter = tf.lite.TFLiteConverter.from_saved_model(
            tmp, signature_keys=[_common.SIGNATURE_KEY]
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
                return converter.convert()
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


def _run_signature(flatbuffer: bytes, names, arrays, path) -> tuple:
    """Runs `serving_default` on `arrays`; returns `(outputs dequantized, runtime)`.

    Falls back to the reference kernels (with a warning) when the XNNPACK
    delegate cannot prepare the model.
    """
    interpreter, runtime = _tflite_interpreter(flatbuffer)
    runner = interpreter.get_signature_runner(_common.SIGNATURE_KEY)
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
            stacklevel=3,
        )
        interpreter, runtime = _tflite_interpreter(flatbuffer, xnnpack=False)
        runner = interpreter.get_signature_runner(_common.SIGNATURE_KEY)
        got = runner(**feed)
    out_details = runner.get_output_details()
    return {k: _tflite_dequantize(v, out_details[k]) for k, v in got.items()}, runtime


def _signature_info(flatbuffer: bytes) -> tuple:
    """`(signature_inputs, signature_outputs)` of the TFLite `serving_default`."""
    interpreter, _ = _tflite_interpreter(flatbuffer)
    details = interpreter.get_signature_runner(_common.SIGNATURE_KEY)
    return (
        {k: _tflite_tensor_info(d) for k, d in details.get_input_details().items()},
        {k: _tflite_tensor_info(d) for k, d in details.get_output_details().items()},
    )


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
        resolvers = getattr(litert, "OpResolverType", None)
    else:
        tf = _compat.import_tensorflow("Running a TFLite model without ai_edge_litert")
        runtime = f"tf.lite {tf.__version__}"
        module = tf.lite
        resolvers = None
    kwargs = {}
    if not xnnpack:
        if resolvers is None:
            tf = _compat.import_tensorflow("Running a TFLite model without XNNPACK")
            resolvers = tf.lite.experimental.OpResolverType
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
    arrays = _common.as_arrays(data, names, specs, arg="representative_data")
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
