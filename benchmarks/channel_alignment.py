"""Channel alignment: latency of pruned models with and without rounding each
layer's kept channels to a multiple of 8 or 16, at (nearly) the same FLOPs.

For keras.applications ResNet50 and MobileNetV2 (weights=None, random
initialisation, 1000 classes, `--size`² inputs):

1. ranking: every channel group gets a random score (uniform; one pruned
   model set per `--seeds` entry, default 0 and 1); groups
   are removed lowest first, over all layers in one list (as TaylorPruning
   does), skipping any that would leave a Conv/Dense layer without channels,
   until FLOPs (MACs) <= `--target` of the dense model;
2. variants: `unaligned` (that set), `align8` and `align16`
   (`keras_taylor.align.align_removed(..., multiple, mode="nearest")`, the same
   scores), each physically pruned with `keras_taylor.apply_plan`;
3. latency, the three variants interleaved in every round (shuffled order):
   TF graph mode (`keras_taylor.latency.measure_latency`, a `tf.function` per
   model, TF's default threads) at batch 1 and batch 32, and the TFLite
   interpreter at batch 1 (`keras_taylor.export.export_tflite`, float32,
   XNNPACK, `--tflite_threads` threads). Each figure: per-variant median time,
   and the median [min–max] over rounds of the per-round ratio to `unaligned`;
   since the aligned variants' FLOPs differ slightly, latency/FLOPs ratios are
   given too ((t_aligned / t_unaligned) / (F_aligned / F_unaligned)).

`micro`: one Conv2D (C -> C, 1×1 and 3×3, 28×28) at widths 48, 56, 60, 63, 64,
65, 72, 80, interleaved, time per MAC relative to C = 64 (isolates the kernel
effect of a misaligned width from everything else in a network).

It also records how far alignment moves the FLOPs fraction ("drift": nearest
rounding, and `align_to_target`) for `--drift_seeds` random rankings of
ResNet50, MobileNetV2, EfficientNetB0, DenseNet121 and the README's ResNet-14
(no latency, analysis only).

    .venv/bin/python benchmarks/channel_alignment.py              # ≈17 min on 2 busy cores
    .venv/bin/python benchmarks/channel_alignment.py --quick      # smoke: 96², few rounds
    .venv/bin/python benchmarks/channel_alignment.py --sections micro --merge   # add one section to the JSON
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_taylor as kt  # noqa: E402
from keras_taylor import align, selection  # noqa: E402
from keras_taylor import export as kt_export  # noqa: E402
from keras_taylor import models as kt_models  # noqa: E402
from keras_taylor.flops import CostModel  # noqa: E402
from keras_taylor.latency import measure_latency  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("size", 224, "Input height = width.")
flags.DEFINE_float("target", 0.5, "FLOPs fraction the ranking prunes down to.")
flags.DEFINE_list("seeds", ["0", "1"], "Seeds of the random rankings timed (one pruned model set per seed).")
flags.DEFINE_list("models", ["ResNet50", "MobileNetV2"], "keras.applications constructors to time.")
flags.DEFINE_integer("rounds_b1", 15, "Interleaved rounds, TF batch 1 and TFLite.")
flags.DEFINE_integer("calls_b1", 10, "Calls per variant per round at batch 1.")
flags.DEFINE_integer("rounds_b32", 10, "Interleaved rounds, TF batch 32.")
flags.DEFINE_integer("calls_b32", 1, "Calls per variant per round at batch 32.")
flags.DEFINE_integer("tflite_threads", 1, "TFLite interpreter threads.")
flags.DEFINE_integer("drift_seeds", 5, "Random rankings per model for the FLOPs drift table.")
flags.DEFINE_list("sections", ["models", "drift", "micro"], "What to run: models (latency of pruned ResNet50/MobileNetV2), drift (FLOPs change), micro (one conv at several widths).")
flags.DEFINE_bool("merge", False, "Update the sections run in an existing --output JSON instead of writing a new one (each section keeps the command that made it).")
flags.DEFINE_bool("quick", False, "Smoke run: 96² inputs, 3 rounds, 1 drift seed.")
flags.DEFINE_string("output", os.path.join(os.path.dirname(__file__), "results", "channel_alignment.json"), "JSON output.")

VARIANTS = (("unaligned", None), ("align8", 8), ("align16", 16))
DRIFT_MODELS = ("ResNet50", "MobileNetV2", "EfficientNetB0", "DenseNet121", "ResNet14")


def build(name: str, size: int) -> keras.Model:
    keras.utils.set_random_seed(0)
    if name == "ResNet14":  # the README's main-job model
        return kt_models.resnet(input_shape=(28, 28, 1), num_classes=10, widths=(16, 32, 64), blocks_per_stage=2)
    return getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3))


class Pruner:
    """Global ranking and FLOPs of any removed set, for one analysed model."""

    def __init__(self, model):
        self.graph = kt.analyze(model)
        self.cost = CostModel(self.graph)
        self.dense = self.cost.evaluate(self.graph.alive_ids(()))
        self._layers = align._Layers(self.graph)

    def fractions(self, removed) -> tuple:
        flops, params = self.cost.evaluate(self.graph.alive_ids(removed))
        return flops / self.dense[0], params / self.dense[1]

    def flops_fraction(self, removed) -> float:
        return self.fractions(removed)[0]

    def rank_to_target(self, scores, target) -> set:
        """Lowest-scored groups first, every layer keeping a channel, until FLOPs <= target."""
        sequence, _ = kt.selection.greedy_removal(self.graph, scores, skip_nonfinite=False)
        lo, hi = 0, len(sequence)  # FLOPs fall along the sequence: bisect its length
        if self.flops_fraction(sequence) > target:
            return set(sequence)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.flops_fraction(sequence[:mid]) <= target:
                hi = mid
            else:
                lo = mid + 1
        return set(sequence[:lo])


def tflite_latency(flatbuffers: dict, rounds: int, calls: int, threads: int, seed: int = 0) -> dict:
    """Interleaved TFLite interpreter latency at batch 1, like `measure_latency`."""
    try:
        from ai_edge_litert import interpreter as litert
    except ImportError:
        litert = tf.lite
    rng = np.random.default_rng(seed)
    runners = {}
    for name, fb in flatbuffers.items():
        interp = litert.Interpreter(model_content=fb, num_threads=threads)
        interp.allocate_tensors()
        inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
        shape = [1] + [int(d) for d in inp["shape"][1:]]
        if list(inp["shape"]) != shape:
            interp.resize_tensor_input(inp["index"], shape)
            interp.allocate_tensors()
        x = rng.uniform(0, 1, shape).astype(np.float32)

        def run(interp=interp, x=x, i=inp["index"], o=out["index"]):
            interp.set_tensor(i, x)
            interp.invoke()
            return interp.get_tensor(o)

        runners[name] = run
    result = _harness.measure(runners, rounds, calls=calls, seed=rng, warmup=3)
    for n in runners:
        del result[n]["per_round_ms"]
        result[n]["runtime"] = getattr(litert, "__name__", str(litert))
    return {n: result[n] for n in runners}


def per_flops(latency: dict, flops: dict) -> None:
    """Adds latency/FLOPs ratios relative to `unaligned`."""
    for name, rec in latency.items():
        scale = flops[name] / flops["unaligned"]
        rec["ratio_per_flops_median"] = rec["ratio_median"] / scale
        rec["ratio_per_flops_min"] = rec["ratio_min"] / scale
        rec["ratio_per_flops_max"] = rec["ratio_max"] / scale


def time_model(name: str, size: int, seed: int) -> dict:
    t0 = time.time()
    model = build(name, size)
    pruner = Pruner(model)
    graph = pruner.graph
    scores = np.random.default_rng(seed).random(graph.num_groups)
    removed = pruner.rank_to_target(scores, FLAGS.target)
    record = {"seed": seed, "input": [size, size, 3], "groups": graph.num_groups, "variants": {}}
    pruned, flops = {}, {}
    for vname, multiple in VARIANTS:
        groups = removed if multiple is None else align.align_removed(graph, removed, scores, multiple)
        f, p = pruner.fractions(groups)
        report = {m: align.alignment_report(graph, groups, m) for m in (8, 16)}
        record["variants"][vname] = {
            "removed_groups": len(groups),
            "restored_vs_unaligned": len(removed - groups),
            "added_vs_unaligned": len(groups - removed),
            "flops_fraction": f,
            "params_fraction": p,
            "creating_layers": len(report[8]),
            "layers_aligned_to_8": sum(r.aligned for r in report[8]),
            "layers_aligned_to_16": sum(r.aligned for r in report[16]),
        }
        pruned[vname] = kt.apply_plan(model, kt.PruningPlan.from_groups(graph, groups))
        flops[vname] = kt.profile(pruned[vname]).flops
        record["variants"][vname]["flops_pruned_model"] = flops[vname]
    record["dense_flops"] = kt.profile(model).flops
    print(f"[{name} seed {seed}] pruned variants ready ({time.time() - t0:.0f}s):", {v: round(r["flops_fraction"], 4) for v, r in record["variants"].items()}, flush=True)

    lat = {}
    lat["tf_batch1"] = measure_latency(pruned, batch_size=1, rounds=FLAGS.rounds_b1, calls_per_round=FLAGS.calls_b1, warmup=3, reference="unaligned")
    print(f"[{name} seed {seed}] TF b1 done ({time.time() - t0:.0f}s)", {k: round(v["ratio_median"], 3) for k, v in lat["tf_batch1"].items()}, flush=True)
    lat["tf_batch32"] = measure_latency(pruned, batch_size=32, rounds=FLAGS.rounds_b32, calls_per_round=FLAGS.calls_b32, warmup=1, reference="unaligned")
    print(f"[{name} seed {seed}] TF b32 done ({time.time() - t0:.0f}s)", {k: round(v["ratio_median"], 3) for k, v in lat["tf_batch32"].items()}, flush=True)
    fbs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for vname, m in pruned.items():
            path = os.path.join(tmp, f"{vname}.tflite")
            x = np.random.default_rng(0).uniform(0, 1, (1, size, size, 3)).astype("float32")
            info = kt_export.export_tflite(m, path, check_inputs=x)
            with open(path, "rb") as f:
                fbs[vname] = f.read()
            record["variants"][vname]["tflite_bytes"] = info["size_bytes"]
            record["variants"][vname]["tflite_check_max_abs_diff"] = info["max_abs_diff"]
    lat["tflite_batch1"] = tflite_latency(fbs, FLAGS.rounds_b1, FLAGS.calls_b1, FLAGS.tflite_threads)
    print(f"[{name} seed {seed}] TFLite b1 done ({time.time() - t0:.0f}s)", {k: round(v["ratio_median"], 3) for k, v in lat["tflite_batch1"].items()}, flush=True)
    for rec in lat.values():
        per_flops(rec, flops)
    record["latency"] = lat
    record["seconds"] = time.time() - t0
    return record


def drift(seeds: int, size: int) -> dict:
    """FLOPs fraction before/after alignment over random rankings (no latency)."""
    out = {}
    for name in DRIFT_MODELS:
        model = build(name, size)
        pruner = Pruner(model)
        rows = []
        for seed in range(seeds):
            scores = np.random.default_rng(seed).random(pruner.graph.num_groups)
            removed = pruner.rank_to_target(scores, FLAGS.target)
            row = {"seed": seed, "unaligned": pruner.flops_fraction(removed)}
            for m in (8, 16):
                for mode in ("nearest", "up", "down"):
                    row[f"{mode}{m}"] = pruner.flops_fraction(align.align_removed(pruner.graph, removed, scores, m, mode=mode))
                t = time.time()
                row[f"target{m}"] = pruner.flops_fraction(
                    selection.align_to_target(pruner.graph, removed, scores, m, pruner.flops_fraction, FLAGS.target)
                )
                row[f"target{m}_seconds"] = time.time() - t
            rows.append(row)
        keys = [k for k in rows[0] if k != "seed" and not k.endswith("seconds")]
        out[name] = {
            "input": list(model.inputs[0].shape[1:]),
            "groups": pruner.graph.num_groups,
            "rows": rows,
            "mean": {k: float(np.mean([r[k] for r in rows])) for k in keys},
            "min": {k: float(np.min([r[k] for r in rows])) for k in keys},
            "max": {k: float(np.max([r[k] for r in rows])) for k in keys},
        }
        print(f"[drift {name}]", {k: round(v, 4) for k, v in out[name]["mean"].items()}, flush=True)
    return out


MICRO_WIDTHS = (48, 56, 60, 63, 64, 65, 72, 80)


def micro(rounds: int) -> dict:
    """One Conv2D (C -> C channels, 28×28, 'same') at several widths C, interleaved.

    Time per MAC relative to C = 64, so multiples of 16 (48, 64, 80), of 8
    only (56, 72) and misaligned widths (60, 63, 65) compare at equal work.
    """
    out = {}
    for kernel in (1, 3):
        for batch in (1, 16):
            nets, macs = {}, {}
            for c in MICRO_WIDTHS:
                keras.utils.set_random_seed(0)
                inputs = keras.Input((28, 28, c))
                nets[f"C{c}"] = keras.Model(inputs, keras.layers.Conv2D(c, kernel, padding="same")(inputs))
                macs[f"C{c}"] = 28 * 28 * kernel * kernel * c * c
            # Widths differ, so every net gets its own input: measure one at a time
            # per round, in a shuffled order, like measure_latency.
            rng = np.random.default_rng(0)
            fns = {n: tf.function(lambda x, m=m: m(x, training=False)) for n, m in nets.items()}
            xs = {n: tf.constant(rng.uniform(0, 1, (batch, 28, 28, int(n[1:]))).astype("float32")) for n in nets}
            calls = 20 if batch == 1 else 5
            runs = {n: (lambda n=n: fns[n](xs[n])) for n in nets}
            for n in nets:
                for _ in range(3):
                    fns[n](xs[n]).numpy()
            times = _harness.interleaved(runs, rounds, calls, rng, finish=lambda y: y.numpy())
            ref = np.array(times["C64"]) / macs["C64"]
            rec = {}
            for n in nets:
                per_mac = np.array(times[n]) / macs[n] / ref  # per-round: (t/MAC) ÷ (t64/MAC64)
                rec[n] = {
                    "median_ms": float(np.median(times[n])),
                    "macs": macs[n],
                    "time_per_mac_vs_C64_median": float(np.median(per_mac)),
                    "time_per_mac_vs_C64_min": float(per_mac.min()),
                    "time_per_mac_vs_C64_max": float(per_mac.max()),
                }
            key = f"conv{kernel}x{kernel}_batch{batch}"
            out[key] = rec
            print(f"[micro {key}]", {n: round(r["time_per_mac_vs_C64_median"], 3) for n, r in rec.items()}, flush=True)
    return out


def main(argv):
    del argv
    import warnings

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # SavedModel/TFLite export chatter
    tf.get_logger().setLevel("ERROR")  # tf.function retracing notes (one function per model)
    warnings.filterwarnings("ignore", message=r"(?s).*Interpreter is deprecated")
    if FLAGS.quick:
        FLAGS.size, FLAGS.rounds_b1, FLAGS.rounds_b32, FLAGS.calls_b1, FLAGS.drift_seeds = 96, 3, 2, 2, 1
        FLAGS.seeds = FLAGS.seeds[:1]
    start = time.time()
    command = " ".join([".venv/bin/python"] + sys.argv)
    meta = {
        "command": command,
        "date": datetime.date.today().isoformat(),
        **_harness.machine(),
        "load_average_1_5_15min_start": list(os.getloadavg()),
        "settings": {k: getattr(FLAGS, k) for k in ("size", "target", "seeds", "models", "rounds_b1", "calls_b1", "rounds_b32", "calls_b32", "tflite_threads", "drift_seeds", "sections", "quick")},
    }
    result = dict(meta)
    merging = FLAGS.merge and os.path.exists(FLAGS.output)
    if merging:
        with open(FLAGS.output) as f:
            result = json.load(f)
        for section in ("models", "drift", "micro"):  # sections written before section_runs existed
            if section in result and section not in result.setdefault("section_runs", {}):
                result["section_runs"][section] = {k: result.get(k) for k in ("command", "date", "load_average_1_5_15min_start", "load_average_1_5_15min_end", "seconds")}
    if "models" in FLAGS.sections:
        result["ranking"] = "random uniform score per group (seeded), global ascending order, every Conv/Dense layer keeps >= 1 channel"
        result["models"] = {}
        for name in FLAGS.models:
            result["models"][name] = {"seeds": {}}
            for seed in FLAGS.seeds:
                result["models"][name]["seeds"][str(seed)] = time_model(name, FLAGS.size, int(seed))
    if "drift" in FLAGS.sections:
        result["drift"] = drift(FLAGS.drift_seeds, FLAGS.size)
    if "micro" in FLAGS.sections:
        result["micro"] = micro(FLAGS.rounds_b1)
    run = {k: meta[k] for k in ("command", "date", "load_average_1_5_15min_start")}
    run.update(load_average_1_5_15min_end=list(os.getloadavg()), seconds=time.time() - start)
    for section in FLAGS.sections:
        result.setdefault("section_runs", {})[section] = run
    if not merging:
        result["load_average_1_5_15min_end"], result["seconds"] = run["load_average_1_5_15min_end"], run["seconds"]
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    with open(FLAGS.output, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {FLAGS.output} ({run['seconds']:.0f}s)")


if __name__ == "__main__":
    app.run(main)
