"""`export_onnx`: an ONNX model converted with `tf2onnx`.

Optional dependencies: `pip install "keras_taylor[onnx]"` (tf2onnx, onnx,
onnxruntime for the check).
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import keras
import numpy as np

from keras_taylor import _compat
from keras_taylor.export import _common


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
    _common.check_model(model)
    _common.check_output_name(output_name)
    _common.check_atol(atol)
    if opset is not None and (
        isinstance(opset, bool) or not isinstance(opset, int) or opset < 1
    ):
        raise ValueError(
            f"Expected opset to be None or a positive int. Received: opset={opset!r}."
        )
    _common.check_file_path(path)
    names, specs, arrays = _common.signature(model, input_name, check_inputs)

    tf = _compat.import_tensorflow("keras_taylor.export.export_onnx")
    tf2onnx, onnx = _import_onnx_converter()
    ort = _import_onnxruntime() if arrays is not None else None

    tf_specs = [tf.TensorSpec(s.shape, s.dtype, name=n) for s, n in zip(specs, names)]
    single = len(specs) == 1

    @tf.function(input_signature=tf_specs, autograph=False)
    def serve(*xs):
        outputs = model(xs[0] if single else list(xs), training=False)
        return _common.name_outputs(outputs, output_name)

    _common.make_parent_dir(path)
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
    reference = _common.keras_outputs(model, arrays, output_name)
    max_abs_diff, max_ref, _ = _common.compare(reference, got, "ONNX model")
    _common.require_close(max_abs_diff, max_ref, atol, arrays, "the ONNX model (onnxruntime)")
    info["max_abs_diff"] = max_abs_diff
    return info


def _tf2onnx_convert(tf2onnx, serve, names, opset, path):
    """Freezes `serve` and converts its graph with `tf2onnx.convert.from_graph_def`.

    `tf2onnx.convert.from_function` would turn constants captured by the
    function (e.g. a `Normalization` layer's mean and variance) into extra
    graph inputs; freezing first makes them constants.
    """
    concrete = serve.get_concrete_function()
    frozen = _compat.convert_variables_to_constants_v2(
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
