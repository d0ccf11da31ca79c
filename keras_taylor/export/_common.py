"""Checks and helpers shared by the exporters (`saved_model`, `tflite`, `onnx`).

Argument checks (`check_model`, `check_output_name`, `check_atol`, path
checks), the serving signature of a model (input names and specs, named
outputs), and the comparison of an exported artifact's outputs with the Keras
model. Nothing here imports TensorFlow; `write_archive` needs the TensorFlow
backend (it uses `keras.export.ExportArchive`).
"""

from __future__ import annotations

import os
import re

import keras
import numpy as np

from keras_taylor import _compat

SIGNATURE_KEY = "serving_default"

# Names TF accepts for signature inputs and outputs (graph op names).
NAME_RE = re.compile(r"^[A-Za-z0-9.][A-Za-z0-9_.\-]*$")


def check_model(model) -> None:
    if not isinstance(model, keras.Model):
        raise ValueError(
            "Expected a keras.Model. "
            f"Received: model={model!r} of type {type(model).__name__}."
        )
    check_no_gates(model)


def check_output_name(output_name) -> None:
    if not isinstance(output_name, str) or not NAME_RE.match(output_name):
        raise ValueError(
            "Expected output_name to be a non-empty string of letters, digits, "
            f"'_', '.' or '-'. Received: output_name={output_name!r}."
        )


def check_atol(atol) -> None:
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not atol >= 0:
        raise ValueError(f"Expected atol >= 0. Received: atol={atol!r}.")


def check_file_path(path) -> None:
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ValueError(
            f"Expected path to be a non-empty file path. Received: path={path!r}."
        )
    if os.path.isdir(path):
        raise ValueError(
            f"Expected path to be a file (new or existing). Received: "
            f"path={str(path)!r}, which is a directory."
        )


def check_dir_path(path) -> None:
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ValueError(
            f"Expected path to be a non-empty directory path. Received: path={path!r}."
        )
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(
            f"Expected path to be a directory (new or existing). Received: "
            f"path={str(path)!r}, which is a file."
        )


def make_parent_dir(path) -> None:
    """Creates the directory a file `path` goes into, if needed."""
    os.makedirs(os.path.dirname(os.path.abspath(str(path))), exist_ok=True)


def input_specs(inputs, names) -> list:
    return [
        keras.InputSpec(
            shape=(None,) + tuple(t.shape[1:]),
            dtype=keras.backend.standardize_dtype(t.dtype),
            name=name,
        )
        for t, name in zip(inputs, names)
    ]


def write_archive(model, path, names, specs, output_name):
    """Writes the `serving_default` SavedModel; returns its endpoint."""
    single = len(specs) == 1

    def serve(*xs):
        outputs = model(xs[0] if single else list(xs), training=False)
        return name_outputs(outputs, output_name)

    archive = keras.export.ExportArchive()
    archive.track(model)
    endpoint = archive.add_endpoint(name=SIGNATURE_KEY, fn=serve, input_signature=specs)
    # `write_out` prints every endpoint unless told not to.
    archive.write_out(str(path), verbose=False)
    return endpoint


def iter_layers(layer):
    """Yields every layer nested in `layer` (sub-models and wrapped layers)."""
    children = list(getattr(layer, "layers", None) or [])
    inner = getattr(layer, "layer", None)
    if isinstance(inner, keras.layers.Layer):
        children.append(inner)
    for child in children:
        yield child
        yield from iter_layers(child)


def check_no_gates(model: keras.Model) -> None:
    gated = [l.name for l in iter_layers(model) if getattr(l, "is_channel_gate", False)]
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


def signature(model, input_name, check_inputs):
    """Serving input names and specs of `model`, and `check_inputs` as arrays (or None)."""
    inputs, functional = model_inputs(model)
    names = input_names(model, inputs, functional, input_name)
    specs = input_specs(inputs, names)
    arrays = None if check_inputs is None else as_arrays(check_inputs, names, specs)
    return names, specs, arrays


def model_inputs(model: keras.Model) -> tuple:
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


def input_names(model: keras.Model, inputs, functional, input_name) -> list:
    """Signature input names: `input_name`, else the `keras.Input` layer names."""
    if input_name is not None:
        if len(inputs) != 1:
            raise ValueError(
                "Expected input_name=None for a model with several inputs "
                "(they are named after their keras.Input layers). Received: "
                f"input_name={input_name!r} for model={model.name!r} with "
                f"{len(inputs)} inputs."
            )
        if not isinstance(input_name, str) or not NAME_RE.match(input_name):
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
        if not NAME_RE.match(name):
            name = f"input_{name}"
        base, k = name, 1
        while name in names:
            name = f"{base}_{k}"
            k += 1
        names.append(name)
    return names


def name_outputs(outputs, output_name: str) -> dict:
    if isinstance(outputs, dict):
        return {str(k): v for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        if len(outputs) == 1:
            return {output_name: outputs[0]}
        return {f"{output_name}_{i}": y for i, y in enumerate(outputs)}
    return {output_name: outputs}


def as_arrays(check_inputs, names, specs, arg: str = "check_inputs") -> list:
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


def keras_outputs(model, arrays, output_name) -> dict:
    outputs = model(arrays[0] if len(arrays) == 1 else arrays, training=False)
    return {
        k: keras.ops.convert_to_numpy(v)
        for k, v in name_outputs(outputs, output_name).items()
    }


def require_close(max_abs_diff, max_ref, atol, arrays, what: str, extra: str = "") -> None:
    """Raises unless `max_abs_diff <= atol * max(1, max|reference output|)`."""
    tolerance = atol * max(1.0, max_ref)
    if not max_abs_diff <= tolerance:
        raise RuntimeError(
            f"Expected {what} to match the Keras model within {tolerance:.3g} "
            f"(atol={atol} * max(1, max|output|={max_ref:.3g})). Received: max "
            f"abs diff={max_abs_diff:.3g} on check_inputs of shape "
            f"{[a.shape for a in arrays]}{extra}."
        )


def compare(reference: dict, got: dict, what: str) -> tuple:
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
