"""`export_saved_model`: a TensorFlow SavedModel for TF Serving.

The artifact is written with the public `keras.export.ExportArchive` API and
holds one endpoint, `serving_default`, the signature TF Serving calls when a
request names none. Its inputs are named after the model's `keras.Input`
layers (or `input_name`) and its outputs come back as a dict, so a TF Serving
response reads `{"outputs": {"output": [...]}}` rather than `output_0`.
"""

from __future__ import annotations

from typing import Any

import keras

from keras_taylor import _compat
from keras_taylor.export import _common


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
        small, "models/resnet/1", check_inputs=x_val[:8]
    )
    # info["signature_inputs"] == {"input_layer": {"shape": (None, 224, 224, 3),
    #                                              "dtype": "float32"}}

    served = tf.saved_model.load("models/resnet/1")
    probs = served.signatures["serving_default"](input_layer=x)["output"]
    ```
    """
    _common.check_model(model)
    _common.check_output_name(output_name)
    _common.check_atol(atol)
    _common.check_dir_path(path)

    names, specs, arrays = _common.signature(model, input_name, check_inputs)
    endpoint = _common.write_archive(model, path, names, specs, output_name)

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
    if arrays is not None:
        max_abs_diff = _check_reloaded(model, path, arrays, names, output_name, atol)
    return {
        "path": str(path),
        "signature_inputs": signature_inputs,
        "signature_outputs": signature_outputs,
        "max_abs_diff": max_abs_diff,
    }


def _check_reloaded(model, path, arrays, names, output_name, atol) -> float:
    """Runs the reloaded `serving_default` on `arrays`; returns max|saved - keras|."""
    reference = _common.keras_outputs(model, arrays, output_name)

    tf = _compat.import_tensorflow("keras_taylor.export.export_saved_model(check_inputs=...)")
    signature = tf.saved_model.load(str(path)).signatures[_common.SIGNATURE_KEY]
    served = signature(**{n: tf.constant(a) for n, a in zip(names, arrays)})
    served = {k: v.numpy() for k, v in served.items()}
    max_abs_diff, max_ref, _ = _common.compare(reference, served, "reloaded signature")
    _common.require_close(max_abs_diff, max_ref, atol, arrays, "the reloaded SavedModel")
    return max_abs_diff
