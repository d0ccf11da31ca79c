"""Export a (pruned) Keras 3 model for serving: SavedModel, TFLite, ONNX.

One module per format, as `keras/src/export/` does:

- `saved_model.export_saved_model`: a TensorFlow SavedModel for TF Serving.
- `tflite.export_tflite`: a TFLite (LiteRT) flatbuffer, float32, float16
  weights or full-integer int8 post-training quantization.
- `onnx.export_onnx`: an ONNX model converted with `tf2onnx` (optional
  dependencies: `pip install "keras_taylor[onnx]"`).
- `_common`: the checks and helpers they share (arguments, serving
  signature, comparison with the Keras model).

Each writer can reload its artifact in its own runtime and compare it with the
Keras model on a batch (`check_inputs`). All three refuse gated models: their
gates would be exported as extra variables and multiplications. Fold them
first with `keras_taylor.prune(model)` (removes pruned channels) or
`keras_taylor.strip_gates(model)` (keeps them as zero channels).

Every writer needs TensorFlow (the export path goes through a TF SavedModel
or `tf.function`); it is imported when a writer runs, not with this package.
"""

from keras_taylor.export._common import SIGNATURE_KEY
from keras_taylor.export.onnx import export_onnx
from keras_taylor.export.saved_model import export_saved_model
from keras_taylor.export.tflite import TFLITE_IO_DTYPES, TFLITE_QUANTIZE, export_tflite

__all__ = ["export_onnx", "export_saved_model", "export_tflite"]
