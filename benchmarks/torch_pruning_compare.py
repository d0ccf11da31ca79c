"""Quality against Torch-Pruning: keras_taylor's Taylor-FO-BN vs Torch-Pruning's
GroupTaylorImportance on the same ResNet, data, schedule and FLOPs target.

    python benchmarks/torch_pruning_compare.py                    # main job sizes, seed 0
    python benchmarks/torch_pruning_compare.py --seeds 0,1
    python benchmarks/torch_pruning_compare.py --train_subset 20000 --epochs 3 --prune_epochs 3
    python benchmarks/torch_pruning_compare.py --quick            # smoke run (ResNet-8, 2,560 images)
    python benchmarks/torch_pruning_compare.py --shared_dense     # control: both prune the Keras-trained model

The runs behind benchmarks/sections/torch_pruning.md (≈38 + 20 min on 2 busy cores,
2026-11-21, the gated path; the wall-time runs with kt.fit_prune: ≈6 min each on 2 quiet cores):

    python benchmarks/torch_pruning_compare.py --keras_path=gated --seeds 0,1 --train_subset 20000 --epochs 3 --prune_epochs 3 --prune_every 10
    python benchmarks/torch_pruning_compare.py --keras_path=gated --shared_dense --seeds 0,1 --train_subset 20000 --epochs 3 --prune_epochs 3 --prune_every 10
    python benchmarks/torch_pruning_compare.py --shared_dense --seeds 0,1,2 --train_subset 20000 --epochs 3 --prune_epochs 3 --prune_every 10 --plot docs/img/torch_pruning_step_log.png
    python benchmarks/torch_pruning_compare.py --shared_dense --seeds 0,1,2 --train_subset 20000 --epochs 3 --prune_epochs 3 --prune_every 10 --channel_multiple 8 [--torch_round_to 8]

For each seed:
  1. build `keras_taylor.models.resnet` (widths 16/32/64) with `keras.utils.set_random_seed(seed)`;
     write its *initial* weights, the Fashion-MNIST arrays (the ones
     `keras_taylor.datasets` loads; the same `train_subset` selection as
     `fashion_mnist_datasets`), one seeded permutation per epoch, and the
     model's initial logits on 8 test images to `<work_dir>/seed<k>.npz`;
  2. PyTorch side (`benchmarks/torch_side.py`, in `.venv-torch`, created here
     when missing): the same ResNet in PyTorch loaded with those initial
     weights (checked against the Keras logits), trained on the same
     minibatches in the same order with the same optimizer and schedule, then
     pruned with Torch-Pruning (`BasePruner(global_pruning=True)`,
     `GroupTaylorImportance()`, one `pruner.step()` every `prune_every`
     minibatches on gradients summed over them, `iterative_steps` set so each
     step removes `channels_per_step` groups) until its conv+linear MACs are
     at most `target` of the unpruned net's, then fine-tuned;
  3. Keras side, in this process: the main job's recipe
     (`examples/fashion_mnist.py`): SGD(momentum 0.9, Nesterov), cosine decay
     0.1 -> 0.001 over the training epochs, then `add_gates` +
     `TaylorPruning(target, metric="flops", prune_every, channels_per_step)`
     with cosine decay 0.02 -> 0.001 over the pruning epochs, run by
     `keras_taylor.fit_prune` (default `--keras_path=fit_prune`: one `fit`,
     the physically pruned model trains from the minibatch after the target,
     optimizer state sliced); `--keras_path=gated` is the earlier path (the
     gated full-size model trains to the end, then `keras_taylor.prune`).
With `--shared_dense`, step 2 skips its training and starts pruning from the
Keras model trained in step 3 (weights and BN statistics copied, logits
checked), so the two pruners start from the same dense model.
Both sides run one after the other (not concurrently), so their wall times are
comparable. "prune_and_finetune_seconds" is the same span on both sides: from
the start of pruning (ours: `add_gates`; theirs: building the pruner's
dependency graph) to the end of the last fine-tuning minibatch, every pruning
step, the surgery and (ours) the switch to the pruned model and both traces of
the train step included, evaluation excluded. Both record a per-minibatch
step-time log (`step_log`; ours also `phases`: `_harness.StepTimer`).
The Keras side's input pipeline does the PyTorch side's per-minibatch work
(gather, cast, /255) one minibatch ahead with tf.data's autotuning off
(`keras_phase_ds`; `--tf_data_autotune` restores the earlier parallel-map +
AUTOTUNE-prefetch pipeline, whose end-of-`fit` pauses are measured in
benchmarks/sections/torch_pruning.md, "Wall time").
Results: `benchmarks/results/torch_pruning_compare.json`, one entry per
experiment: `independent_training`, `shared_dense_start` (gated path, the
2026-11-21 runs), `independent_training_fit_prune`, `shared_dense_start_fit_prune`;
a non-default `--criterion` / `--normalization` (passed to `kt.TaylorPruning`)
appends `_<criterion>` / `_<normalization>` to the key
(`shared_dense_start_fit_prune_mean_group`), `--channel_multiple N` (ours) /
`--torch_round_to N` (theirs) `_multipleN` / `_tproundN`, `--tf_data_autotune`
`_tfdata_autotune` (the runs before 2026-12-01 12:00 UTC used that pipeline).
`--plot PATH` draws both sides' per-minibatch step times (`--plot_only`: from
the entry already in the file). `--trace_pauses`: faulthandler
dumps the Python stacks every second (`--trace_pauses_every`) from the StepTimer's `on_train_end` until
`fit` returns (`<work_dir>/pauses_seed<k>.log`, also `pause_traces` in the JSON).
"""

from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_taylor as kt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402
from keras_taylor import datasets, models  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_PY = _harness.TORCH_PY
ensure_torch_venv, torch_versions = _harness.ensure_torch_venv, _harness.torch_versions

FLAGS = flags.FLAGS
flags.DEFINE_list("seeds", ["0"], "Seeds (init, subset, epoch order); each runs both sides.")
flags.DEFINE_bool("quick", False, "Smoke sizes: ResNet-8, 2,560 images, 1+2 epochs, prune_every 2.")
flags.DEFINE_integer("epochs", 4, "Training epochs before pruning.")
flags.DEFINE_integer("prune_epochs", 4, "Epochs of pruning + fine-tuning.")
flags.DEFINE_integer("prune_every", 30, "Minibatches between pruning steps (K), both sides.")
flags.DEFINE_integer("channels_per_step", 8, "Channel groups removed per pruning step (N), both sides.")
flags.DEFINE_float("target", 0.5, "Prune until conv+dense MACs are at most this fraction.")
flags.DEFINE_float("torch_pruning_ratio", 0.5, "Torch-Pruning's pruning_ratio (channel fraction at its last iterative step).")
flags.DEFINE_integer("train_subset", None, "Use this many training images (default: all 60,000).")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("blocks", 2, "Residual blocks per stage (2: ResNet-14).")
flags.DEFINE_integer("torch_threads", 2, "torch.set_num_threads on the PyTorch side.")
flags.DEFINE_bool(
    "shared_dense", False,
    "Control experiment: the PyTorch side skips its own training and starts pruning from the Keras "
    "side's trained weights, so both pruners start from the same dense model.",
)
flags.DEFINE_enum(
    "keras_path", "fit_prune", ["fit_prune", "gated"],
    "fit_prune: one `kt.fit_prune` (training moves to the physically pruned model at the switch); "
    "gated: the earlier path (`TaylorPruning` in `fit`, the gated full-size model trains to the end, "
    "then `kt.prune`).",
)
flags.DEFINE_enum("switch", "step", ["step", "epoch"], "kt.fit_prune(switch=) with --keras_path=fit_prune.")
flags.DEFINE_string("criterion", "taylor_fo_bn", "kt.TaylorPruning(criterion=) on the Keras side.")
flags.DEFINE_enum("normalization", "none", ["none", "l2_layer", "mean_group"],
                  "kt.TaylorPruning(normalization=) on the Keras side (mean_group: Torch-Pruning's per-group mean).")
flags.DEFINE_integer("channel_multiple", None,
                     "kt.TaylorPruning(channel_multiple=) on the Keras side: the last pruning step rounds every "
                     "layer's kept channels to a multiple of it (8: the SIMD width), staying at or under the target.")
flags.DEFINE_integer("torch_round_to", None,
                     "Torch-Pruning's BasePruner(round_to=) on the PyTorch side (its channel rounding).")
flags.DEFINE_bool("tf_data_autotune", False,
                  "Keras side's input pipeline with tf.data autotuning (parallel map + AUTOTUNE prefetch). "
                  "Default: off, map + prefetch(1) (see keras_phase_ds).")
flags.DEFINE_bool(
    "trace_pauses", False,
    "From the StepTimer's on_train_end until `fit` returns, dump the main thread's Python stack every "
    "second (faulthandler) into <work_dir>/pauses_seed<k>.log, so an end-of-fit pause shows where it is.")
flags.DEFINE_float("trace_pauses_every", 1.0, "Seconds between the stack dumps of --trace_pauses.")
flags.DEFINE_enum("sides", "both", ["both", "keras", "torch"], "Which sides to run.")
flags.DEFINE_string("plot", None, "After the run, draw both sides' per-minibatch step times (one panel per seed) here (PNG).")
flags.DEFINE_bool("plot_only", False, "Only draw the step-time plot of this configuration's entry in --output "
                  "(to --plot, default docs/img/torch_pruning_step_log.png); no run.")
flags.DEFINE_string("work_dir", "runs/torch_pruning_compare", "Where the .npz exports and the torch JSONs go.")
flags.DEFINE_string("output", None, "Result JSON (default benchmarks/results/torch_pruning_compare.json).")


# ------------------------------------------------------------------ data
def load_split(seed: int, subset: int | None):
    """The arrays `keras_taylor.datasets.fashion_mnist_datasets` uses (same subset rule)."""
    (x_train, y_train), (x_test, y_test) = datasets.load_fashion_mnist()
    if subset is not None:
        keep = np.random.default_rng(seed).permutation(len(x_train))[:subset]
        x_train, y_train = x_train[keep], y_train[keep]
    return x_train, y_train, x_test, y_test


def keras_phase_ds(x, y, orders, batch_size, autotune=None):
    """Minibatches in exactly `orders` (one index permutation per epoch), /255 float32.

    With `autotune` false (the default, `--tf_data_autotune`), the pipeline
    does the PyTorch side's per-minibatch work (gather, cast, /255) one
    minibatch ahead (`map` then `prefetch(1)`) with tf.data's autotuning
    off (`tf.data.Options().autotune.enabled = False`). With autotuning on,
    Keras's `fit` paused for seconds before returning in 6 of 17 seed runs
    of this benchmark (1.6-40.8 s, 2026-12-01), with it off in none of 24
    (benchmarks/sections/torch_pruning.md, "Wall time")."""
    import tensorflow as tf

    autotune = FLAGS.tf_data_autotune if autotune is None else autotune

    x_t, y_t = tf.constant(x), tf.constant(y)
    ds = None
    for order in orders:
        d = tf.data.Dataset.from_tensor_slices(order.astype("int32")).batch(batch_size)
        ds = d if ds is None else ds.concatenate(d)

    def gather(idx):
        return tf.cast(tf.gather(x_t, idx), tf.float32)[..., tf.newaxis] / 255.0, tf.cast(tf.gather(y_t, idx), tf.int32)

    if autotune:
        return ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.map(gather).prefetch(1).with_options(options)


def keras_test_ds(x, y):
    import tensorflow as tf

    return (
        tf.data.Dataset.from_tensor_slices((x, y)).batch(1000)
        .map(lambda a, b: (tf.cast(a, tf.float32)[..., tf.newaxis] / 255.0, tf.cast(b, tf.int32)))
    )


# ------------------------------------------------------------------ keras side
def compile_model(model, learning_rate):  # as examples/fashion_mnist.py
    return _harness.compile_model(model, learning_rate, nesterov=True)


def top1(model, test_ds) -> float:
    compile_model(model, 0.0)
    return float(model.evaluate(test_ds, verbose=0, return_dict=True)["acc"])


class TimedTaylorPruning(kt.TaylorPruning):
    """TaylorPruning that also times its pruning steps (host side) and notes when it finished."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prune_seconds = 0.0
        self.phase_start = None
        self.done_at = None

    def _prune_step(self):
        t = time.perf_counter()
        super()._prune_step()
        self.prune_seconds += time.perf_counter() - t
        if self.done and self.done_at is None:
            self.done_at = time.time() - self.phase_start


def train_keras(model, data, perms, epochs, steps, verbose):
    x_train, y_train, x_test, y_test = data
    started = time.time()
    compile_model(model, keras.optimizers.schedules.CosineDecay(0.1, decay_steps=epochs * steps, alpha=0.01))
    model.fit(keras_phase_ds(x_train, y_train, perms[:epochs], FLAGS.batch_size), epochs=epochs,
              steps_per_epoch=steps, verbose=verbose, shuffle=False)
    train_s = time.time() - started
    acc_before = top1(model, keras_test_ds(x_test, y_test))
    print(f"[keras] top-1 before pruning {acc_before:.4f}", flush=True)
    return time.time() - started, train_s, acc_before  # (training + evaluation wall, fit wall, top-1)


def run_keras(model, data, perms, epochs, prune_epochs, steps, verbose, trained=None, pause_log=None):
    """Prunes and fine-tunes `model` (trained here unless `trained`).

    The prune-and-fine-tune phase is timed as on the PyTorch side: from the
    start of pruning (`add_gates`; theirs: building the pruner's dependency
    graph) to the end of the last fine-tuning minibatch, every pruning step,
    the surgery and the switch to the pruned model included; evaluations
    excluded on both sides."""
    x_train, y_train, x_test, y_test = data
    test_ds = keras_test_ds(x_test, y_test)
    dense_wall, train_s, acc_before = trained or train_keras(model, data, perms, epochs, steps, verbose)
    started = time.time()  # with --shared_dense the PyTorch side ran in between: not counted

    t_phase = time.time()
    t0 = time.perf_counter()
    gated = kt.add_gates(model)
    compile_model(gated, keras.optimizers.schedules.CosineDecay(0.02, decay_steps=prune_epochs * steps, alpha=0.05))
    pruner = TimedTaylorPruning(target=FLAGS.target, metric="flops", prune_every=FLAGS.prune_every,
                                channels_per_step=FLAGS.channels_per_step, criterion=FLAGS.criterion,
                                normalization=FLAGS.normalization, channel_multiple=FLAGS.channel_multiple)
    pruner.phase_start = t_phase
    timer = _harness.StepTimer(pruner, pause_log=pause_log, pause_every=FLAGS.trace_pauses_every)
    phase_ds = keras_phase_ds(x_train, y_train, perms[epochs:epochs + prune_epochs], FLAGS.batch_size)
    switched_at = None
    # Where time outside the steps goes: Python's garbage-collector pauses, and the moment
    # `fit` returned (after its callbacks' on_train_end, its data iterator released).
    gc_pauses, marks = [], {}

    def on_gc(phase, info):
        if phase == "start":
            marks["gc"] = time.perf_counter()
        elif "gc" in marks:
            gc_pauses.append((info["generation"], time.perf_counter() - marks.pop("gc")))

    fit = gated.fit

    def timed_fit(*args, **kwargs):
        try:
            return fit(*args, **kwargs)
        finally:
            marks["fit_returned"] = time.perf_counter()
            timer.stop_pause_trace()

    gated.fit = timed_fit  # instance attribute: fit_prune's `model.fit(...)` calls it
    gc.callbacks.append(on_gc)
    if FLAGS.keras_path == "fit_prune":
        pruned, history = kt.fit_prune(gated, phase_ds, pruning=pruner, epochs=prune_epochs, steps_per_epoch=steps,
                                       verbose=verbose, shuffle=False, callbacks=[timer], switch=FLAGS.switch)
        switched_at = list(history.switched_at) if history.switched_at else None
        t1 = time.perf_counter()
        surgery_s = None  # inside the run (the switch)
    else:
        gated.fit(phase_ds, epochs=prune_epochs, steps_per_epoch=steps, verbose=verbose, shuffle=False,
                  callbacks=[timer, pruner])
        t = time.perf_counter()
        pruned = kt.prune(gated)
        t1 = time.perf_counter()
        surgery_s = t1 - t
    phase_s = time.time() - t_phase
    gc.callbacks.remove(on_gc)
    del gated.fit
    acc_after = top1(pruned, test_ds)
    before, after = kt.profile(model), kt.profile(pruned)
    print(f"[keras] top-1 after {acc_after:.4f}; FLOPs {after.flops / before.flops:.3f}", flush=True)
    med = lambda v: 1000 * float(np.median(v)) if v else None  # noqa: E731
    phases = timer.phases(t0, t1)
    if timer.train_end is not None and "fit_returned" in marks:
        phases["train_end_to_fit_returned"] = marks["fit_returned"] - timer.train_end
    phases["gc_seconds"] = float(sum(p for _, p in gc_pauses))
    phases["gc_max_pause"] = max((p for _, p in gc_pauses), default=0.0)
    phases["gc_collections"] = [sum(1 for g, _ in gc_pauses if g == k) for k in range(3)]
    return {
        "path": FLAGS.keras_path,
        "switch": FLAGS.switch if FLAGS.keras_path == "fit_prune" else None,
        "switched_at": switched_at,
        "top1_before": acc_before,
        "top1_after": acc_after,
        "flops_before": before.flops, "flops_after": after.flops, "flops_fraction": after.flops / before.flops,
        "params_before": before.params, "params_after": after.params, "params_fraction": after.params / before.params,
        "channels_after": kt.analyze(pruned).layer_channel_counts(),
        "groups": kt.analyze(gated).num_groups,
        "groups_removed": len(pruner.removed),
        "pruning_history": pruner.history,
        "pruning_done": pruner.done,
        "pruning_done_at_minibatch": pruner.history[-1]["step"] if pruner.done else None,
        "train_seconds": train_s,
        "pruning_phase_seconds": pruner.done_at,
        "prune_and_finetune_seconds": phase_s,
        "pruning_steps_seconds": pruner.prune_seconds,
        "surgery_seconds": surgery_s,
        "step_ms_median_while_scoring": med(timer.scoring),
        "step_ms_median_after_pruning": med(timer.after),
        "scoring_overhead_ratio": (med(timer.scoring) / med(timer.after)) if timer.scoring and timer.after else None,
        "phases": phases,
        "epochs": timer.rows,
        "step_log": timer.log(),
        "wall_seconds": dense_wall + time.time() - started,
    }


# ------------------------------------------------------------------ results
def result_path() -> str:
    return FLAGS.output or os.path.join(REPO, "benchmarks", "results", "torch_pruning_compare.json")


def result_key() -> str:
    """The entry of the result file this configuration writes (and `--plot_only` reads)."""
    # The earlier gated-path runs keep their keys; kt.fit_prune runs get their own.
    key = "shared_dense_start" if FLAGS.shared_dense else "independent_training"
    key += "" if FLAGS.keras_path == "gated" else "_fit_prune"
    # A non-default setting gets its own entry (the defaults keep the old keys).
    if FLAGS.criterion != "taylor_fo_bn":
        key += "_" + FLAGS.criterion
    if FLAGS.normalization != "none":
        key += "_" + FLAGS.normalization
    if FLAGS.channel_multiple:
        key += f"_multiple{FLAGS.channel_multiple}"
    if FLAGS.torch_round_to:
        key += f"_tpround{FLAGS.torch_round_to}"
    if FLAGS.tf_data_autotune:
        key += "_tfdata_autotune"
    return key


def plot_step_logs(result: dict, path: str, window: int = 9) -> str:
    """Per-minibatch step time of both sides, one panel per seed: the raw
    times (dots) and their running median over `window` minibatches (lines),
    ours coloured by the model that trained the minibatch (gated full-size /
    physically pruned), theirs by whether pruning was done; a dashed line
    where each side reached the target."""
    from keras_taylor.plotting import new_figure

    runs = [r for r in result["runs"] if "keras" in r and "torch" in r]
    fig = new_figure(figsize=(7.5, 2.6 * len(runs)), layout="constrained")
    axes = fig.subplots(len(runs), 1, squeeze=False)[:, 0]

    def running_median(v):
        half = window // 2
        return np.array([np.median(v[max(0, i - half):i + half + 1]) for i in range(len(v))])

    for ax, run in zip(axes, runs):
        ours, theirs = run["keras"]["step_log"], run["torch"]["step_log"]
        for label, ms, after, color in (
            ("keras_taylor", np.asarray(ours["step_ms"]), np.asarray(ours["model"]) > 0, "tab:blue"),
            ("Torch-Pruning", np.asarray(theirs["step_ms"]), np.asarray(theirs["pruned"], dtype=bool), "tab:orange"),
        ):
            x = np.arange(1, len(ms) + 1)
            ax.plot(x, ms, ".", ms=2, color=color, alpha=0.25)
            smooth = running_median(ms)
            ax.plot(x[~after], smooth[~after], "-", color=color, lw=1.2, alpha=0.55,
                    label=f"{label}: full size, scoring")
            ax.plot(x[after], smooth[after], "-", color=color, lw=2.0, label=f"{label}: after the target")
            if after.any():
                ax.axvline(int(np.argmax(after)) + 1, color=color, ls="--", lw=0.8)
        k, t = run["keras"]["prune_and_finetune_seconds"], run["torch"]["prune_and_finetune_seconds"]
        ax.set_title(f"seed {run['seed']}: prune + fine-tune {k:.1f} s (ours) vs {t:.1f} s (Torch-Pruning), "
                     f"{k / t:.2f}x", fontsize=9)
        ax.set_ylabel("step (ms)")
        low = np.percentile(np.concatenate([ours["step_ms"], theirs["step_ms"]]), 1)
        high = np.percentile(np.concatenate([ours["step_ms"], theirs["step_ms"]]), 99)
        ax.set_ylim(0.8 * low, 1.15 * high)
    axes[-1].set_xlabel("minibatch of the prune + fine-tune phase (first steps trace: off the scale)")
    axes[0].legend(fontsize=7, ncol=2, loc="upper right")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# ------------------------------------------------------------------ main
def main(argv):
    del argv
    import logging as pylogging

    if FLAGS.plot_only:
        entry = _harness.read_json(result_path(), {}).get(result_key())
        if entry is None:
            raise SystemExit(f"No entry {result_key()!r} in {result_path()} to plot.")
        print("Step-time plot:", plot_step_logs(entry, FLAGS.plot or os.path.join(REPO, "docs", "img", "torch_pruning_step_log.png")))
        return

    pylogging.getLogger("tensorflow").setLevel(pylogging.WARNING)
    quick = FLAGS.quick
    epochs, prune_epochs = (1, 2) if quick else (FLAGS.epochs, FLAGS.prune_epochs)
    blocks = 1 if quick else FLAGS.blocks
    subset = 2560 if quick else FLAGS.train_subset
    if quick:
        FLAGS.prune_every = 2
    verbose = 1 if sys.stdout.isatty() else 2
    work_dir = os.path.join(REPO, FLAGS.work_dir)
    os.makedirs(work_dir, exist_ok=True)
    if FLAGS.sides in ("both", "torch"):
        ensure_torch_venv()
    started = time.time()
    runs = []
    for seed in [int(s) for s in FLAGS.seeds]:
        print(f"\n===== seed {seed}", flush=True)
        data = load_split(seed, subset)
        n = len(data[0])
        steps = math.ceil(n / FLAGS.batch_size)
        rng = np.random.default_rng([seed, 1])
        perms = np.stack([rng.permutation(n) for _ in range(epochs + prune_epochs)]).astype("int32")
        keras.utils.set_random_seed(seed)
        model = models.resnet(input_shape=(28, 28, 1), widths=(16, 32, 64), blocks_per_stage=blocks)
        check_x = data[2][:8].astype("float32")[..., None] / 255.0
        arrays = {
            "x_train": data[0], "y_train": data[1], "x_test": data[2], "y_test": data[3], "perms": perms,
            "check_logits": np.asarray(model(check_x, training=False), dtype="float32"),
        }
        for layer in model.layers:
            for i, w in enumerate(layer.get_weights()):
                arrays[f"w/{layer.name}/{i}"] = w
        trained = None
        if FLAGS.shared_dense:
            trained = train_keras(model, data, perms, epochs, steps, verbose)
            arrays["dense_check_logits"] = np.asarray(model(check_x, training=False), dtype="float32")
            for layer in model.layers:
                for i, w in enumerate(layer.get_weights()):
                    arrays[f"dense/{layer.name}/{i}"] = w
        npz = os.path.join(work_dir, f"seed{seed}.npz")
        np.savez(npz, **arrays)
        run = {"seed": seed, "train_images": n, "steps_per_epoch": steps}
        if FLAGS.sides in ("both", "torch"):
            out = os.path.join(work_dir, f"torch_seed{seed}.json")
            cmd = [TORCH_PY, os.path.join(REPO, "benchmarks", "torch_side.py"), "--data", npz, "--output", out,
                   "--epochs", str(epochs), "--prune_epochs", str(prune_epochs), "--prune_every", str(FLAGS.prune_every),
                   "--channels_per_step", str(FLAGS.channels_per_step), "--pruning_ratio", str(FLAGS.torch_pruning_ratio),
                   "--target", str(FLAGS.target), "--batch_size", str(FLAGS.batch_size), "--blocks", str(blocks),
                   "--threads", str(FLAGS.torch_threads), "--seed", str(seed)]
            if FLAGS.shared_dense:
                cmd.append("--from_keras_dense")
            if FLAGS.torch_round_to:
                cmd += ["--round_to", str(FLAGS.torch_round_to)]
            print("== PyTorch side:", " ".join(os.path.relpath(c, REPO) if c.startswith(REPO) else c for c in cmd), flush=True)
            # OpenMP threads that spin while waiting stall badly on a shared, oversubscribed CPU
            # (measured here: with 2 threads a ResNet-8 forward+backward ran 2.7-11x slower than with PASSIVE).
            env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
            subprocess.run(cmd, check=True, env=env)
            with open(out) as f:
                run["torch"] = json.load(f)
        if FLAGS.sides in ("both", "keras"):
            print("== Keras side (keras_taylor)", flush=True)
            pause_log = os.path.join(work_dir, f"pauses_seed{seed}.log") if FLAGS.trace_pauses else None
            if pause_log and os.path.exists(pause_log):
                os.remove(pause_log)
            run["keras"] = run_keras(model, data, perms, epochs, prune_epochs, steps, verbose, trained, pause_log)
            if pause_log:
                run["keras"]["pause_log"] = os.path.relpath(pause_log, REPO)
                with open(pause_log) as f:
                    run["keras"]["pause_traces"] = f.read()
        runs.append(run)

    summary = {}
    for side in ("keras", "torch"):
        got = [r[side] for r in runs if side in r]
        if got:
            summary[side] = {k: float(np.mean([g[k] for g in got])) for k in
                             ("top1_before", "top1_after", "flops_fraction", "params_fraction", "pruning_phase_seconds",
                              "prune_and_finetune_seconds", "wall_seconds") if all(g.get(k) is not None for g in got)}
    if all("keras" in r and "torch" in r for r in runs):
        margins = [r["keras"]["top1_after"] - r["torch"]["top1_after"] for r in runs]
        summary["top1_after_margin_keras_minus_torch"] = {"per_seed": margins, "mean": float(np.mean(margins))}
        ratios = [r["keras"]["prune_and_finetune_seconds"] / r["torch"]["prune_and_finetune_seconds"] for r in runs]
        summary["prune_and_finetune_seconds_keras_over_torch"] = {"per_seed": ratios, "mean": float(np.mean(ratios))}
    import tensorflow as tf

    result = {
        "command": " ".join(["python"] + [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        **_harness.machine(),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "keras_taylor": kt.__version__,
                     **(torch_versions() if os.path.exists(TORCH_PY) else {})},
        "config": {"quick": quick, "blocks": blocks, "epochs": epochs, "prune_epochs": prune_epochs,
                   "prune_every": FLAGS.prune_every, "channels_per_step": FLAGS.channels_per_step, "target": FLAGS.target,
                   "torch_pruning_ratio": FLAGS.torch_pruning_ratio, "batch_size": FLAGS.batch_size,
                   "train_subset": subset, "torch_threads": FLAGS.torch_threads, "shared_dense": FLAGS.shared_dense,
                   "keras_path": FLAGS.keras_path, "switch": FLAGS.switch,
                   "criterion": FLAGS.criterion, "normalization": FLAGS.normalization,
                   "channel_multiple": FLAGS.channel_multiple, "torch_round_to": FLAGS.torch_round_to,
                   "tf_data_autotune": FLAGS.tf_data_autotune,
                   "trace_pauses": FLAGS.trace_pauses, "trace_pauses_every": FLAGS.trace_pauses_every},
        "runs": runs,
        "summary": summary,
        "wall_seconds": time.time() - started,
        "load_average_at_end": _harness.load(),
        "date_end_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    path = result_path()
    # One file, one entry per experiment; a run replaces only its own entry.
    old = _harness.read_json(path, {})
    experiments = {"independent_training": old} if "runs" in old else old
    key = result_key()
    experiments[key] = result
    _harness.write_json(experiments, path)
    print(json.dumps(summary, indent=1))
    print(f"Done in {result['wall_seconds'] / 60:.1f} min; results in {path}")
    if FLAGS.plot:
        print("Step-time plot:", plot_step_logs(result, FLAGS.plot))


if __name__ == "__main__":
    app.run(main)
