"""Accuracy of a model exported to TFLite (float, float16, int8) and ONNX on
the Fashion-MNIST test set, against the Keras model itself.

    python benchmarks/export_formats.py --model runs/fashion_mnist/pruned.keras

`--model` is any `.keras` file taking 28×28×1 images in [0, 1] (the main job
writes `pruned.keras` and `dense.keras`). int8 is full-integer post-training
quantization calibrated on `--calibration` training images. Writes
benchmarks/results/export_formats.json.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_taylor import export  # noqa: E402
from keras_taylor.datasets import as_float_images, load_fashion_mnist  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "runs/fashion_mnist/pruned.keras", "The .keras model to export.")
flags.DEFINE_integer("calibration", 500, "Training images for int8 calibration.")
flags.DEFINE_string("output", os.path.join(os.path.dirname(__file__), "results", "export_formats.json"), "JSON output.")


def _run_tflite(path, x, name):
    interpreter, runtime = export.tflite._tflite_interpreter(open(path, "rb").read())
    runner = interpreter.get_signature_runner("serving_default")
    return np.concatenate([runner(**{name: x[k : k + 500]})["output"] for k in range(0, len(x), 500)]), runtime


def main(argv):
    del argv
    (x_train, _), (x_test, y_test) = load_fashion_mnist()
    x_train, x_test = as_float_images(x_train), as_float_images(x_test)
    model = keras.saving.load_model(FLAGS.model, compile=False)
    want = np.concatenate([np.asarray(model(x_test[k : k + 500], training=False)) for k in range(0, len(x_test), 500)])
    rows = [{"format": "keras", "top1": float(np.mean(want.argmax(1) == y_test)), "bytes": os.path.getsize(FLAGS.model)}]
    tmp = tempfile.mkdtemp()
    for quantize in (None, "float16", "int8"):
        start = time.time()
        info = export.export_tflite(
            model, os.path.join(tmp, f"{quantize or 'float'}.tflite"), quantize=quantize,
            representative_data=x_train[: FLAGS.calibration] if quantize == "int8" else None,
            check_inputs=x_test[:64],
        )
        name = next(iter(info["signature_inputs"]))
        got, runtime = _run_tflite(info["path"], x_test, name)
        rows.append({
            "format": f"tflite {quantize or 'float32'}", "top1": float(np.mean(got.argmax(1) == y_test)),
            "agreement_with_keras": float(np.mean(got.argmax(1) == want.argmax(1))),
            "max_abs_diff": float(np.max(np.abs(got - want))), "bytes": info["size_bytes"],
            "runtime": runtime, "seconds": round(time.time() - start, 1),
        })
    try:
        info = export.export_onnx(model, os.path.join(tmp, "model.onnx"), check_inputs=x_test[:256])
        rows.append({"format": "onnx", "max_abs_diff_256": info["max_abs_diff"], "bytes": info["size_bytes"]})
    except ImportError as e:
        rows.append({"format": "onnx", "skipped": str(e)})
    for r in rows:
        print(r)
    os.makedirs(os.path.dirname(FLAGS.output), exist_ok=True)
    with open(FLAGS.output, "w") as f:
        json.dump({"command": f"python benchmarks/export_formats.py --model {FLAGS.model}", "date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
