"""Prune a KerasHub image classifier with TaylorPruning.

    python examples/kerashub_classifier.py            # preset weights if reachable, 64×64 images
    python examples/kerashub_classifier.py --quick    # smoke run: small random ResNet, 32×32, ~1 min

Steps:
  1. build a `keras_hub.models.ResNetImageClassifier` for 10 classes: the
     backbone from the `resnet_18_imagenet` preset when the internet is
     reachable (`--preset`), otherwise from its constructor with RANDOM
     weights (the run says which);
  2. fine-tune it on Fashion-MNIST resized to `--size` and repeated to 3
     channels (no KerasHub preprocessor: images are fed as floats in [0, 1]);
  3. gate it (`kt.add_gates`: the KerasHub Task and Backbone become one flat
     functional graph) and keep training with `kt.TaylorPruning(target=0.5)`
     until FLOPs are at most half, then fine-tune the rest of the epochs;
  4. `kt.prune` → a plain `keras.Model` of stock layers; report top-1,
     FLOPs, params and CPU latency before/after; save it as `.keras` and
     export a SavedModel.

Everything measured is written to `<output_dir>/results.json`.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_taylor as kt  # noqa: E402
from keras_taylor import datasets, export  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Smoke run: a small random ResNet, 32×32 images, a 2,000-image subset.")
flags.DEFINE_string("preset", "resnet_18_imagenet", "KerasHub backbone preset, used when the internet is reachable.")
flags.DEFINE_bool("offline", False, "Never try to download the preset.")
flags.DEFINE_integer("size", None, "Image size. Defaults to 64 (32 with --quick).")
flags.DEFINE_float("target", 0.5, "Prune until FLOPs are at most this fraction of the original.")
flags.DEFINE_integer("epochs", None, "Epochs after the first (pruning) epoch. Defaults to 2 (0 with --quick).")
flags.DEFINE_integer("train_images", None, "Training images. Defaults to 20,000 (2,000 with --quick).")
flags.DEFINE_string("output_dir", "/tmp/kerashub_classifier", "Where results and the pruned model go.")
flags.DEFINE_string("data_dir", None, "Directory with the Fashion-MNIST IDX files.")


def _reachable(host="www.kaggle.com", port=443, timeout=2.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def build_classifier(quick: bool):
    import keras_hub

    if not quick and not FLAGS.offline and _reachable():
        try:
            backbone = keras_hub.models.ResNetBackbone.from_preset(FLAGS.preset)
            return keras_hub.models.ResNetImageClassifier(backbone=backbone, num_classes=10), f"preset {FLAGS.preset}"
        except Exception as e:  # noqa: BLE001 - falls back to random weights, said so
            print(f"preset {FLAGS.preset!r} not loaded ({type(e).__name__}); using RANDOM weights")
    widths = [64, 32] if quick else [64, 128, 256]
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=widths,
        stackwise_num_blocks=[1] * len(widths), stackwise_num_strides=[1] + [2] * (len(widths) - 1),
        block_type="basic_block",
    )
    return keras_hub.models.ResNetImageClassifier(backbone=backbone, num_classes=10), "RANDOM weights (constructor)"


def load_data(size: int, n_train: int):
    (x_train, y_train), (x_test, y_test) = datasets.load_fashion_mnist(data_dir=FLAGS.data_dir)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(x_train))[:n_train]
    n_test = max(500, n_train // 5)

    def prep(x):
        x = datasets.as_float_images(x)  # (N, 28, 28, 1) in [0, 1]
        x = keras.ops.image.resize(x, (size, size))
        return np.repeat(keras.ops.convert_to_numpy(x), 3, axis=-1)

    return (prep(x_train[idx]), y_train[idx]), (prep(x_test[:n_test]), y_test[:n_test])


def top1(model, x, y) -> float:
    logits = model.predict(x, batch_size=128, verbose=0)
    return float(np.mean(np.argmax(logits, -1) == y))


def latency_ms(models: dict, size: int, rounds: int = 7, calls: int = 10) -> dict:
    """Median ms per call at batch 1, models interleaved in each round."""
    import tensorflow as tf

    x = tf.constant(np.random.default_rng(0).normal(size=(1, size, size, 3)).astype("float32"))
    fns = {k: tf.function(lambda t, m=m: m(t, training=False)) for k, m in models.items()}
    for f in fns.values():
        f(x)
    times = {k: [] for k in models}
    for _ in range(rounds):
        for k, f in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                f(x)
            times[k].append((time.perf_counter() - start) / calls * 1e3)
    return {k: float(np.median(v)) for k, v in times.items()}


def main(argv):
    del argv
    quick = FLAGS.quick
    size = FLAGS.size or (32 if quick else 64)
    epochs = FLAGS.epochs if FLAGS.epochs is not None else (0 if quick else 2)
    n_train = FLAGS.train_images or (2000 if quick else 20000)
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    keras.utils.set_random_seed(0)

    classifier, weights = build_classifier(quick)
    print(f"classifier: {type(classifier).__name__}, weights: {weights}, input {classifier.input.shape}")
    (x_train, y_train), (x_test, y_test) = load_data(size, n_train)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    # The pruned network's uneven widths cannot be expressed by the
    # Backbone's constructor: work on the plain functional graph.
    classifier.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, metrics=["accuracy"])
    classifier.fit(x_train, y_train, batch_size=64, epochs=1, verbose=2)
    base_top1 = top1(classifier, x_test, y_test)
    shape = (size, size, 3)
    before = kt.profile(classifier, input_shape=shape)

    gated = kt.add_gates(classifier)
    gated.compile(optimizer=keras.optimizers.Adam(5e-4), loss=loss, metrics=["accuracy"])
    steps = int(np.ceil(len(x_train) / 64))
    # About 20 pruning steps in the first epoch, enough groups each to reach
    # the target within it; the remaining epochs fine-tune.
    groups = kt.analyze(gated).num_groups
    pruner = kt.TaylorPruning(
        target=FLAGS.target, prune_every=max(1, steps // 20), channels_per_step=max(1, int(np.ceil(0.06 * groups)))
    )
    gated.fit(x_train, y_train, batch_size=64, epochs=1 + epochs, callbacks=[pruner], verbose=2)
    pruned = kt.prune(gated)
    after = kt.profile(pruned, input_shape=shape)
    pruned_top1 = top1(pruned, x_test, y_test)
    lat = latency_ms({"before": classifier, "after": pruned}, size)

    path = os.path.join(FLAGS.output_dir, "pruned.keras")
    pruned.save(path)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_allclose(reloaded.predict(x_test[:8], verbose=0), pruned.predict(x_test[:8], verbose=0), rtol=1e-4, atol=1e-5)
    # `check_inputs` of export_saved_model wants a fixed input size; this
    # model keeps (None, None, 3), so check the reloaded signature here.
    import tensorflow as tf

    saved = os.path.join(FLAGS.output_dir, "saved_model")
    export.export_saved_model(pruned, saved)
    signature = tf.saved_model.load(saved).signatures["serving_default"]
    name = next(iter(signature.structured_input_signature[1]))
    served = next(iter(signature(**{name: tf.constant(x_test[:4])}).values())).numpy()
    np.testing.assert_allclose(served, pruned.predict(x_test[:4], verbose=0), rtol=1e-4, atol=1e-4)

    results = {
        "weights": weights, "input_shape": list(shape), "flops_counted_at": pruner.input_shapes,
        "top1_before": base_top1, "top1_after": pruned_top1,
        "flops_before": before.flops, "flops_after": after.flops, "flops_ratio": after.flops / before.flops,
        "params_before": before.params, "params_after": after.params, "params_ratio": after.params / before.params,
        "latency_ms_b1_before": lat["before"], "latency_ms_b1_after": lat["after"],
        "pruned_class": type(pruned).__name__, "train_images": n_train, "epochs": 1 + epochs, "quick": quick,
    }
    with open(os.path.join(FLAGS.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"weights: {weights}")
    print(f"top-1 {base_top1:.4f} -> {pruned_top1:.4f}; FLOPs {before.flops:,} -> {after.flops:,} "
          f"({results['flops_ratio']:.3f}); params {before.params:,} -> {after.params:,} ({results['params_ratio']:.3f}); "
          f"latency b1 {lat['before']:.2f} -> {lat['after']:.2f} ms (at {size}x{size})")
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
