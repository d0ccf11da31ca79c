"""Main job: train a small ResNet on Fashion-MNIST, prune it with Taylor-FO-BN
scores during fit, remove the pruned filters, and report before/after.

    python examples/fashion_mnist.py            # default run (≈10 min on 2 CPU cores)
    python examples/fashion_mnist.py --quick    # smoke run (≈2 min)

Steps:
  1. load Fashion-MNIST (keras.datasets / tfds when reachable, else the Debian
     package `dataset-fashion-mnist` in /usr/share/datasets/fashion-mnist/);
  2. train a CIFAR-style ResNet (conv-BN-ReLU blocks with residual Adds);
  3. add gates and keep training with `keras_taylor.TaylorPruning`: every K
     minibatches the N globally lowest-scored channel groups are gated off,
     until FLOPs are at most `--target` of the original; the rest of the run
     fine-tunes;
  4. `keras_taylor.prune` rebuilds the model without the pruned filters;
  5. print top-1, FLOPs, params and measured CPU latency before/after, and
     export the pruned model as a SavedModel for TF Serving.

Everything the run measured is also written to `<output_dir>/results.json`.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_taylor as kt  # noqa: E402
from keras_taylor import datasets, export, latency, models  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Smoke-test sizes: a smaller ResNet on a 12,800-image subset.")
flags.DEFINE_float("target", 0.5, "Prune until FLOPs are at most this fraction of the original.")
flags.DEFINE_integer("epochs", None, "Training epochs before pruning (default 4, quick 2).")
flags.DEFINE_integer("prune_epochs", None, "Epochs of pruning + fine-tuning (default 4, quick 2).")
flags.DEFINE_integer("prune_every", None, "Minibatches between pruning steps, K (default 30, quick 5).")
flags.DEFINE_integer("channels_per_step", 8, "Channel groups removed per pruning step, N.")
flags.DEFINE_integer("blocks", None, "Residual blocks per stage (default 2: ResNet-14; quick 1: ResNet-8).")
flags.DEFINE_integer("batch_size", 128, "Training batch size.")
flags.DEFINE_integer("train_subset", None, "Use only this many training images (default all; quick 12800).")
flags.DEFINE_string("data_dir", None, "Directory with the four Fashion-MNIST IDX files.")
flags.DEFINE_string("output_dir", "runs/fashion_mnist", "Where the models, plan and results go.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_integer("latency_rounds", 15, "Interleaved rounds for the latency measurement.")
flags.DEFINE_float(
    "target_latency", None,
    "Prune to this fraction of the latency predicted by a table measured on --latency_runtime "
    "(HALP knapsack, docs/latency.md) instead of --target FLOPs.",
)
flags.DEFINE_enum("latency_runtime", "tflite", ["tf", "tflite", "onnxruntime"], "Runtime of the latency table.")
flags.DEFINE_bool(
    "control", False,
    "Also train the unpruned model for the same extra epochs and schedule as the pruning phase, "
    "so the accuracy cost of pruning is compared at an equal training budget (≈+4 min).",
)


def compile_model(model, learning_rate):
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="acc")],
    )
    return model


def top1(model, test_ds) -> float:
    compile_model(model, 0.0)
    return float(model.evaluate(test_ds, verbose=0, return_dict=True)["acc"])


def main(argv):
    del argv
    import logging as pylogging

    pylogging.getLogger("tensorflow").setLevel(pylogging.WARNING)
    quick = FLAGS.quick
    epochs = FLAGS.epochs if FLAGS.epochs is not None else (2 if quick else 4)
    prune_epochs = FLAGS.prune_epochs if FLAGS.prune_epochs is not None else (2 if quick else 4)
    prune_every = FLAGS.prune_every if FLAGS.prune_every is not None else (5 if quick else 30)
    blocks = FLAGS.blocks if FLAGS.blocks is not None else (1 if quick else 2)
    subset = FLAGS.train_subset if FLAGS.train_subset is not None else (12_800 if quick else None)
    verbose = 1 if sys.stdout.isatty() else 2
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    keras.utils.set_random_seed(FLAGS.seed)
    started = time.time()

    train_ds, test_ds = datasets.fashion_mnist_datasets(
        batch_size=FLAGS.batch_size, train_subset=subset, data_dir=FLAGS.data_dir, seed=FLAGS.seed
    )
    steps_per_epoch = int(train_ds.cardinality())

    # 1. Train the dense model (cosine-decayed SGD).
    model = models.resnet(input_shape=(28, 28, 1), widths=(16, 32, 64), blocks_per_stage=blocks)
    schedule = keras.optimizers.schedules.CosineDecay(0.1, decay_steps=epochs * steps_per_epoch, alpha=0.01)
    compile_model(model, schedule)
    print(f"== Training {model.name} ({2 + 6 * blocks} layers) for {epochs} epochs, {steps_per_epoch} steps each")
    model.fit(train_ds, epochs=epochs, verbose=verbose, shuffle=False)  # ds is shuffled
    acc_before = top1(model, test_ds)
    model.save(os.path.join(FLAGS.output_dir, "dense.keras"))
    acc_control = None
    if FLAGS.control:
        control = keras.models.clone_model(model)
        control.set_weights(model.get_weights())
        compile_model(control, keras.optimizers.schedules.CosineDecay(
            0.02, decay_steps=prune_epochs * steps_per_epoch, alpha=0.05))
        print(f"== Control: the unpruned model, {prune_epochs} more epochs with the pruning phase's schedule")
        control.fit(train_ds, epochs=prune_epochs, verbose=verbose, shuffle=False)
        acc_control = top1(control, test_ds)

    # 2. Gate, prune while training, fine-tune.
    gated = kt.add_gates(model)
    finetune = keras.optimizers.schedules.CosineDecay(0.02, decay_steps=prune_epochs * steps_per_epoch, alpha=0.05)
    compile_model(gated, finetune)
    table = None
    if FLAGS.target_latency is not None:
        print(f"== Measuring a latency table on {FLAGS.latency_runtime}, batch 1")
        table = kt.LatencyTable.measure(model, runtime=FLAGS.latency_runtime, batch_size=1, verbose=verbose)
    pruner = kt.TaylorPruning(
        target=FLAGS.target if table is None else FLAGS.target_latency,
        metric="flops" if table is None else "latency", latency=table,
        prune_every=prune_every, channels_per_step=FLAGS.channels_per_step,
    )
    print(
        f"== Pruning to {pruner.target:.0%} {'FLOPs' if table is None else 'predicted latency'}: {FLAGS.channels_per_step} channel groups every {prune_every} "
        f"minibatches (of {kt.analyze(gated).num_groups}), then fine-tuning; {prune_epochs} epochs in all"
    )
    board = kt.PruningTensorBoard(pruner, log_dir=os.path.join(FLAGS.output_dir, "logs"))
    fit_history = gated.fit(
        train_ds, epochs=prune_epochs, verbose=verbose, callbacks=[pruner, board], shuffle=False,
        validation_data=test_ds,
    )
    if not pruner.done:
        logging.warning("Pruning did not reach the target in %d epochs; raise --prune_epochs.", prune_epochs)

    # 3. Surgery.
    pruned = kt.prune(gated)
    acc_after = top1(pruned, test_ds)
    pruner.plan.save(os.path.join(FLAGS.output_dir, "plan.json"))
    pruned.save(os.path.join(FLAGS.output_dir, "pruned.keras"))

    # 4. Measure.
    before, after = kt.profile(model), kt.profile(pruned)
    lat = {}
    for batch in (1, 64):
        lat[batch] = latency.measure_latency(
            {"original": model, "pruned": pruned}, batch_size=batch, rounds=FLAGS.latency_rounds
        )
    x_check = next(iter(test_ds))[0].numpy()[:8]
    saved = export.export_saved_model(pruned, os.path.join(FLAGS.output_dir, "saved_model"), check_inputs=x_check)

    rows = [
        ("top-1 (test, 10k)", f"{acc_before:.4f}", f"{acc_after:.4f}", f"{(acc_after - acc_before) * 100:+.2f} pts"),
        ("FLOPs (MACs)", f"{before.flops:,}", f"{after.flops:,}", f"{after.flops / before.flops:.3f}x"),
        ("params", f"{before.params:,}", f"{after.params:,}", f"{after.params / before.params:.3f}x"),
    ]
    for batch, res in lat.items():
        rows.append(
            (
                f"CPU latency, batch {batch} (ms)",
                f"{res['original']['median_ms']:.3f}",
                f"{res['pruned']['median_ms']:.3f}",
                f"{res['pruned']['ratio_median']:.3f}x "
                f"[{res['pruned']['ratio_min']:.2f}-{res['pruned']['ratio_max']:.2f}]",
            )
        )
    if table is not None:
        from keras_taylor import latency_table

        rng = np.random.default_rng(FLAGS.seed)
        runners = {k: latency_table._runner(m, FLAGS.latency_runtime, 1, rng) for k, m in (("original", model), ("pruned", pruned))}
        measured = latency.time_callables(runners, rounds=FLAGS.latency_rounds)
        p0, p1 = table.predict(model), table.predict(pruned)
        m0, m1 = measured["original"]["min_ms"], measured["pruned"]["min_ms"]
        rows.append((f"{FLAGS.latency_runtime} latency b1, predicted (ms)", f"{p0:.3f}", f"{p1:.3f}", f"{p1 / p0:.3f}x"))
        rows.append((f"{FLAGS.latency_runtime} latency b1, measured min (ms)", f"{m0:.3f}", f"{m1:.3f}", f"{m1 / m0:.3f}x"))
    if acc_control is not None:
        rows.insert(1, (
            "top-1, unpruned + same extra epochs", f"{acc_control:.4f}", f"{acc_after:.4f}",
            f"{(acc_after - acc_control) * 100:+.2f} pts",
        ))
    head = ("", "original", "pruned", "pruned/original")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
    print("\n== Before / after (latency: median of interleaved rounds; ratio: median [min-max] of paired rounds)")
    for r in [head] + rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    counts_before = kt.analyze(model).layer_channel_counts()
    counts_after = kt.analyze(pruned).layer_channel_counts()
    print("\n== Channels per layer (before -> after)")
    print(", ".join(f"{k} {v}->{counts_after[k]}" for k, v in counts_before.items()))
    print(f"\nSavedModel (serving_default) written to {saved['path']}; reload check max |diff| = {saved['max_abs_diff']:.2e}")
    print(f"TensorBoard scalars: tensorboard --logdir {os.path.join(FLAGS.output_dir, 'logs')}")
    try:
        kt.plot_channels(model, pruned, os.path.join(FLAGS.output_dir, "channels.png"))
        kt.plot_history(pruner, fit_history, os.path.join(FLAGS.output_dir, "history.png"))
        print(f"Plots: {FLAGS.output_dir}/channels.png, {FLAGS.output_dir}/history.png")
    except ImportError as e:  # matplotlib is optional
        print(f"No plots: {e}")

    results = {
        "command": " ".join(["python"] + sys.argv),
        "quick": quick,
        "epochs": epochs,
        "prune_epochs": prune_epochs,
        "prune_every": prune_every,
        "channels_per_step": FLAGS.channels_per_step,
        "target": FLAGS.target,
        "train_images": subset or 60_000,
        "top1_before": acc_before,
        "top1_after": acc_after,
        "top1_control": acc_control,
        "flops_before": before.flops,
        "flops_after": after.flops,
        "params_before": before.params,
        "params_after": after.params,
        "latency": {str(k): v for k, v in lat.items()},
        "channels_before": counts_before,
        "channels_after": counts_after,
        "pruning_history": pruner.history,
        "wall_seconds": time.time() - started,
    }
    if table is not None:
        results["latency_table"] = {
            "runtime": FLAGS.latency_runtime, "target": FLAGS.target_latency,
            "predicted_ms": [p0, p1], "measured_min_ms": [m0, m1],
        }
    with open(os.path.join(FLAGS.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"Done in {results['wall_seconds'] / 60:.1f} min; results in {FLAGS.output_dir}/results.json")


if __name__ == "__main__":
    app.run(main)
