"""Transfer learning + Taylor pruning on the papers' kind of datasets (ICLR'17 §3).

Molchanov et al. (ICLR 2017) prune ImageNet-pretrained networks while fine-tuning
them on small fine-grained datasets (Oxford Flowers 102, Caltech-UCSD Birds
200-2011). This script does the same with a `keras.applications` backbone nested
in a functional model with a new classification head:

    python examples/papers_datasets.py --dataset oxford_flowers102 --backbone MobileNetV2 --target 0.5
    python examples/papers_datasets.py --dataset caltech_birds2011 --backbone ResNet50 --image_size 224
    python examples/papers_datasets.py --dataset cifar10 --mock --image_size 32 --steps 4   # offline smoke run

Steps: load the dataset with TensorFlow Datasets (`download=True`); build the
backbone with ImageNet weights (or random weights, with a printed note, when
they cannot be downloaded); fine-tune the new head and the backbone; add gates
(`kt.add_gates` inlines the nested backbone); prune with `kt.TaylorPruning` to
`--target` of the FLOPs while fine-tuning; remove the filters with `kt.prune`;
print top-1 / FLOPs / params before and after.

Data: TFDS looks in `$TFDS_DATA_DIR` (default `~/tensorflow_datasets`). Offline,
and without the prepared dataset there, the script stops with one line saying
where TFDS looked and how to get the data (`tfds build <name>` on a machine with
internet, then copy the prepared `<name>/` directory). `--mock` replaces the data
with `tfds.testing.mock_data` random images, so the code path runs offline (CI).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", "oxford_flowers102", ["cifar10", "oxford_flowers102", "caltech_birds2011"], "TFDS dataset.")
flags.DEFINE_enum("backbone", "MobileNetV2", ["MobileNetV2", "ResNet50"], "keras.applications backbone.")
flags.DEFINE_float("alpha", 0.35, "MobileNetV2 width multiplier (0.35, 0.5, 0.75, 1.0, 1.3, 1.4).")
flags.DEFINE_string("weights", "imagenet", "Backbone weights: 'imagenet' (falls back to random when unreachable) or 'none'.")
flags.DEFINE_float("target", 0.5, "Prune until FLOPs are at most this fraction of the original.")
flags.DEFINE_integer("image_size", 128, "Images are resized to image_size x image_size.")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
flags.DEFINE_integer("head_epochs", 2, "Epochs training only the new head (backbone frozen).")
flags.DEFINE_integer("epochs", 2, "Epochs fine-tuning all layers before pruning.")
flags.DEFINE_integer("prune_epochs", 6, "Epochs of pruning + fine-tuning.")
flags.DEFINE_integer("prune_every", 20, "Minibatches between pruning steps, K.")
flags.DEFINE_integer("channels_per_step", None, "Channel groups removed per pruning step, N (default: automatic).")
flags.DEFINE_float("learning_rate", 0.01, "SGD learning rate for fine-tuning and pruning (the head-only phase uses 10x).")
flags.DEFINE_integer("steps", None, "Limit every epoch to this many steps (smoke runs).")
flags.DEFINE_bool("download", True, "Download and prepare the dataset when it is not in the TFDS data directory.")
flags.DEFINE_bool("mock", False, "Use tfds.testing.mock_data random images instead of the real dataset (offline, CI).")
flags.DEFINE_integer("mock_examples", 64, "Examples per split with --mock.")
flags.DEFINE_string("data_dir", None, "TFDS data directory (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).")
flags.DEFINE_string("output_dir", "runs/papers_datasets", "Where the pruned model, plan and results go.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_bool("jit_compile", False, "XLA-compile the train step (faster steps on GPU, but slow to compile on CPU).")

# Splits (train, test) and the host each dataset downloads from (checked with a
# short timeout so that an offline machine fails at once instead of waiting).
SPLITS = {
    "cifar10": ("train", "test"),
    "oxford_flowers102": ("train+validation", "test"),
    "caltech_birds2011": ("train", "test"),
}
HOSTS = {
    "cifar10": "www.cs.toronto.edu",
    "oxford_flowers102": "www.robots.ox.ac.uk",
    "caltech_birds2011": "data.caltech.edu",
}


class DataUnavailable(RuntimeError):
    pass


def _reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_splits(name: str, data_dir: str | None, mock: bool):
    """(train, test) `tf.data` datasets of (uint8 image, int label) and the number of classes."""
    import tensorflow_datasets as tfds

    train_split, test_split = SPLITS[name]
    if mock:
        with tfds.testing.mock_data(num_examples=FLAGS.mock_examples):
            builder = tfds.builder(name)
            train, test = (tfds.load(name, split=s, as_supervised=True) for s in (train_split, test_split))
        return train, test, builder.info.features["label"].num_classes
    builder = tfds.builder(name, data_dir=data_dir)
    how = (
        f"get it with `tfds build {name}` (or `python -c \"import tensorflow_datasets as tfds; "
        f"tfds.load('{name}')\"`) on a machine with internet, then copy the prepared {name}/ directory "
        f"into {os.path.dirname(os.path.dirname(builder.data_dir))} (or point --data_dir / $TFDS_DATA_DIR at it); "
        "--mock runs on random images instead"
    )
    if not builder.is_prepared() and not FLAGS.download:
        raise DataUnavailable(f"Dataset {name!r} is not prepared in {builder.data_dir} and --nodownload was given: {how}.")
    if not builder.is_prepared() and not _reachable(HOSTS[name]):
        raise DataUnavailable(
            f"Dataset {name!r} is not prepared in {builder.data_dir} and its download host {HOSTS[name]} "
            f"is unreachable (offline?): {how}."
        )
    try:
        train, test = (
            tfds.load(name, split=s, data_dir=data_dir, download=FLAGS.download, as_supervised=True)
            for s in (train_split, test_split)
        )
    except Exception as e:  # download / preparation failures of any kind
        raise DataUnavailable(
            f"Dataset {name!r} could not be downloaded/prepared in {builder.data_dir} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): {how}."
        ) from e
    return train, test, builder.info.features["label"].num_classes


def pipeline(ds, size: int, batch: int, training: bool, seed: int):
    import tensorflow as tf

    def prep(x, y):
        x = tf.image.resize(tf.cast(x, "float32"), (size, size))
        if training:
            x = tf.image.random_flip_left_right(x, seed=seed)
        return x, y

    if training:
        ds = ds.shuffle(2048, seed=seed)
    return ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE).batch(batch).prefetch(tf.data.AUTOTUNE)


def build_backbone(kind: str, size: int, weights: str | None):
    """The backbone without its top; falls back to random weights when the ImageNet ones cannot be had."""
    import keras

    def make(w):
        if kind == "MobileNetV2":
            return keras.applications.MobileNetV2(
                input_shape=(size, size, 3), alpha=FLAGS.alpha, include_top=False, weights=w
            )
        return keras.applications.ResNet50(input_shape=(size, size, 3), include_top=False, weights=w)

    if weights is None:
        return make(None), "random weights (weights=None)"
    try:
        return make(weights), "ImageNet weights"
    except Exception as e:  # no network, blocked host, ...
        print(
            f"NOTE: ImageNet weights for {kind} could not be downloaded ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160]}); falling back to weights=None (random initialization). "
            "Accuracies are then those of training from scratch, not of transfer learning."
        )
        return make(None), "random weights: ImageNet download failed"


def build_model(kind: str, size: int, num_classes: int, weights: str | None):
    """input -> preprocessing -> backbone (nested, training=False) -> GAP -> dropout -> new Dense head."""
    import keras
    from keras import layers

    backbone, source = build_backbone(kind, size, weights)
    inputs = keras.Input((size, size, 3), name="image")
    if kind == "MobileNetV2":  # preprocess_input: [0, 255] -> [-1, 1]
        x = layers.Rescaling(1 / 127.5, offset=-1.0, name="preprocess")(inputs)
    else:  # caffe preprocessing: RGB -> BGR, minus the ImageNet means
        x = keras.applications.resnet50.preprocess_input(inputs)
    x = backbone(x, training=False)  # BN in inference mode while fine-tuning (Keras transfer-learning guide)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(0.2, name="dropout")(x)
    outputs = layers.Dense(num_classes, name="head")(x)
    return keras.Model(inputs, outputs, name=f"{kind.lower()}_transfer"), backbone, source


def compile_model(model, lr):
    import keras

    model.compile(
        optimizer=keras.optimizers.SGD(lr, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="acc")],
        jit_compile=FLAGS.jit_compile,
    )
    return model


def main(argv):
    del argv
    started = time.time()
    import logging as pylogging

    pylogging.getLogger("tensorflow").setLevel(pylogging.ERROR)
    try:
        train_raw, test_raw, num_classes = load_splits(FLAGS.dataset, FLAGS.data_dir, FLAGS.mock)
    except DataUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import keras

    import keras_taylor as kt

    keras.utils.set_random_seed(FLAGS.seed)
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    size, verbose = FLAGS.image_size, (1 if sys.stdout.isatty() else 2)
    train = pipeline(train_raw, size, FLAGS.batch_size, True, FLAGS.seed)
    test = pipeline(test_raw, size, FLAGS.batch_size, False, FLAGS.seed)
    if FLAGS.steps:
        train, test = train.take(FLAGS.steps).repeat(), test.take(FLAGS.steps)
    steps = FLAGS.steps or None
    weights = None if FLAGS.weights.lower() == "none" else FLAGS.weights
    model, backbone, source = build_model(FLAGS.backbone, size, num_classes, weights)
    data_name = f"{FLAGS.dataset} (mock)" if FLAGS.mock else FLAGS.dataset
    print(f"== {model.name}: {FLAGS.backbone} backbone ({source}), {data_name}, {num_classes} classes, {size}x{size}")

    # 1. Train the new head on the frozen backbone, then fine-tune everything.
    backbone.trainable = False
    compile_model(model, FLAGS.learning_rate * 10)
    print(f"== Training the new head ({FLAGS.head_epochs} epochs), then fine-tuning all layers ({FLAGS.epochs} epochs)")
    model.fit(train, epochs=FLAGS.head_epochs, steps_per_epoch=steps, verbose=verbose)
    backbone.trainable = True  # before add_gates: the gated copy keeps each layer's trainable flag
    if FLAGS.epochs:
        compile_model(model, FLAGS.learning_rate)
        model.fit(train, epochs=FLAGS.epochs, steps_per_epoch=steps, verbose=verbose)
    acc_before = float(compile_model(model, 0.0).evaluate(test, verbose=0, return_dict=True)["acc"])

    # 2. Gate (the nested backbone is inlined) and prune while fine-tuning.
    gated = compile_model(kt.add_gates(model), FLAGS.learning_rate)
    pruner = kt.TaylorPruning(
        target=FLAGS.target, metric="flops", prune_every=FLAGS.prune_every, channels_per_step=FLAGS.channels_per_step
    )
    print(f"== Pruning to {FLAGS.target:.0%} FLOPs ({kt.analyze(gated).num_groups} channel groups), "
          f"every {FLAGS.prune_every} minibatches, {FLAGS.prune_epochs} epochs")
    gated.fit(train, epochs=FLAGS.prune_epochs, steps_per_epoch=steps, verbose=verbose, callbacks=[pruner])
    if not pruner.done:
        print(f"WARNING: pruning did not reach the target in {FLAGS.prune_epochs} epochs; raise --prune_epochs.")

    # 3. Surgery and report.
    pruned = compile_model(kt.prune(gated), 0.0)
    acc_after = float(pruned.evaluate(test, verbose=0, return_dict=True)["acc"])
    before, after = kt.profile(model), kt.profile(pruned)
    rows = [
        ("top-1 (test)", f"{acc_before:.4f}", f"{acc_after:.4f}", f"{(acc_after - acc_before) * 100:+.2f} pts"),
        ("FLOPs (MACs)", f"{before.flops:,}", f"{after.flops:,}", f"{after.flops / before.flops:.3f}x"),
        ("params", f"{before.params:,}", f"{after.params:,}", f"{after.params / before.params:.3f}x"),
    ]
    head = ("", "original", "pruned", "pruned/original")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
    print("\n== Before / after")
    for r in [head] + rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    pruned.save(os.path.join(FLAGS.output_dir, "pruned.keras"))
    pruner.plan.save(os.path.join(FLAGS.output_dir, "plan.json"))
    results = {
        "command": " ".join(["python"] + sys.argv),
        "dataset": FLAGS.dataset, "mock": FLAGS.mock, "backbone": FLAGS.backbone, "weights": source,
        "image_size": size, "target": FLAGS.target,
        "top1_before": acc_before, "top1_after": acc_after,
        "flops_before": before.flops, "flops_after": after.flops,
        "params_before": before.params, "params_after": after.params,
        "pruning_done": bool(pruner.done), "wall_seconds": time.time() - started,
    }
    with open(os.path.join(FLAGS.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"Done in {results['wall_seconds']:.0f} s; pruned model, plan and results.json in {FLAGS.output_dir}/")
    return 0


if __name__ == "__main__":
    app.run(main)
