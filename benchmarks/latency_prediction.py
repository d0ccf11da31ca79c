"""Latency prediction: does a `keras_taylor.LatencyTable` predict the latency
of pruned models?

For each model (keras.applications ResNet50 / MobileNetV2, `weights=None`,
BN given trained-looking statistics by `keras_taylor.testing.
lively_statistics`, `--size`² inputs: smaller than 224 on a loaded 2-core
machine) and runtime (`tf`, `tflite`; batch 1):

1. `kt.LatencyTable.measure(model, runtime)` — build time recorded (a warm
   cache is cleared first with `--fresh`, the default, so the time is the
   cold build).
2. `--prunings` random prunings: FLOPs target drawn uniformly in
   [0.3, 0.9]; channel groups taken in a random order
   (`keras_taylor.selection.greedy_removal` on random scores, every layer
   keeps a channel), shortest prefix at or under the target; every second
   pruning aligned to multiples of 8 (`selection.align_to_target`).
   `kt.apply_plan` builds the smaller model.
3. All pruned models and the dense one are timed on the runtime in
   interleaved rounds (`keras_taylor.latency.time_callables`, minimum of
   per-round means — the statistic the table uses; the median is kept too) and
   compared with `table.predict(pruned)`.

Reports predicted ÷ measured per pruning, the median absolute error and the
worst, the table build time, and the load average (the machine is shared:
numbers are noisy).

    nice python benchmarks/latency_prediction.py --models ResNet50 --runtimes tflite --size 96

Writes benchmarks/results/latency_prediction.json (merged per model/runtime).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_taylor as kt  # noqa: E402
from keras_taylor import latency as kt_latency  # noqa: E402
from keras_taylor import latency_table as lt  # noqa: E402
from keras_taylor import selection  # noqa: E402
from keras_taylor.flops import CostModel  # noqa: E402
from keras_taylor.testing import lively_statistics  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["ResNet50", "MobileNetV2"], "keras.applications models.")
flags.DEFINE_list("runtimes", ["tf", "tflite"], "Runtimes.")
flags.DEFINE_integer("size", 96, "Input size (square).")
flags.DEFINE_integer("prunings", 20, "Random prunings per model and runtime.")
flags.DEFINE_integer("rounds", 7, "Interleaved timing rounds (table and check).")
flags.DEFINE_integer("seed", 0, "Seed.")
flags.DEFINE_integer("threads", None, "tflite/onnxruntime threads (table and check); default: the runtime's.")
flags.DEFINE_list("targets", ["0.7", "0.5", "0.3"], "One-shot knapsack latency targets (random scores, aligned to 8).")
flags.DEFINE_list("fractions", ["0.125", "0.25", "0.375", "0.5", "0.625", "0.75", "0.875"], "Width fractions sampled by the table.")
flags.DEFINE_bool("fresh", True, "Clear this run's table cache first (cold build time).")
flags.DEFINE_string("cache_dir", "/tmp/keras_taylor_latency_bench", "Table cache directory.")
flags.DEFINE_string("output", os.path.join(os.path.dirname(__file__), "results", "latency_prediction.json"), "Results JSON.")


def build(name, size, seed):
    keras.utils.set_random_seed(seed)
    model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3))
    lively_statistics(model, seed)
    return model


def prunings(model, n, seed):
    graph = kt.analyze(model)
    cost = CostModel(graph)
    full = cost.evaluate(graph.alive_ids(()))[0]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        target = float(rng.uniform(0.3, 0.9))
        scores = rng.uniform(size=graph.num_groups)
        order, _ = selection.greedy_removal(graph, scores)
        lo, hi = 0, len(order)
        while lo < hi:
            mid = (lo + hi) // 2
            if cost.evaluate(graph.alive_ids(order[:mid]))[0] <= target * full:
                hi = mid
            else:
                lo = mid + 1
        removed = set(order[:hi])
        aligned = i % 2 == 1
        if aligned:
            removed = selection.align_to_target(
                graph, removed, scores, 8, lambda r: cost.evaluate(graph.alive_ids(r))[0] / full, target
            )
        pruned = kt.apply_plan(model, kt.PruningPlan.from_groups(graph, removed))
        out.append({
            "target_flops": target, "aligned8": aligned,
            "flops_fraction": cost.evaluate(graph.alive_ids(removed))[0] / full, "model": pruned,
        })
    return out


def run_one(name, runtime):
    load_before = os.getloadavg()
    model = build(name, FLAGS.size, FLAGS.seed)
    cache = os.path.join(FLAGS.cache_dir, f"{name}_{runtime}")
    if FLAGS.fresh and os.path.isdir(cache):
        shutil.rmtree(cache)
    start = time.time()
    fr = [float(f) for f in FLAGS.fractions]
    table = kt.LatencyTable.measure(model, runtime=runtime, rounds=FLAGS.rounds, fractions=fr, threads=FLAGS.threads, cache_dir=cache, verbose=1)
    build_s = time.time() - start
    start = time.time()
    kt.LatencyTable.measure(model, runtime=runtime, rounds=FLAGS.rounds, fractions=fr, threads=FLAGS.threads, cache_dir=cache, verbose=0)
    cached_s = time.time() - start
    variants = prunings(model, FLAGS.prunings, FLAGS.seed)
    rng = np.random.default_rng(FLAGS.seed)
    runners = {"dense": lt._runner(model, runtime, 1, rng, FLAGS.threads)}
    for i, v in enumerate(variants):
        runners[f"p{i}"] = lt._runner(v["model"], runtime, 1, rng, FLAGS.threads)
    # One-shot knapsack to latency targets (random importance, widths multiples of 8).
    graph = kt.analyze(model)
    targeted = {}
    for t in [float(x) for x in FLAGS.targets]:
        scores = rng.uniform(size=graph.num_groups)
        start = time.time()
        plan = selection.knapsack_plan(graph, scores, table, t * table.full_ms, channel_multiple=8)
        solve_s = time.time() - start
        pruned = kt.apply_plan(model, plan)
        targeted[t] = {"model": pruned, "solve_s": solve_s, "predicted_fraction": table.predict(pruned) / table.full_ms,
                       "flops_fraction": kt.profile(pruned).flops / kt.profile(model).flops}
        runners[f"t{t}"] = lt._runner(pruned, runtime, 1, rng, FLAGS.threads)
    timed = kt_latency.time_callables(runners, rounds=FLAGS.rounds, seed=FLAGS.seed)
    rows = []
    for i, v in enumerate(variants):
        pred = table.predict(v["model"])
        meas = timed[f"p{i}"]["min_ms"]
        rows.append({
            "target_flops": v["target_flops"], "flops_fraction": v["flops_fraction"], "aligned8": v["aligned8"],
            "predicted_ms": pred, "measured_min_ms": meas, "measured_median_ms": timed[f"p{i}"]["median_ms"],
            "pred_over_meas": pred / meas,
        })
    err = np.abs(np.array([r["pred_over_meas"] for r in rows]) - 1.0)
    dense = timed["dense"]["min_ms"]
    target_rows = [
        {"target": t, "predicted_fraction": v["predicted_fraction"], "flops_fraction": v["flops_fraction"],
         "measured_fraction": timed[f"t{t}"]["min_ms"] / dense, "knapsack_s": v["solve_s"]}
        for t, v in targeted.items()
    ]
    return {
        "model": name, "runtime": runtime, "size": FLAGS.size, "batch": 1, "fractions": fr, "rounds": FLAGS.rounds, "threads": FLAGS.threads,
        "table_build_s": build_s, "table_cached_s": cached_s, "segments": len(table.layers),
        "dense_predicted_ms": table.predict(model), "dense_measured_min_ms": timed["dense"]["min_ms"],
        "table_full_ms": table.full_ms, "fixed_ms": table.fixed_ms,
        "median_abs_err": float(np.median(err)), "worst_abs_err": float(err.max()),
        "prunings": rows, "latency_targets": target_rows, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    }


def main(argv):
    del argv
    results = {}
    if os.path.exists(FLAGS.output):
        with open(FLAGS.output) as f:
            results = json.load(f)
    results.setdefault("runs", {})
    results["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared)"
    for name in FLAGS.models:
        for runtime in FLAGS.runtimes:
            res = run_one(name, runtime)
            res["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            res["command"] = " ".join(["python"] + sys.argv)
            results["runs"][f"{name}/{runtime}/{FLAGS.size}"] = res
            print(
                f"{name} {runtime} {FLAGS.size}²: table {res['table_build_s']:.0f} s ({res['segments']} segments, "
                f"cached {res['table_cached_s']:.2f} s); predicted/measured median |err| "
                f"{res['median_abs_err']:.3f}, worst {res['worst_abs_err']:.3f}; load {res['loadavg_before']}; targets "
                + ", ".join(f"{r['target']}: measured {r['measured_fraction']:.3f} (pred {r['predicted_fraction']:.3f}, "
                            f"FLOPs {r['flops_fraction']:.3f})" for r in res["latency_targets"]),
                flush=True,
            )
            os.makedirs(os.path.dirname(FLAGS.output), exist_ok=True)
            with open(FLAGS.output, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    app.run(main)
