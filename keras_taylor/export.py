"""Export a (pruned) Keras 3 model as a TensorFlow SavedModel for TF Serving.

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
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_taylor import _compat

__all__ = ["export_saved_model"]

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

    inputs, functional = _model_inputs(model)
    names = _input_names(model, inputs, functional, input_name)
    specs = [
        keras.InputSpec(
            shape=(None,) + tuple(t.shape[1:]),
            dtype=keras.backend.standardize_dtype(t.dtype),
            name=name,
        )
        for t, name in zip(inputs, names)
    ]
    single = len(inputs) == 1

    def serve(*xs):
        outputs = model(xs[0] if single else list(xs), training=False)
        return _name_outputs(outputs, output_name)

    archive = keras.export.ExportArchive()
    archive.track(model)
    endpoint = archive.add_endpoint(
        name=SIGNATURE_KEY, fn=serve, input_signature=specs
    )
    # `write_out` prints every endpoint unless told not to.
    archive.write_out(path, verbose=False)

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


def _check_export(model, path, check_inputs, names, specs, output_name, atol) -> float:
    arrays = list(check_inputs) if isinstance(check_inputs, (list, tuple)) else [check_inputs]
    if len(arrays) != len(specs):
        raise ValueError(
            f"Expected check_inputs to hold {len(specs)} array(s), one per "
            f"model input {names}. Received: {len(arrays)} array(s)."
        )
    arrays = [np.asarray(a, dtype=s.dtype) for a, s in zip(arrays, specs)]
    for a, s, name in zip(arrays, specs, names):
        if a.shape[1:] != tuple(s.shape[1:]):
            raise ValueError(
                f"Expected check_inputs for input {name!r} of shape "
                f"(batch,) + {tuple(s.shape[1:])}. Received: shape={a.shape}."
            )

    reference = model(arrays[0] if len(arrays) == 1 else arrays, training=False)
    reference = {
        k: keras.ops.convert_to_numpy(v)
        for k, v in _name_outputs(reference, output_name).items()
    }

    signature = tf.saved_model.load(str(path)).signatures[SIGNATURE_KEY]
    served = signature(**{n: tf.constant(a) for n, a in zip(names, arrays)})
    served = {k: v.numpy() for k, v in served.items()}
    if set(served) != set(reference):
        raise RuntimeError(
            f"Expected the reloaded signature outputs {sorted(reference)}. "
            f"Received: {sorted(served)}."
        )

    max_abs_diff = 0.0
    max_ref = 0.0
    for key, ref in reference.items():
        out = served[key]
        if out.shape != ref.shape:
            raise RuntimeError(
                f"Expected the reloaded output {key!r} of shape {ref.shape}. "
                f"Received: shape={out.shape}."
            )
        if ref.size:
            ref64 = ref.astype(np.float64)
            max_abs_diff = max(max_abs_diff, float(np.max(np.abs(out.astype(np.float64) - ref64))))
            max_ref = max(max_ref, float(np.max(np.abs(ref64))))
    tolerance = atol * max(1.0, max_ref)
    if not max_abs_diff <= tolerance:
        raise RuntimeError(
            "Expected the reloaded SavedModel to match the Keras model within "
            f"{tolerance:.3g} (atol={atol} * max(1, max|output|={max_ref:.3g})). "
            f"Received: max abs diff={max_abs_diff:.3g} on check_inputs of "
            f"shape {[a.shape for a in arrays]}."
        )
    return max_abs_diff
