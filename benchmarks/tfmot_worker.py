"""tfmot half of benchmarks/tfmot_contrast.py: unstructured magnitude pruning
(masks) of a Keras 2 (`tf_keras`) ResNet50 at 50% sparsity, measured dense vs
sparse.

Runs ONLY in its own venv and process (`.venv-tfmot`: tensorflow-cpu,
tf-keras, tensorflow-model-optimization); importing tfmot sets
TF_USE_LEGACY_KERAS=1 for the process, which must never happen next to
Keras 3 code. The driver starts it:

    .venv-tfmot/bin/python benchmarks/tfmot_worker.py --output /tmp/tfmot.json

Steps: `tf_keras.applications.ResNet50(weights=None)` at 224² (BN given the
same trained-looking random statistics as keras_taylor.testing.
lively_statistics), `tfmot.sparsity.keras.prune_low_magnitude` with
`ConstantSparsity(0.5, begin_step=0, frequency=1)`, one `fit` step (SGD, learning rate 0,
so weights do not move) with the `UpdatePruningStep` callback to compute and
apply the masks, `strip_pruning`, BN weights restored from the dense model
(the fit step moved their moving statistics). Measured, dense vs sparse:
per-layer and global kernel sparsity; TF graph-mode latency (the model in a
`tf.function`, training=False; interleaved rounds as keras_taylor.latency)
at batch 1 / `--size_b1` and batch `--batch` / `--size_batch`; TFLite float32
latency at batch 1 (XNNPACK, `--tflite_threads`) of dense, sparse, and sparse
converted with `tf.lite.Optimize.EXPERIMENTAL_SPARSITY`; in every latency
measurement the dense model is also timed a second time as `dense_copy` (its
own tf.function / interpreter), an A/A control for the noise of a ratio; file sizes raw and
gzipped of the .h5 and the .tflite files; what the sparsity conversion put in
the flatbuffer (sparse tensors, op types).
"""

from __future__ import annotations

import gzip
import json
import os
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["TF_USE_LEGACY_KERAS"] = "1"  # what importing tfmot does anyway

from absl import app, flags, logging  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("size_b1", 224, "Input size, batch 1 (TF and TFLite).")
flags.DEFINE_integer("size_batch", 128, "Input size, large batch.")
flags.DEFINE_integer("batch", 32, "Large batch size.")
flags.DEFINE_integer("rounds_b1", 40, "Interleaved rounds, batch 1.")
flags.DEFINE_float("round_s_b1", 0.3, "Seconds the dense model runs per round at batch 1 (sets the calls per round, 1 to 50).")
flags.DEFINE_integer("rounds_batch", 20, "Interleaved rounds, large batch.")
flags.DEFINE_float("round_s_batch", 1.0, "Seconds the dense model runs per round at the large batch.")
flags.DEFINE_integer("tflite_threads", 2, "TFLite interpreter threads.")
flags.DEFINE_float("sparsity", 0.5, "Target sparsity of every Conv/Dense kernel.")
flags.DEFINE_integer("seed", 0, "Seed.")
flags.DEFINE_string("output", None, "JSON output.")
flags.mark_flag_as_required("output")


def lively_statistics(model, seed=0):
    """Same distributions as keras_taylor.testing.lively_statistics (BN part)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, tf_keras.layers.BatchNormalization):
            new = []
            for v in layer.weights:
                shape = tuple(v.shape)
                if "gamma" in v.name:
                    new.append(rng.uniform(0.5, 1.0, shape))
                elif "variance" in v.name:
                    new.append(rng.uniform(1.0, 1.5, shape))
                else:
                    new.append(rng.normal(0.0, 0.3, shape))
            layer.set_weights(new)


def resnet50(size: int):
    return tf_keras.applications.ResNet50(weights=None, input_shape=(size, size, 3))


def measure_tf(models: dict, batch: int, rounds: int, round_s: float, seed: int, warmup: int = 3) -> dict:
    """keras_taylor.latency.measure_latency's method (the same loop, through
    benchmarks/_harness.py), for tf_keras models; the calls per round make
    the first model run about `round_s` seconds."""
    rng = np.random.default_rng(seed)
    names = list(models)
    shape = tuple(models[names[0]].inputs[0].shape[1:])
    x = tf.constant(rng.uniform(0, 1, (batch, *shape)).astype("float32"))
    fns = {n: tf.function(lambda x, m=m: m(x, training=False), reduce_retracing=True) for n, m in models.items()}
    runs = {n: (lambda fn=fn: fn(x)) for n, fn in fns.items()}
    return _harness.measure(runs, rounds, round_s=round_s, seed=rng, warmup=warmup, finish=lambda y: y.numpy())


def interpreter(path: str, batch: int, threads: int):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*Interpreter is deprecated")
        it = tf.lite.Interpreter(model_path=path, num_threads=threads)
    d = it.get_input_details()[0]
    it.resize_tensor_input(d["index"], [batch, *d["shape_signature"][1:]])
    it.allocate_tensors()
    return it


def measure_tflite(paths: dict, rounds: int, round_s: float, threads: int, seed: int, warmup: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    names = list(paths)
    its = {n: interpreter(p, 1, threads) for n, p in paths.items()}
    x = rng.uniform(0, 1, its[names[0]].get_input_details()[0]["shape"]).astype("float32")
    for it in its.values():
        it.set_tensor(it.get_input_details()[0]["index"], x)
    return _harness.measure({n: it.invoke for n, it in its.items()}, rounds, round_s=round_s, seed=rng, warmup=warmup)


def tflite_run(path: str, x: np.ndarray) -> np.ndarray:
    it = interpreter(path, len(x), 1)
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"])


def tflite_contents(path: str) -> dict:
    """Op types and sparse tensors in a flatbuffer, as the interpreter sees them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*Interpreter is deprecated")
        it = tf.lite.Interpreter(model_path=path, experimental_op_resolver_type=tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    ops = {}
    for op in it._get_ops_details():
        ops[op["op_name"]] = ops.get(op["op_name"], 0) + 1
    sparse = [d for d in it.get_tensor_details() if d.get("sparsity_parameters")]
    return {"op_counts": dict(sorted(ops.items())), "sparse_tensors": len(sparse),
            "sparse_tensor_examples": [{"name": d["name"][:80], "shape": [int(s) for s in d["shape"]]} for d in sparse[:5]]}


def sizes(path: str) -> dict:
    with open(path, "rb") as f:
        data = f.read()
    return {"raw_bytes": len(data), "gzip_bytes": len(gzip.compress(data, compresslevel=9))}


def kernel_sparsity(model) -> dict:
    zeros = total = 0
    per_layer = {}
    for layer in model.layers:
        if isinstance(layer, (tf_keras.layers.Conv2D, tf_keras.layers.Dense)):
            k = layer.get_weights()[0]
            z = int(np.count_nonzero(k == 0))
            per_layer[layer.name] = z / k.size
            zeros += z
            total += k.size
    all_w = sum(w.size for w in model.get_weights())
    all_z = sum(int(np.count_nonzero(w == 0)) for w in model.get_weights())
    vals = np.array(list(per_layer.values()))
    return {"kernels": zeros / total, "all_weights": all_z / all_w, "layers": len(per_layer),
            "per_layer_min": float(vals.min()), "per_layer_max": float(vals.max())}


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    tf.get_logger().setLevel("ERROR")
    wall0 = time.time()
    tmp = tempfile.mkdtemp(prefix="tfmot_worker_")
    result = {
        "command": " ".join(["python", "benchmarks/tfmot_worker.py"] + sys.argv[1:]),
        **_harness.machine(tfmot=tfmot.__version__),
        "TF_USE_LEGACY_KERAS": os.environ.get("TF_USE_LEGACY_KERAS"),
        "load_average_1_5_15min": {"start": _harness.load()},
        "model": "tf_keras.applications.ResNet50(weights=None), 1000 classes",
        "pruning": f"tfmot.sparsity.keras.prune_low_magnitude(ConstantSparsity({FLAGS.sparsity}, begin_step=0, frequency=1)), "
                   "1 fit step (SGD lr=0) with UpdatePruningStep, strip_pruning",
    }
    tf_keras.utils.set_random_seed(FLAGS.seed)
    dense = resnet50(FLAGS.size_b1)
    lively_statistics(dense, FLAGS.seed)
    dense_weights = dense.get_weights()

    # Masks: prune a second copy (tfmot wraps the layer objects it is given).
    t0 = time.time()
    work = resnet50(FLAGS.size_b1)
    work.set_weights(dense_weights)
    schedule = tfmot.sparsity.keras.ConstantSparsity(FLAGS.sparsity, begin_step=0, frequency=1)
    wrapped = tfmot.sparsity.keras.prune_low_magnitude(work, pruning_schedule=schedule)
    wrapped.compile(optimizer=tf_keras.optimizers.SGD(learning_rate=0.0),
                    loss=tf_keras.losses.SparseCategoricalCrossentropy())
    rng = np.random.default_rng(FLAGS.seed)
    x_fit = rng.uniform(0, 1, (2, FLAGS.size_b1, FLAGS.size_b1, 3)).astype("float32")
    y_fit = rng.integers(0, 1000, (2,))
    wrapped.fit(x_fit, y_fit, batch_size=2, epochs=1, verbose=0,
                callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    sparse = tfmot.sparsity.keras.strip_pruning(wrapped)
    for layer in sparse.layers:  # BN moving statistics moved in the fit step: restore them
        if not isinstance(layer, (tf_keras.layers.Conv2D, tf_keras.layers.Dense)) and layer.weights:
            layer.set_weights(dense.get_layer(layer.name).get_weights())
    result["prune_s"] = round(time.time() - t0, 1)
    # Check: the sparse kernels are the dense kernels with entries zeroed.
    kept_equal = all(
        np.array_equal(s[s != 0], d[s != 0]) for s, d in zip(sparse.get_weights(), dense.get_weights())
    )
    result["sparsity"] = {"dense": kernel_sparsity(dense), "sparse": kernel_sparsity(sparse),
                          "nonzero_weights_equal_dense": bool(kept_equal)}
    print("sparsity", result["sparsity"], flush=True)
    sparse_weights = sparse.get_weights()

    # Files: .h5 (Keras 2 full model) and .tflite (float32; and the sparsity-optimized one).
    files = {}
    for name, m in (("dense", dense), ("sparse", sparse)):
        p = os.path.join(tmp, f"{name}.h5")
        tf_keras.models.save_model(m, p, include_optimizer=False)
        files[f"{name}.h5"] = sizes(p)
    tfl = {}
    for name, m, opt in (("dense", dense, None), ("sparse", sparse, None),
                         ("sparse_experimental_sparsity", sparse, [tf.lite.Optimize.EXPERIMENTAL_SPARSITY])):
        t0 = time.time()
        conv = tf.lite.TFLiteConverter.from_keras_model(m)
        if opt:
            conv.optimizations = opt
        try:
            data = conv.convert()
        except Exception as e:  # record and go on
            result.setdefault("tflite_errors", {})[name] = f"{type(e).__name__}: {str(e)[-500:]}"
            continue
        p = os.path.join(tmp, f"{name}.tflite")
        with open(p, "wb") as f:
            f.write(data)
        tfl[name] = p
        files[f"{name}.tflite"] = {**sizes(p), "convert_s": round(time.time() - t0, 1)}
        print(name, files[f"{name}.tflite"], flush=True)
    result["files"] = files
    result["tflite_contents"] = {n: tflite_contents(p) for n, p in tfl.items()}
    x_chk = rng.uniform(0, 1, (2, FLAGS.size_b1, FLAGS.size_b1, 3)).astype("float32")
    want = {"dense": dense(x_chk, training=False).numpy(), "sparse": sparse(x_chk, training=False).numpy()}
    result["tflite_check_max_abs_diff"] = {
        n: float(np.max(np.abs(tflite_run(p, x_chk) - want["dense" if n == "dense" else "sparse"]))) for n, p in tfl.items()
    }
    result["max_abs_output"] = {k: float(np.max(np.abs(v))) for k, v in want.items()}
    print("tflite check", result["tflite_check_max_abs_diff"], flush=True)

    # Latency: TF graph mode, batch 1 and large batch; TFLite batch 1.
    result["load_before_tf_b1"] = _harness.load()
    result["tf_b1"] = measure_tf({"dense": dense, "sparse": sparse, "dense_copy": dense}, 1, FLAGS.rounds_b1, FLAGS.round_s_b1, FLAGS.seed)
    print("tf b1", {k: (round(v["median_ms"], 1), round(v["ratio_median"], 3)) for k, v in result["tf_b1"].items() if isinstance(v, dict)}, flush=True)
    d2, s2 = resnet50(FLAGS.size_batch), resnet50(FLAGS.size_batch)
    d2.set_weights(dense_weights)
    s2.set_weights(sparse_weights)
    result["load_before_tf_batch"] = _harness.load()
    result["tf_batch"] = measure_tf({"dense": d2, "sparse": s2, "dense_copy": d2}, FLAGS.batch, FLAGS.rounds_batch, FLAGS.round_s_batch, FLAGS.seed, warmup=2)
    print(f"tf b{FLAGS.batch}", {k: (round(v["median_ms"], 1), round(v["ratio_median"], 3)) for k, v in result["tf_batch"].items() if isinstance(v, dict)}, flush=True)
    result["load_before_tflite_b1"] = _harness.load()
    tfl_timed = {**tfl, "dense_copy": tfl["dense"]}  # A/A control: a second interpreter on the dense file
    result["tflite_b1"] = measure_tflite(tfl_timed, FLAGS.rounds_b1, FLAGS.round_s_b1, FLAGS.tflite_threads, FLAGS.seed)
    print("tflite b1", {k: (round(v["median_ms"], 1), round(v["ratio_median"], 3)) for k, v in result["tflite_b1"].items() if isinstance(v, dict)}, flush=True)
    result["load_average_1_5_15min"]["end"] = _harness.load()
    result["wall_s"] = round(time.time() - wall0, 1)
    with open(FLAGS.output, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {FLAGS.output} ({result['wall_s']} s)")


if __name__ == "__main__":
    app.run(main)
