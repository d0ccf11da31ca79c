"""Quality at equal measured latency: latency-knapsack pruning vs FLOPs-targeted
pruning, both fine-tuned with the same budget to the same *measured* latency.

    nice python benchmarks/latency_quality.py --models resnet,mobilenetv2 --seeds 0,1   # docs/latency.md
    python benchmarks/latency_quality.py --smoke --output /tmp/lq.json --work_dir /tmp/lq  # seconds

Per model and seed (a *cell*), in resumable stages (each stage's result is
written to the JSON as it finishes; a rerun skips finished stages, so the
study runs in several lock holds):

1. `dense`: train the dense model (saved under `--work_dir`). Models: the main
   job's ResNet (`keras_taylor.models.resnet`, 28×28×1, widths 16/32/64,
   `--resnet_blocks` blocks per stage), and keras.applications MobileNetV2
   (`weights=None`, `--mobilenet_alpha`, Fashion-MNIST resized to
   `--mobilenet_size`² and repeated to three channels).
2. `table`: `kt.LatencyTable.measure(dense, runtime=--runtime, batch_size=1,
   threads=--threads)` (cached by the library under `--cache_dir`; the
   architecture is the same for every seed, so one build serves all seeds).
3. `L`: `TaylorPruning(metric="latency", target=--target_latency,
   latency=table)` inside `kt.fit_prune` for `--prune_epochs` epochs (pruning,
   then fine-tuning the pruned model).
4. `F`: a FLOPs target `f` for which a FLOPs-targeted pruning lands at L's
   measured latency: Taylor-FO-BN scores of the dense model
   (`keras_taylor.testing.reference_scores` on `--score_images` training
   images), the greedy FLOPs order of `TaylorPruning(metric="flops")`
   (`selection.greedy_removal`), and for a candidate `f` the shortest prefix
   of that order at or under `f` of the dense FLOPs; each candidate is built
   and timed interleaved with the dense model and L's model (so L's ratio is
   re-measured in the same rounds), and `f` moves by a secant step on the
   measured ratios, kept inside the bracket seen (at most `--f_iterations`
   measured candidates, stop within `--f_tolerance`). Then
   `TaylorPruning(metric="flops", target=f)` in `kt.fit_prune` with L's
   budget, learning-rate schedule, pruning rate and data order.
5. `compare`: the dense, L and F models timed together (`--rounds`
   interleaved rounds; per-round ratios to the dense model, median
   [min–max]), top-1 on the test set, FLOPs, params and predicted latency
   ratios; the margin L − F.

Every top-1 is taken after `recalibrate_bn` (BN layers of momentum ≥ 0.99,
keras.applications' 0.999, get their moving statistics recomputed over
`--bn_batches` training minibatches: after a short training they are still
near their initial values). Results and their caveats: docs/latency.md
("Quality at equal measured latency"), BENCHMARKS.md row 8c.

The summary gives per model the per-seed margins, their mean and spread.
"""

from __future__ import annotations

import datetime
import math
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

import _harness  # noqa: E402
import keras_taylor as kt  # noqa: E402
from keras_taylor import datasets, selection, testing  # noqa: E402
from keras_taylor import latency_table as lt  # noqa: E402
from keras_taylor.flops import CostModel  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["resnet", "mobilenetv2"], "Models: resnet (the main job's), mobilenetv2.")
flags.DEFINE_list("seeds", ["0", "1"], "Seeds (weights, data subset and order, scores).")
flags.DEFINE_integer("train_subset", 10_000, "Training images (a seeded subset of the 60k).")
flags.DEFINE_integer("test_images", None, "Test images (the first N of the 10k; default all).")
flags.DEFINE_integer("batch_size", 128, "Training batch size.")
flags.DEFINE_integer("dense_epochs", 3, "Epochs of dense training.")
flags.DEFINE_integer("prune_epochs", 3, "Epochs of pruning + fine-tuning (the budget of both variants).")
flags.DEFINE_float("dense_lr", 0.05, "Peak learning rate of the dense training (cosine decay).")
flags.DEFINE_float("prune_lr", 0.01, "Learning rate of the pruning phase (cosine decay).")
flags.DEFINE_integer("prune_every", 3, "Minibatches between pruning steps.")
flags.DEFINE_float("prune_fraction", 0.5, "Fraction of the first pruning epoch in which the latency schedule ends "
                   "(sets channels_per_step; the FLOPs variant uses the same channels_per_step).")
flags.DEFINE_float("target_latency", 0.5, "Latency target of variant L (fraction of the table's dense prediction).")
flags.DEFINE_integer("resnet_blocks", 2, "Residual blocks per stage of the main job's ResNet (2: ResNet-14, its default).")
flags.DEFINE_float("mobilenet_alpha", 0.35, "MobileNetV2 width multiplier.")
flags.DEFINE_integer("mobilenet_size", 96, "MobileNetV2 input side (Fashion-MNIST resized).")
flags.DEFINE_enum("runtime", "tflite", list(lt.RUNTIMES), "Runtime of the table and of every latency measurement.")
flags.DEFINE_integer("threads", 1, "Runtime threads.")
flags.DEFINE_list("fractions", ["0.5"], "Table widths sampled besides 8, 16 and full.")
flags.DEFINE_integer("calibrate", 6, "Whole-model calibration prunings of the table.")
flags.DEFINE_integer("table_rounds", 7, "Interleaved rounds per table segment.")
flags.DEFINE_integer("rounds", 21, "Interleaved rounds of whole-model timings (F search and final comparison).")
flags.DEFINE_float("block_s", 0.025, "Seconds per timing block of the dense model (calls per round).")
flags.DEFINE_integer("score_images", 1024, "Training images for the dense Taylor scores of the F search.")
flags.DEFINE_integer("f_iterations", 5, "Most measured candidates of the F search.")
flags.DEFINE_float("f_tolerance", 0.02, "F search stops when |candidate ratio − L ratio| ≤ this.")
flags.DEFINE_string("work_dir", "runs/latency_quality", "Saved dense / pruned models.")
flags.DEFINE_string("cache_dir", "/tmp/keras_taylor_latency_quality", "Latency table cache.")
flags.DEFINE_string("output", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "latency_quality.json"),
                    "Results JSON (resumed from when it exists).")
flags.DEFINE_float("budget_minutes", None, "Stop starting new stages after this many minutes (resume later).")
flags.DEFINE_integer("bn_batches", 20, "Training minibatches over which BN statistics with momentum >= 0.99 are "
                     "recomputed before evaluation (recalibrate_bn).")
flags.DEFINE_bool("smoke", False, "Toy sizes (tests): ResNet only on the tf runtime, 256 images, 1 + 2 epochs.")

MODELS = ("resnet", "mobilenetv2")


def apply_smoke() -> None:
    for name, value in dict(models=["resnet"], seeds=["0"], train_subset=256, test_images=256, batch_size=64,
                            dense_epochs=1, prune_epochs=2, prune_every=1, runtime="tf", calibrate=0,
                            table_rounds=2, rounds=3, block_s=0.002, score_images=64, f_iterations=2).items():
        if FLAGS[name].using_default_value:
            FLAGS[name].value = value


# ---- data and models -------------------------------------------------------------------
def input_shape(name):
    return (28, 28, 1) if name == "resnet" else (FLAGS.mobilenet_size, FLAGS.mobilenet_size, 3)


def data(name, seed):
    """`(train_ds, test_ds)` for `name`: `datasets.fashion_mnist_datasets` (a
    fresh pipeline per call: each variant sees the same order for one seed),
    resized to three channels for MobileNetV2."""
    import tensorflow as tf

    train, test = datasets.fashion_mnist_datasets(batch_size=FLAGS.batch_size, train_subset=FLAGS.train_subset, seed=seed)
    if FLAGS.test_images:
        test = test.unbatch().take(FLAGS.test_images).batch(FLAGS.batch_size)
    if name == "mobilenetv2":
        size = FLAGS.mobilenet_size

        def rgb(x, y):
            return tf.image.resize(tf.repeat(x, 3, axis=-1), (size, size)), y

        train = train.map(rgb, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
        test = test.map(rgb, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    return train, test


def build(name):
    if name == "resnet":
        return kt.models.resnet(input_shape=(28, 28, 1), widths=(16, 32, 64), blocks_per_stage=FLAGS.resnet_blocks)
    return keras.applications.MobileNetV2(input_shape=input_shape(name), alpha=FLAGS.mobilenet_alpha, weights=None,
                                          classes=10, classifier_activation=None)


def compile_model(model, schedule):
    return _harness.compile_model(model, schedule, nesterov=True)


def recalibrate_bn(model, train, batches: int) -> int:
    """Recomputes the moving statistics of BatchNormalization layers whose
    momentum is ≥ 0.99 (keras.applications uses 0.999: after a few hundred
    steps their moving statistics are still mostly the initial ones, and the
    model is at chance in inference mode) as the plain average over the first
    `batches` training minibatches (forward passes in training mode, no weight
    update). Returns the number of layers recalibrated (0: nothing done)."""
    layers = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization) and l.momentum >= 0.99]
    if not layers or batches < 1:
        return 0
    saved = [l.momentum for l in layers]
    # The training-mode passes would move the other BN layers' statistics too: kept as they were.
    others = [(v, v.numpy()) for l in model.layers if isinstance(l, keras.layers.BatchNormalization) and l not in layers
              for v in (l.moving_mean, l.moving_variance)]
    try:
        for i, (x, _) in enumerate(train.take(batches)):
            for l in layers:
                l.momentum = i / (i + 1)  # running mean of the batch statistics
            model(x, training=True)
    finally:
        for l, m in zip(layers, saved):
            l.momentum = m
        for v, value in others:
            v.assign(value)
    return len(layers)


def top1(model, test, train) -> float:
    recalibrate_bn(model, train, FLAGS.bn_batches)
    compile_model(model, 0.0)
    return float(model.evaluate(test, verbose=0, return_dict=True)["acc"])


def stamp() -> dict:
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load_average": _harness.load()}


# ---- timing ------------------------------------------------------------------------------
class Timer:
    """Whole models on the runtime (each converted once), timed interleaved
    with `_harness.measure` (the repository's loop): per-round ratios to the
    first model given."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.runners = {}

    def __call__(self, models: dict) -> dict:
        for key, model in models.items():
            if key not in self.runners:
                self.runners[key] = lt._runner(model, FLAGS.runtime, 1, self.rng, FLAGS.threads)
        runs = {k: self.runners[k] for k in models}
        ref = next(iter(models))
        calls = _harness.calls_for(runs[ref], FLAGS.block_s)
        out = _harness.measure(runs, rounds=FLAGS.rounds, calls=calls, reference=ref, seed=self.rng)
        return out


def cost_summary(dense, model, table) -> dict:
    a, b = kt.profile(dense), kt.profile(model)
    return {"flops_ratio": b.flops / a.flops, "params_ratio": b.params / a.params,
            "predicted_latency_ratio": table.predict(model) / table.predict(dense)}


# ---- stages ------------------------------------------------------------------------------
def path(*parts):
    return os.path.join(FLAGS.work_dir, *parts)


def dense_stage(name, seed, cell):
    started = time.time()
    keras.utils.set_random_seed(seed)
    train, test = data(name, seed)
    model = build(name)
    steps = int(train.cardinality())
    compile_model(model, keras.optimizers.schedules.CosineDecay(FLAGS.dense_lr, FLAGS.dense_epochs * steps, alpha=0.01))
    model.fit(train, epochs=FLAGS.dense_epochs, verbose=2, shuffle=False)
    model.save(path(f"{name}_s{seed}_dense.keras"))
    cell["dense"] = {"top1": top1(model, test, data(name, seed)[0]), "wall_seconds": time.time() - started, "steps_per_epoch": steps,
                     "flops": kt.profile(model).flops, "params": kt.profile(model).params, **stamp()}


def table_for(dense):
    return kt.LatencyTable.measure(dense, runtime=FLAGS.runtime, batch_size=1, threads=FLAGS.threads,
                                   fractions=[float(f) for f in FLAGS.fractions], rounds=FLAGS.table_rounds,
                                   calibrate=FLAGS.calibrate, cache_dir=FLAGS.cache_dir, verbose=0)


def channels_per_step(dense, steps_per_epoch) -> int:
    """Groups per pruning step such that the latency schedule (`T = ceil(groups ·
    (1 − target) / channels_per_step)` steps) ends within `--prune_fraction`
    of the first epoch."""
    groups = kt.analyze(dense).num_groups
    pruning_steps = max(1, int(FLAGS.prune_fraction * steps_per_epoch / FLAGS.prune_every))
    return max(1, math.ceil(groups * (1 - FLAGS.target_latency) / pruning_steps))


def prune_variant(name, seed, dense, table, metric, target, cps):
    """Gate, prune with `metric` to `target` in `kt.fit_prune`, fine-tune: the
    same budget, schedule and data order for both variants of a seed."""
    started = time.time()
    keras.utils.set_random_seed(seed)
    train, test = data(name, seed)
    steps = int(train.cardinality())
    gated = kt.add_gates(dense)
    compile_model(gated, keras.optimizers.schedules.CosineDecay(FLAGS.prune_lr, FLAGS.prune_epochs * steps, alpha=0.05))
    pruner = kt.TaylorPruning(target=target, metric=metric, latency=table if metric == "latency" else None,
                              prune_every=FLAGS.prune_every, channels_per_step=cps)
    pruned, _ = kt.fit_prune(gated, train, pruning=pruner, epochs=FLAGS.prune_epochs, verbose=2, shuffle=False)
    return pruned, {"top1": top1(pruned, test, data(name, seed)[0]), "metric": metric, "target": float(target), "reached": bool(pruner.done),
                    "pruning_steps": len(pruner.history), "channels_per_step": cps,
                    "wall_seconds": time.time() - started, **cost_summary(dense, pruned, table), **stamp()}


def flops_search(name, seed, dense, l_model, table, timer):
    """The FLOPs target whose one-shot greedy plan (dense Taylor scores) has L's
    measured latency, by secant steps on measured ratios (see the module docstring)."""
    keras.utils.set_random_seed(seed)
    (x, y), _ = datasets.load_fashion_mnist()
    idx = np.random.default_rng(seed).permutation(len(x))[: FLAGS.score_images]
    x, y = datasets.as_float_images(x[idx]), y[idx].astype("int32")
    if name == "mobilenetv2":
        import tensorflow as tf

        x = tf.image.resize(np.repeat(x, 3, axis=-1), (FLAGS.mobilenet_size,) * 2).numpy()
    gated = kt.add_gates(dense)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    graph = kt.analyze(dense)
    scores = testing.reference_scores(gated, x, y, 64, loss)
    order, _ = selection.greedy_removal(graph, scores)
    cost = CostModel(graph)
    lo, hi = 0.0, 1.0  # FLOPs targets known to land under / over L's ratio
    f = cost_summary(dense, l_model, table)["predicted_latency_ratio"]  # first guess
    history, best = [], None
    for it in range(FLAGS.f_iterations):
        n = selection.shortest_prefix_within(graph, cost, order, f)
        candidate = kt.apply_plan(dense, kt.PruningPlan.from_groups(graph, order[:n]))
        t = timer({"dense": dense, "L": l_model, f"f{it}": candidate})
        want, got = t["L"]["ratio_median"], t[f"f{it}"]["ratio_median"]
        history.append({"flops_target": f, "groups_removed": n, "ratio": got, "L_ratio": want,
                        "ratio_range": [t[f"f{it}"]["ratio_min"], t[f"f{it}"]["ratio_max"]],
                        "L_ratio_range": [t["L"]["ratio_min"], t["L"]["ratio_max"]], **stamp()})
        if best is None or abs(got - want) < abs(best[1] - best[2]):
            best = (f, got, want)
        if abs(got - want) <= FLAGS.f_tolerance:
            break
        lo, hi = (lo, min(hi, f)) if got > want else (max(lo, f), hi)
        # Secant on the measured (f, ratio) points, kept inside the bracket; else bisect it.
        if len(history) >= 2 and history[-1]["ratio"] != history[-2]["ratio"]:
            a, b = history[-2], history[-1]
            f = b["flops_target"] + (want - b["ratio"]) * (b["flops_target"] - a["flops_target"]) / (b["ratio"] - a["ratio"])
        else:
            f = f * want / got
        if not lo < f < hi:
            f = 0.5 * (lo + hi)
    return best[0], {"history": history, "score_images": FLAGS.score_images, "flops_target": best[0],
                     "one_shot_ratio": best[1], "L_ratio_then": best[2]}


def reevaluate(name, seed, cell, tag) -> None:
    """Top-1 of a finished cell's saved dense, L and F models again, with
    `recalibrate_bn` (for cells measured before it existed; a model without
    BN of momentum ≥ 0.99 keeps its figures)."""
    comp = cell["compare"]
    models = {v: keras.saving.load_model(path(f"{tag}_{s}.keras")) for v, s in (("dense", "dense"), ("L", "L"), ("F", "F"))}
    if any(isinstance(l, keras.layers.BatchNormalization) and l.momentum >= 0.99 for l in models["dense"].layers):
        print(f"== {tag}: top-1 again with BN statistics recomputed over {FLAGS.bn_batches} minibatches", flush=True)
        train, test = data(name, seed)
        for v, model in models.items():
            before = cell[v]["top1"]
            cell[v]["top1"] = top1(model, test, train)
            cell[v]["top1_stale_bn"] = before
            if v != "dense":
                comp[v]["top1"] = cell[v]["top1"]
        comp["margin_top1"] = cell["L"]["top1"] - cell["F"]["top1"]
        comp["reevaluated"] = stamp()
    comp["bn_batches"] = FLAGS.bn_batches


# ---- driver -------------------------------------------------------------------------------
def load_results(path) -> dict:
    return _harness.read_json(path, lambda: {"cells": {}})


def summarize(results) -> dict:
    out = {}
    for name in MODELS:
        rows = {s: c["compare"] for s, c in results["cells"].get(name, {}).items() if "compare" in c}
        if not rows:
            continue
        margins = [r["margin_top1"] for r in rows.values()]
        gaps = [r["latency_ratio_gap"] for r in rows.values()]
        out[name] = {"seeds": sorted(int(s) for s in rows), "margins_top1": margins,
                     "mean_margin_top1": float(np.mean(margins)), "min_margin_top1": float(np.min(margins)),
                     "max_margin_top1": float(np.max(margins)),
                     "L_top1": [r["L"]["top1"] for r in rows.values()], "F_top1": [r["F"]["top1"] for r in rows.values()],
                     "latency_ratio_gaps": gaps, "met": bool(min(margins) >= 0.0)}
    return out


def main(argv):
    del argv
    if FLAGS.smoke:
        apply_smoke()
    for name in FLAGS.models:
        if name not in MODELS:
            raise ValueError(f"Expected --models among {MODELS}. Received: {name!r}")
    seeds = [int(s) for s in FLAGS.seeds]
    os.makedirs(FLAGS.work_dir, exist_ok=True)
    results = load_results(FLAGS.output)
    results.setdefault("cells", {})
    results["config"] = {k: FLAGS[k].value for k in (
        "train_subset", "test_images", "batch_size", "dense_epochs", "prune_epochs", "dense_lr", "prune_lr",
        "prune_every", "prune_fraction", "target_latency", "resnet_blocks", "mobilenet_alpha", "mobilenet_size",
        "runtime", "threads", "fractions", "calibrate", "table_rounds", "rounds", "block_s", "score_images",
        "f_iterations", "f_tolerance")}
    results["machine"] = _harness.machine(runtime_threads=FLAGS.threads)
    results.setdefault("commands", []).append(" ".join(["python"] + sys.argv))
    started = time.time()

    def save():
        results["summary"] = summarize(results)
        _harness.write_json(results, FLAGS.output)

    def out_of_time() -> bool:
        return FLAGS.budget_minutes is not None and time.time() - started > 60 * FLAGS.budget_minutes

    for name in FLAGS.models:
        for seed in seeds:
            cell = results["cells"].setdefault(name, {}).setdefault(str(seed), {})
            tag = f"{name}_s{seed}"
            if "compare" in cell:
                if "bn_batches" not in cell["compare"]:
                    reevaluate(name, seed, cell, tag)
                    save()
                print(f"== {tag}: done, skipped", flush=True)
                continue
            if out_of_time():
                print(f"== budget spent before {tag}; rerun to resume", flush=True)
                save()
                return
            if "dense" not in cell or not os.path.exists(path(f"{tag}_dense.keras")):
                print(f"== {tag}: dense training", flush=True)
                dense_stage(name, seed, cell)
                save()
            dense = keras.saving.load_model(path(f"{tag}_dense.keras"))
            t0 = time.time()
            table = table_for(dense)
            if "table" not in cell:
                cell["table"] = {"wall_seconds": time.time() - t0, "dense_predicted_ms": table.predict(dense),
                                 "calibration_fit_median_abs_err": (table.calibration or {}).get("fit_median_abs_err"),
                                 **stamp()}
                save()
            steps = cell["dense"]["steps_per_epoch"]
            cps = channels_per_step(dense, steps)
            l_path, f_path = path(f"{tag}_L.keras"), path(f"{tag}_F.keras")
            if "L" not in cell or not os.path.exists(l_path):
                if out_of_time():
                    save()
                    return
                print(f"== {tag}: L (latency knapsack to {FLAGS.target_latency})", flush=True)
                model, cell["L"] = prune_variant(name, seed, dense, table, "latency", FLAGS.target_latency, cps)
                model.save(l_path)
                save()
            l_model = keras.saving.load_model(l_path)
            timer = Timer(seed)
            if "F" not in cell or not os.path.exists(f_path):
                if out_of_time():
                    save()
                    return
                print(f"== {tag}: F search (FLOPs target at L's measured latency)", flush=True)
                t0 = time.time()
                f, search = flops_search(name, seed, dense, l_model, table, timer)
                search["wall_seconds"] = time.time() - t0
                print(f"== {tag}: F (FLOPs to {f:.3f})", flush=True)
                model, cell["F"] = prune_variant(name, seed, dense, table, "flops", f, cps)
                cell["F"]["search"] = search
                model.save(f_path)
                save()
            f_model = keras.saving.load_model(f_path)
            print(f"== {tag}: final timing", flush=True)
            t = timer({"dense": dense, "L": l_model, "F": f_model})
            comp = {"dense_ms": t["dense"]["median_ms"], "calls_per_round": t["calls_per_round"], "rounds": t["rounds"]}
            for v in ("L", "F"):
                comp[v] = {"top1": cell[v]["top1"], "latency_ratio": t[v]["ratio_median"],
                           "latency_ratio_range": [t[v]["ratio_min"], t[v]["ratio_max"]], "median_ms": t[v]["median_ms"],
                           "flops_ratio": cell[v]["flops_ratio"], "params_ratio": cell[v]["params_ratio"],
                           "predicted_latency_ratio": cell[v]["predicted_latency_ratio"]}
            comp["bn_batches"] = FLAGS.bn_batches
            comp["margin_top1"] = cell["L"]["top1"] - cell["F"]["top1"]
            comp["latency_ratio_gap"] = t["L"]["ratio_median"] - t["F"]["ratio_median"]
            comp.update(stamp())
            cell["compare"] = comp
            save()
            print(f"== {tag}: top-1 L {comp['L']['top1']:.4f} F {comp['F']['top1']:.4f} (L − F {comp['margin_top1']:+.4f}); "
                  f"latency ratio L {comp['L']['latency_ratio']:.3f} F {comp['F']['latency_ratio']:.3f}; "
                  f"FLOPs L {comp['L']['flops_ratio']:.3f} F {comp['F']['flops_ratio']:.3f}", flush=True)
    save()
    for name, s in results["summary"].items():
        print(f"== {name}: margins L − F {['%+.4f' % m for m in s['margins_top1']]}, mean {s['mean_margin_top1']:+.4f}", flush=True)


if __name__ == "__main__":
    app.run(main)
