"""Latency prediction: does a `keras_taylor.LatencyTable` predict the latency
of pruned models?

For each model (keras.applications ResNet50 / MobileNetV2, `weights=None`,
BN given trained-looking statistics by `keras_taylor.testing.
lively_statistics`, `--size`² inputs: smaller than 224 on a loaded 2-core
machine) and runtime (`tf`, `tflite`; batch 1):

1. `kt.LatencyTable.measure(model, runtime, calibrate=0)` — cold build time
   recorded (`--fresh`, the default, clears this run's cache first); then
   the same with `calibrate=--calibrate` (the calibration's time recorded:
   `--calibrate` random prunings measured whole, seeded from `[seed, 7919]`).
2. `--prunings` random prunings for the check, drawn from `[seed, 1]`
   (`selection.random_flops_removal`: FLOPs kept uniform in [0.3, 0.9],
   every second one aligned to 8), none equal to a calibration pruning
   (checked by digest).
3. Latency targets (`--targets`): `kt.plan_for_latency` (knapsack on random
   importance, widths multiples of 8, closed loop of at most `--iterations`
   measured plans, tolerance 0.02), and for contrast the FLOPs knapsack with
   the same scores at the FLOPs the latency plan reached.
4. A final check, anchored: the prunings and both targeted models of every
   target timed in groups of at most `--group` models, each group together
   with the dense model, `--check_rounds` interleaved rounds (times paired
   to the group's dense model: its minimum of per-round means × each model's
   median same-round ratio to it, `latency.paired_ms`) — the context of the calibration (dense + `--calibrate`
   prunings) and of the closed loop. Compared with `table.predict`
   (calibrated) and the uncalibrated table's prediction, both absolutely
   (predicted ms ÷ measured ms) and anchored (predicted ÷ predicted dense,
   over measured ÷ the same group's measured dense); the dense model's time
   in every group and in the calibration is recorded (the drift over the
   run). Target cells report the ratio to their group's dense model (and the
   loop's own measurement).

`--threads N` sets the LiteRT interpreter's threads and TF's intra/inter-op
pools (1 on this shared 2-core machine: far steadier). `--build_only` only
times a cold table build (e.g. ResNet50 at 224² on tflite).

    nice python benchmarks/latency_prediction.py --models ResNet50 --runtimes tflite --size 64 --threads 1

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
from keras_taylor import latency_table as lt  # noqa: E402
from keras_taylor import selection  # noqa: E402
from keras_taylor.flops import CostModel  # noqa: E402
from keras_taylor.testing import lively_statistics  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["ResNet50", "MobileNetV2"], "keras.applications models.")
flags.DEFINE_list("runtimes", ["tf", "tflite"], "Runtimes.")
flags.DEFINE_integer("size", 96, "Input size (square).")
flags.DEFINE_integer("prunings", 20, "Random prunings per model and runtime.")
flags.DEFINE_integer("rounds", 7, "Interleaved timing rounds of the table's segments.")
flags.DEFINE_integer("check_rounds", 21, "Interleaved rounds of whole-model timings (calibration, closed loop, final check).")
flags.DEFINE_integer("seed", 0, "Seed.")
flags.DEFINE_integer("threads", None, "Threads: tflite/onnxruntime (table and check) and TF's intra/inter-op pools; default: the runtime's.")
flags.DEFINE_integer("group", 6, "Final check: models per timing group, each group timed with the dense model (anchor).")
flags.DEFINE_integer("calibrate", 8, "Random prunings the table is calibrated on (disjoint from the evaluated ones).")
flags.DEFINE_integer("iterations", 4, "Most plans (= measurements) of the closed loop per latency target.")
flags.DEFINE_list("targets", ["0.7", "0.5", "0.3"], "One-shot knapsack latency targets (random scores, aligned to 8).")
flags.DEFINE_list("fractions", ["0.125", "0.25", "0.375", "0.5", "0.625", "0.75", "0.875"], "Width fractions sampled by the table.")
flags.DEFINE_bool("build_only", False, "Only time a cold table build (no calibration, no check); key <model>/<runtime>/<size>/build.")
flags.DEFINE_bool("fresh", True, "Clear this run's table cache first (cold build time).")
flags.DEFINE_string("key_suffix", "", "Appended to the results key <model>/<runtime>/<size> (e.g. \"/paired\": a rerun kept beside an earlier one).")
flags.DEFINE_string("cache_dir", "/tmp/keras_taylor_latency_bench", "Table cache directory.")
flags.DEFINE_string("output", os.path.join(os.path.dirname(__file__), "results", "latency_prediction.json"), "Results JSON.")


def build(name, size, seed):
    keras.utils.set_random_seed(seed)
    model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3))
    lively_statistics(model, seed)
    return model


def prunings(model, n, seed, exclude=()):
    """`n` random prunings (FLOPs kept uniform in [0.3, 0.9], every second one
    aligned to 8), none equal to a calibration pruning (`exclude`: their keys)."""
    graph = kt.analyze(model)
    cost = CostModel(graph)
    full = cost.evaluate(graph.alive_ids(()))[0]
    rng = np.random.default_rng([seed, 1])  # the table's calibration draws from [seed, 7919]
    out = []
    while len(out) < n:
        target = float(rng.uniform(0.3, 0.9))
        aligned = len(out) % 2 == 1
        removed = selection.random_flops_removal(graph, target, rng, multiple=8 if aligned else None)
        if lt.removal_key(removed) in exclude:
            continue
        pruned = kt.apply_plan(model, kt.PruningPlan.from_groups(graph, removed))
        out.append({
            "target_flops": target, "aligned8": aligned,
            "flops_fraction": cost.evaluate(graph.alive_ids(removed))[0] / full, "model": pruned,
        })
    return out


def build_only(name, runtime):
    """Cold build time of the table alone (fresh cache), and how many segments are distinct."""
    load_before = os.getloadavg()
    model = build(name, FLAGS.size, FLAGS.seed)
    cache = os.path.join(FLAGS.cache_dir, f"{name}_{runtime}_{FLAGS.size}_build")
    if os.path.isdir(cache):
        shutil.rmtree(cache)
    fr = [float(f) for f in FLAGS.fractions]
    start = time.time()
    table = kt.LatencyTable.measure(model, runtime=runtime, rounds=FLAGS.rounds, fractions=fr, threads=FLAGS.threads,
                                    cache_dir=cache, calibrate=0, verbose=1)
    build_s = time.time() - start
    distinct = len({json.dumps(e, sort_keys=True) for e in table.layers.values()})
    return {"model": name, "runtime": runtime, "size": FLAGS.size, "batch": 1, "fractions": fr, "rounds": FLAGS.rounds,
            "threads": FLAGS.threads, "table_build_s": build_s, "segments": len(table.layers), "distinct_segments": distinct,
            "dense_ms": table.full_ms, "loadavg_before": load_before, "loadavg_after": os.getloadavg()}


def run_one(name, runtime):
    load_before = os.getloadavg()
    model = build(name, FLAGS.size, FLAGS.seed)
    cache = os.path.join(FLAGS.cache_dir, f"{name}_{runtime}")
    if FLAGS.fresh and os.path.isdir(cache):
        shutil.rmtree(cache)
    fr = [float(f) for f in FLAGS.fractions]
    kwargs = dict(runtime=runtime, rounds=FLAGS.rounds, fractions=fr, threads=FLAGS.threads, cache_dir=cache, calibration_rounds=FLAGS.check_rounds)
    start = time.time()
    uncal = kt.LatencyTable.measure(model, calibrate=0, verbose=1, **kwargs)
    build_s = time.time() - start
    start = time.time()
    table = kt.LatencyTable.measure(model, calibrate=FLAGS.calibrate, verbose=0, **kwargs)
    calibrate_s = time.time() - start
    start = time.time()
    kt.LatencyTable.measure(model, calibrate=FLAGS.calibrate, verbose=0, **kwargs)
    cached_s = time.time() - start
    exclude = {p["removed_key"] for p in (table.calibration or {}).get("points", [])}
    variants = prunings(model, FLAGS.prunings, FLAGS.seed, exclude)
    rng = np.random.default_rng(FLAGS.seed)
    timer = lt._runtime_timer(runtime, 1, FLAGS.threads, FLAGS.check_rounds, rng)
    # Latency targets: closed loop (plan, build, measure, re-plan) with random importance,
    # widths multiples of 8; then FLOPs-targeted knapsack at the FLOPs the latency plan reached.
    graph = kt.analyze(model)
    flops_terms = selection.cost_terms(graph, "flops")
    dense_flops = flops_terms.evaluate(graph.alive_ids(()))
    dense_pred = table.predict(model)
    targeted = {}
    for t in [float(x) for x in FLAGS.targets]:
        scores = rng.uniform(size=graph.num_groups)
        start = time.time()
        plan, history = kt.plan_for_latency(model, scores, table, t, measure=timer, iterations=FLAGS.iterations, channel_multiple=8)
        loop_s = time.time() - start
        pruned = kt.apply_plan(model, plan)
        fl = kt.profile(pruned).flops / kt.profile(model).flops
        fplan = selection.knapsack_plan(graph, scores, "flops", fl * dense_flops, channel_multiple=8)
        fpruned = kt.apply_plan(model, fplan)
        targeted[t] = {
            "model": pruned, "flops_model": fpruned, "loop_s": loop_s, "history": history,
            "predicted_fraction": table.predict(pruned) / dense_pred, "flops_fraction": fl,
            "flops_pruned_flops_fraction": kt.profile(fpruned).flops / kt.profile(model).flops,
        }
    # Final check, anchored: the models are timed in groups of at most --group, each group
    # interleaved with the dense model (the calibration's context: dense + --calibrate
    # prunings), so every measurement has the dense model of its own group beside it.
    others = {f"p{i}": v["model"] for i, v in enumerate(variants)}
    for t, v in targeted.items():
        others[f"t{t}"] = v["model"]
        others[f"f{t}"] = v["flops_model"]
    names = list(others)
    timed, dense_of, group_dense = {}, {}, []
    for g in range(0, len(names), FLAGS.group):
        chunk = names[g:g + FLAGS.group]
        ms = timer({"dense": model, **{k: others[k] for k in chunk}})  # models the loop timed are not converted again
        group_dense.append(ms["dense"])
        for k in chunk:
            timed[k], dense_of[k] = ms[k], ms["dense"]
    dense_pred_u = uncal.predict(model)
    rows = []
    for i, v in enumerate(variants):
        meas = timed[f"p{i}"]
        row = {
            "target_flops": v["target_flops"], "flops_fraction": v["flops_fraction"], "aligned8": v["aligned8"],
            "measured_min_ms": meas, "group_dense_ms": dense_of[f"p{i}"],
        }
        for key, tab, dp in (("", table, dense_pred), ("uncalibrated_", uncal, dense_pred_u)):
            row[key + "predicted_ms"] = tab.predict(v["model"])
            row[key + "pred_over_meas"] = row[key + "predicted_ms"] / meas
            row[key + "anchored_pred_over_meas"] = (row[key + "predicted_ms"] / dp) / (meas / dense_of[f"p{i}"])
        rows.append(row)

    def errors(key):
        return np.abs(np.array([r[key] for r in rows]) - 1.0)

    err, err_u = errors("pred_over_meas"), errors("uncalibrated_pred_over_meas")
    err_a, err_ua = errors("anchored_pred_over_meas"), errors("uncalibrated_anchored_pred_over_meas")
    dense = float(np.median(group_dense))
    cal_dense = next((p["ms"] for p in (table.calibration or {}).get("points", []) if p["name"] == "dense"), None)
    target_rows = [
        {"target": t, "predicted_fraction": v["predicted_fraction"], "flops_fraction": v["flops_fraction"],
         "measured_fraction": timed[f"t{t}"] / dense_of[f"t{t}"],
         "loop_measured_fraction": min(v["history"], key=lambda h: abs(h["measured_fraction"] - t))["measured_fraction"],
         "measurements": len(v["history"]), "loop_s": v["loop_s"], "history": v["history"],
         "flops_targeted_flops_fraction": v["flops_pruned_flops_fraction"],
         "flops_targeted_measured_fraction": timed[f"f{t}"] / dense_of[f"f{t}"]}
        for t, v in targeted.items()
    ]
    return {
        "model": name, "runtime": runtime, "size": FLAGS.size, "batch": 1, "fractions": fr, "rounds": FLAGS.rounds, "check_rounds": FLAGS.check_rounds, "threads": FLAGS.threads,
        "table_build_s": build_s, "calibrate_s": calibrate_s, "table_cached_s": cached_s, "segments": len(table.layers),
        "calibration": table.calibration,
        "dense_predicted_ms": table.predict(model), "dense_measured_min_ms": dense,
        "check_protocol": f"anchored groups: dense + at most {FLAGS.group} models, {FLAGS.check_rounds} interleaved rounds each, statistic {lt.WHOLE_MODEL_STAT}",
        "group_dense_ms": group_dense, "calibration_dense_ms": cal_dense,
        "table_full_ms": table.full_ms, "uncalibrated_fixed_ms": uncal.fixed_ms,
        "median_abs_err": float(np.median(err)), "worst_abs_err": float(err.max()),
        "uncalibrated_median_abs_err": float(np.median(err_u)), "uncalibrated_worst_abs_err": float(err_u.max()),
        "anchored_median_abs_err": float(np.median(err_a)), "anchored_worst_abs_err": float(err_a.max()),
        "uncalibrated_anchored_median_abs_err": float(np.median(err_ua)), "uncalibrated_anchored_worst_abs_err": float(err_ua.max()),
        "prunings": rows, "latency_targets": target_rows, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    }


def anchored(res):
    """Adds the errors of the prediction *relative to the dense model*:
    (predicted ÷ predicted dense) ÷ (measured ÷ measured dense, same session).
    On a shared machine the absolute level drifts between sessions (the dense
    model measured ±15% apart between the calibration and the check on tf);
    a ratio is what a latency target is, and this is its error."""
    if "prunings" not in res or "check_protocol" in res:
        return res  # new runs carry their anchored errors, measured per group
    dp, dm = res["dense_predicted_ms"], res["dense_measured_min_ms"]
    for key in ("", "uncalibrated_"):
        if key == "uncalibrated_" and "uncalibrated_predicted_ms" not in res["prunings"][0]:
            continue
        dpk = dp if key == "" else res["table_full_ms"]  # the uncalibrated table predicts full_ms for the dense model
        err = [abs((r[key + "predicted_ms"] / dpk) / (r["measured_min_ms"] / dm) - 1.0) for r in res["prunings"]]
        res[key + "anchored_median_abs_err"] = float(np.median(err))
        res[key + "anchored_worst_abs_err"] = float(np.max(err))
    return res


def main(argv):
    del argv
    if FLAGS.threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
        tf.config.threading.set_inter_op_parallelism_threads(FLAGS.threads)
    results = {}
    if os.path.exists(FLAGS.output):
        with open(FLAGS.output) as f:
            results = json.load(f)
    results.setdefault("runs", {})
    for res in results["runs"].values():
        anchored(res)
    results["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared)"
    for name in FLAGS.models:
        for runtime in FLAGS.runtimes:
            if FLAGS.build_only:
                res = build_only(name, runtime)
                res["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
                res["command"] = " ".join(["python"] + sys.argv)
                results["runs"][f"{name}/{runtime}/{FLAGS.size}/build"] = res
                print(f"{name} {runtime} {FLAGS.size}²: cold table build {res['table_build_s']:.0f} s "
                      f"({res['segments']} segments, {res['distinct_segments']} distinct); load {res['loadavg_before']}", flush=True)
                with open(FLAGS.output, "w") as f:
                    json.dump(results, f, indent=1)
                continue
            res = anchored(run_one(name, runtime))
            res["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            res["command"] = " ".join(["python"] + sys.argv)
            results["runs"][f"{name}/{runtime}/{FLAGS.size}{FLAGS.key_suffix}"] = res
            print(
                f"{name} {runtime} {FLAGS.size}²: table {res['table_build_s']:.0f} s ({res['segments']} segments), "
                f"calibration {res['calibrate_s']:.0f} s, cached {res['table_cached_s']:.2f} s; coef {res['calibration'] and res['calibration']['coef']}; "
                f"predicted/measured median |err| {res['median_abs_err']:.3f}, worst {res['worst_abs_err']:.3f} "
                f"(uncalibrated {res['uncalibrated_median_abs_err']:.3f}/{res['uncalibrated_worst_abs_err']:.3f}); "
                f"anchored {res.get('anchored_median_abs_err', float('nan')):.3f}/{res.get('anchored_worst_abs_err', float('nan')):.3f}; "
                f"intercept {res['calibration'] and res['calibration'].get('intercept')}; dense per group {[round(d, 2) for d in res.get('group_dense_ms', [])]} "
                f"(calibration {res.get('calibration_dense_ms')}); load {res['loadavg_before']}; targets "
                + ", ".join(f"{r['target']}: measured {r['measured_fraction']:.3f} (loop {r['loop_measured_fraction']:.3f} in {r['measurements']}, "
                            f"pred {r['predicted_fraction']:.3f}, FLOPs {r['flops_fraction']:.3f}; FLOPs-targeted {r['flops_targeted_measured_fraction']:.3f})"
                            for r in res["latency_targets"]),
                flush=True,
            )
            os.makedirs(os.path.dirname(FLAGS.output), exist_ok=True)
            with open(FLAGS.output, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    app.run(main)
