"""Criteria study on Fashion-MNIST: correlation with the oracle, and accuracy vs FLOPs.

    python benchmarks/criteria_study.py                    # both parts (≈30 min on 2 busy cores)
    python benchmarks/criteria_study.py --part=correlation
    python benchmarks/criteria_study.py --part=curves

1. A ResNet-14 is trained on 55,000 Fashion-MNIST training images (the other
   5,000 are held out), as the main job trains it; cached in `--output_dir`.
2. `correlation`: the oracle (`keras_taylor.oracle.oracle_deltas`: the loss
   change when each channel group alone is removed, inference mode, on 2,000
   held-out images) against every registered criterion, each accumulated by
   the scoring train step over the same `--score_batches` training
   minibatches (learning rate 0, so the weights do not move; BN statistics
   restored after each criterion). Scores enter the correlation as the
   ranking sees them (`Criterion.rank`: per-layer L2 normalisation for the
   ICLR'17 criteria). Spearman and Kendall across all groups and per layer;
   JSON + PNG.
3. `curves`: for Taylor-FO-BN, ICLR'17 Taylor, weight L2, BN scale and random,
   the same pruning schedule (`--channels_per_step` groups every
   `--prune_every` minibatches while training at a constant learning rate)
   from the same trained model down to the lowest FLOPs level; the model is
   snapshotted at the first pruning step at or below each level, and every
   snapshot gets the same fine-tuning budget (`--finetune_batches`, cosine
   decay). Top-1 on the 10,000 test images, before and after fine-tuning.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_taylor as kt  # noqa: E402
from keras_taylor import criteria, datasets, models, oracle  # noqa: E402
from keras_taylor.callbacks import ranking_context  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("part", "all", ["all", "correlation", "curves", "diagnostics"], "What to run.")
flags.DEFINE_list("diagnostic_batches", ["25", "50", "100", "200", "400"], "Diagnostics: minibatch counts.")
flags.DEFINE_string("output_dir", "runs/criteria_study", "Cached model, oracle and raw results.")
flags.DEFINE_string("results_dir", os.path.join(os.path.dirname(__file__), "results"), "JSON results.")
flags.DEFINE_string("plot_dir", "docs/img", "PNG plots.")
flags.DEFINE_integer("epochs", 3, "Training epochs of the base model.")
flags.DEFINE_integer("blocks", 2, "Residual blocks per stage (2: ResNet-14).")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("oracle_images", 2000, "Held-out images for the oracle.")
flags.DEFINE_integer("score_batches", 50, "Training minibatches every criterion is accumulated over.")
flags.DEFINE_list("curve_criteria", ["taylor_fo_bn", "iclr17_taylor", "weight_l2", "bn_scale", "random"], "Criteria of the curves.")
flags.DEFINE_list("levels", ["0.7", "0.5", "0.3"], "FLOPs fractions of the curves.")
flags.DEFINE_integer("prune_every", 30, "Curves: minibatches between pruning steps (K).")
flags.DEFINE_integer("channels_per_step", 16, "Curves: groups removed per pruning step (N).")
flags.DEFINE_float("prune_lr", 0.01, "Curves: learning rate while pruning.")
flags.DEFINE_integer("finetune_batches", 300, "Curves: fine-tuning minibatches per snapshot.")
flags.DEFINE_integer("seed", 0, "Random seed.")

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
HELD_OUT = 5000


def compile_model(model, lr):
    return _harness.compile_model(model, lr, nesterov=True)


def load_data():
    (x_train, y_train), (x_test, y_test) = datasets.load_fashion_mnist()
    x_train, x_test = datasets.as_float_images(x_train), datasets.as_float_images(x_test)
    order = np.random.default_rng(FLAGS.seed).permutation(len(x_train))
    train, held = order[:-HELD_OUT], order[-HELD_OUT:]
    return (x_train[train], y_train[train].astype("int32")), (x_train[held], y_train[held].astype("int32")), (
        x_test, y_test.astype("int32"))


def base_model(train):
    """The trained dense ResNet (cached)."""
    path = os.path.join(FLAGS.output_dir, f"base_resnet{2 + 6 * FLAGS.blocks}_e{FLAGS.epochs}_s{FLAGS.seed}.keras")
    if os.path.exists(path):
        print(f"== Using the cached base model {path}")
        return keras.saving.load_model(path)
    keras.utils.set_random_seed(FLAGS.seed)
    model = models.resnet(input_shape=(28, 28, 1), widths=(16, 32, 64), blocks_per_stage=FLAGS.blocks)
    steps = int(np.ceil(len(train[0]) / FLAGS.batch_size))
    compile_model(model, keras.optimizers.schedules.CosineDecay(0.1, decay_steps=FLAGS.epochs * steps, alpha=0.01))
    print(f"== Training {model.name} for {FLAGS.epochs} epochs on {len(train[0])} images")
    model.fit(*train, batch_size=FLAGS.batch_size, epochs=FLAGS.epochs, verbose=2)
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    model.save(path)
    return model


def top1(model, test) -> float:
    return float(model.evaluate(*test, batch_size=512, verbose=0, return_dict=True)["acc"])


# ---- part 1: correlation with the oracle ------------------------------------------------
def criterion_scores(gated, graph, names, x, y) -> dict:
    """Mean per-minibatch score of each criterion over the same minibatches,
    accumulated by the scoring train step (lr 0), as the ranking sees it."""
    compile_model(gated, 0.0)
    saved = gated.get_weights()
    out, raw = {}, {}
    for name in names:
        scorer = kt.TaylorScorer(gated, graph, name)
        scorer.install()
        scorer.reset()
        try:
            gated.fit(x, y, batch_size=FLAGS.batch_size, epochs=1, shuffle=False, verbose=0)
        finally:
            scorer.uninstall()
        mean, steps = scorer.read()
        assert steps == len(x) // FLAGS.batch_size, steps
        raw[name] = mean
        out[name] = np.asarray(scorer.criterion.rank(mean, ranking_context(graph, scorer)), dtype="float64")
        gated.set_weights(saved)  # BN moving statistics moved in training mode
        print(f"   {name}: {steps:.0f} minibatches")
    return out, raw


def correlation(base, train, held, test):
    gated = kt.add_gates(base)
    compile_model(gated, 0.0)
    graph = kt.analyze(gated)
    labels = oracle.group_labels(graph)
    print(f"== Oracle: {graph.num_groups} channel groups x {FLAGS.oracle_images} held-out images")
    t0 = time.time()
    deltas = oracle.oracle_deltas(
        gated, (held[0][: FLAGS.oracle_images], held[1][: FLAGS.oracle_images]),
        graph=graph, cache=os.path.join(FLAGS.output_dir, "oracle.npz"),
    )
    oracle_s = time.time() - t0
    rng = np.random.default_rng(FLAGS.seed + 1)
    pick = rng.choice(len(train[0]), FLAGS.score_batches * FLAGS.batch_size, replace=False)
    names = criteria.names()
    print(f"== Scoring {len(names)} criteria on the same {FLAGS.score_batches} training minibatches")
    t0 = time.time()
    scores, raw = criterion_scores(gated, graph, names, train[0][pick], train[1][pick])
    scoring_s = time.time() - t0
    corr = oracle.rank_correlations(scores, deltas, labels)
    os.makedirs(FLAGS.plot_dir, exist_ok=True)
    plot = oracle.plot_correlations(corr, scores, deltas, os.path.join(FLAGS.plot_dir, "criteria_correlation.png"))
    result = {
        "command": "python benchmarks/criteria_study.py --part=correlation",
        "date": time.strftime("%Y-%m-%d"),
        **_harness.machine(),
        "model": f"ResNet-{2 + 6 * FLAGS.blocks} (16/32/64), Fashion-MNIST, {FLAGS.epochs} epochs on {len(train[0])} images",
        "top1_test": top1(compile_model(base, 0.0), test),
        "groups": graph.num_groups,
        "oracle": {"images": FLAGS.oracle_images, "seconds": oracle_s, "mode": "inference (training=False)",
                   "abs_delta_median": float(np.nanmedian(np.abs(deltas))), "abs_delta_max": float(np.nanmax(np.abs(deltas)))},
        "score_minibatches": FLAGS.score_batches,
        "scoring_seconds": scoring_s,
        "correlations": corr,
        "plot": plot,
    }
    os.makedirs(FLAGS.results_dir, exist_ok=True)
    with open(os.path.join(FLAGS.results_dir, "criteria_correlation.json"), "w") as f:
        json.dump(result, f, indent=1)
    np.savez(os.path.join(FLAGS.output_dir, "scores.npz"), oracle=deltas, labels=np.array(labels),
             **{f"rank_{k}": v for k, v in scores.items()}, **{f"raw_{k}": v for k, v in raw.items()})
    print(f"{'criterion':24s} spearman kendall  per-layer median spearman")
    for name, c in sorted(corr.items(), key=lambda kv: -kv[1]["spearman"]):
        print(f"{name:24s} {c['spearman']:8.3f} {c['kendall']:7.3f}  {c.get('per_layer_median_spearman', float('nan')):8.3f}")
    return result


# ---- diagnostics: why a criterion's correlation is what it is -----------------------------
def diagnostics(base, train, held):
    """(1) Spearman of Taylor-FO-BN / FO-FG with the oracle as minibatches
    accumulate (the per-minibatch FO score of a trained model is a noisy
    gradient-variance estimate); (2) the oracle's split-half reliability: the
    Spearman between its two 1,000-image halves bounds what any criterion can
    reach against it."""
    from scipy import stats

    gated = compile_model(kt.add_gates(base), 0.0)
    graph = kt.analyze(gated)
    n = FLAGS.oracle_images
    full = oracle.oracle_deltas(gated, (held[0][:n], held[1][:n]), graph=graph,
                                cache=os.path.join(FLAGS.output_dir, "oracle.npz"))
    half = oracle.oracle_deltas(gated, (held[0][: n // 2], held[1][: n // 2]), graph=graph,
                                cache=os.path.join(FLAGS.output_dir, "oracle_half.npz"))
    other = 2 * full - half  # equal halves: the full mean is their average
    reliability = float(stats.spearmanr(np.abs(half), np.abs(other))[0])
    counts = sorted(int(c) for c in FLAGS.diagnostic_batches)
    rng = np.random.default_rng(FLAGS.seed + 2)
    pick = rng.choice(len(train[0]), counts[-1] * FLAGS.batch_size, replace=False)
    x, y = train[0][pick], train[1][pick]
    curves_out = {}
    saved = gated.get_weights()
    for name in ("taylor_fo_bn", "taylor_fo_fg"):
        scorer = kt.TaylorScorer(gated, graph, name)
        scorer.install()
        scorer.reset()
        done, rows = 0, []
        try:
            for c in counts:
                lo, hi = done * FLAGS.batch_size, c * FLAGS.batch_size
                gated.fit(x[lo:hi], y[lo:hi], batch_size=FLAGS.batch_size, epochs=1, shuffle=False, verbose=0)
                done = c
                mean, steps = scorer.read()
                rows.append({"minibatches": int(steps), "spearman": float(stats.spearmanr(mean, np.abs(full))[0]),
                             "kendall": float(stats.kendalltau(mean, np.abs(full))[0])})
                print(f"   {name}: {int(steps)} minibatches, Spearman {rows[-1]['spearman']:.3f}")
        finally:
            scorer.uninstall()
            gated.set_weights(saved)
        curves_out[name] = rows
    result = {
        "command": "python benchmarks/criteria_study.py --part=diagnostics",
        "date": time.strftime("%Y-%m-%d"),
        "oracle_split_half_spearman": reliability,
        "oracle_images_per_half": n // 2,
        "spearman_vs_minibatches": curves_out,
    }
    with open(os.path.join(FLAGS.results_dir, "criteria_diagnostics.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"   oracle split-half Spearman ({n // 2} vs {n // 2} images): {reliability:.3f}")
    return result


# ---- part 2: accuracy vs FLOPs --------------------------------------------------------------
class Snapshots(keras.callbacks.Callback):
    """Keeps the weights at the first pruning step at or below each FLOPs level,
    and stops `fit` once the pruner is done."""

    def __init__(self, pruner, levels):
        super().__init__()
        self.pruner, self.levels, self.taken = pruner, sorted(levels, reverse=True), {}
        self._seen = 0

    def on_train_batch_end(self, batch, logs=None):
        history = self.pruner.history
        if len(history) == self._seen:
            return
        self._seen = len(history)
        frac = history[-1]["flops_fraction"]
        for level in self.levels:
            if level not in self.taken and frac <= level:
                self.taken[level] = {"weights": self.model.get_weights(), "flops_fraction": frac,
                                     "params_fraction": history[-1]["params_fraction"], "step": history[-1]["step"]}
        if self.pruner.done:
            self.model.stop_training = True


def curves(base, train, test):
    levels = [float(v) for v in FLAGS.levels]
    rows = []
    for name in FLAGS.curve_criteria:
        keras.utils.set_random_seed(FLAGS.seed)
        gated = compile_model(kt.add_gates(base), FLAGS.prune_lr)
        pruner = kt.TaylorPruning(target=min(levels), prune_every=FLAGS.prune_every,
                                  channels_per_step=FLAGS.channels_per_step, criterion=name)
        snaps = Snapshots(pruner, levels)
        t0 = time.time()
        steps = int(np.ceil(len(train[0]) / FLAGS.batch_size))
        gated.fit(*train, batch_size=FLAGS.batch_size, epochs=100, steps_per_epoch=steps, verbose=0,
                  callbacks=[pruner, snaps])
        prune_s = time.time() - t0
        print(f"== {name}: pruned to {pruner.history[-1]['flops_fraction']:.3f} FLOPs in {pruner._step} minibatches, {prune_s:.0f} s")
        for level in levels:
            snap = snaps.taken[level]
            gated.set_weights(snap["weights"])
            before = top1(compile_model(gated, 0.0), test)
            keras.utils.set_random_seed(FLAGS.seed)
            compile_model(gated, keras.optimizers.schedules.CosineDecay(FLAGS.prune_lr, FLAGS.finetune_batches, alpha=0.1))
            gated.fit(*train, batch_size=FLAGS.batch_size, epochs=1, steps_per_epoch=FLAGS.finetune_batches, verbose=0)
            after = top1(gated, test)
            rows.append({"criterion": name, "level": level, "flops_fraction": snap["flops_fraction"],
                         "params_fraction": snap["params_fraction"], "step": snap["step"],
                         "top1_pruned": before, "top1_finetuned": after})
            print(f"   FLOPs {snap['flops_fraction']:.3f}: top-1 {before:.4f} -> fine-tuned {after:.4f}")
    return rows


def plot_curves(rows, dense_top1, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, title in ((axes[0], "top1_pruned", "right after pruning"), (axes[1], "top1_finetuned", "after equal fine-tuning")):
        for name in dict.fromkeys(r["criterion"] for r in rows):
            pts = sorted((r["flops_fraction"], r[key]) for r in rows if r["criterion"] == name)
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=name)
        ax.axhline(100 * dense_top1, color="grey", linestyle=":", label="unpruned")
        ax.set_xlabel("FLOPs fraction kept")
        ax.set_title(title)
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 on Fashion-MNIST test (%)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv):
    del argv
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    train, held, test = load_data()
    base = base_model(train)
    started = time.time()
    if FLAGS.part in ("all", "correlation"):
        correlation(base, train, held, test)
    if FLAGS.part == "diagnostics":
        diagnostics(base, train, held)
    if FLAGS.part in ("all", "curves"):
        rows = curves(base, train, test)
        dense = top1(compile_model(base, 0.0), test)
        os.makedirs(FLAGS.plot_dir, exist_ok=True)
        plot = plot_curves(rows, dense, os.path.join(FLAGS.plot_dir, "criteria_curves.png"))
        result = {
            "command": "python benchmarks/criteria_study.py --part=curves",
            "date": time.strftime("%Y-%m-%d"),
            **_harness.machine(),
            "schedule": {"prune_every": FLAGS.prune_every, "channels_per_step": FLAGS.channels_per_step,
                         "prune_lr": FLAGS.prune_lr, "finetune_batches": FLAGS.finetune_batches,
                         "batch_size": FLAGS.batch_size},
            "top1_dense": dense,
            "rows": rows,
            "plot": plot,
        }
        with open(os.path.join(FLAGS.results_dir, "criteria_curves.json"), "w") as f:
            json.dump(result, f, indent=1)
    print(f"== done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    app.run(main)
