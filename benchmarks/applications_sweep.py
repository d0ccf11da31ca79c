"""Sweep every keras.applications constructor: gate, prune a random ~30% of the
channel groups, apply surgery, check the pruned model equals the gated model
with those gates at 0 (≤1e-5 relative) and that FLOPs fell.

    python benchmarks/applications_sweep.py [--only ResNet50,MobileNetV2]

Writes benchmarks/results/applications_sweep.json: one record per constructor
with its status (pass / the error), the input size used, FLOPs before/after,
the relative output error and the seconds it took.
"""

from __future__ import annotations

import inspect
import json
import os
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_taylor as kt  # noqa: E402
from keras_taylor.testing import lively_statistics, preprocessed  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("only", None, "Constructor names to run (default: all).")
flags.DEFINE_string("dtype", "float64", "Compute dtype of the check: float64 keeps rounding noise of very deep nets (EfficientNetV2-L) far below the 1e-5 tolerance.")
flags.DEFINE_string("output", os.path.join(os.path.dirname(__file__), "results", "applications_sweep.json"), "JSON output.")

# Smallest input each family accepts with weights=None (Keras checks these).
MIN_SIZE = {"InceptionV3": 75, "InceptionResNetV2": 75, "Xception": 71, "NASNetMobile": 224, "NASNetLarge": 331}


def constructors() -> dict:
    out = {}
    for name in dir(keras.applications):
        fn = getattr(keras.applications, name)
        if callable(fn) and name[0].isupper() and "weights" in inspect.signature(fn).parameters:
            out[name] = fn
    return out


def sweep_one(name, fn, seed=0) -> dict:
    size = MIN_SIZE.get(name, 32)
    rec = {"name": name, "input": size}
    start = time.time()
    try:
        kwargs = dict(weights=None, input_shape=(size, size, 3), classes=10)
        if "classifier_activation" in inspect.signature(fn).parameters:
            kwargs["classifier_activation"] = None  # compare logits, not saturated softmax
        model = fn(**kwargs)
        lively_statistics(model)
        gated = kt.add_gates(model)
        graph = kt.analyze(gated)
        rec["groups"] = graph.num_groups
        rng = np.random.default_rng(seed)
        removed = set(rng.choice(graph.num_groups, size=max(1, int(0.3 * graph.num_groups)), replace=False).tolist())
        counts = graph.layer_channel_counts(removed)
        if min(counts.values()) == 0:  # keep every layer alive
            removed = {g for g in removed if all(c for c in graph.layer_channel_counts({g}).values())}
        plan = kt.PruningPlan.from_groups(graph, removed)
        rec["removed_groups"] = len(removed)
        for layer in gated.layers:
            if isinstance(layer, kt.ChannelGate):
                of = graph.groups_of_layer_output(layer.name)
                layer.gate.assign(np.where(np.isin(of, list(removed)), 0.0, 1.0).astype("float32"))
        rec["dtype"] = keras.config.floatx()
        pruned = kt.apply_plan(gated, plan)
        x = preprocessed(fn, rng.uniform(0, 255, (2, size, size, 3)).astype(keras.config.floatx()))
        a, b = np.asarray(pruned(x, training=False)), np.asarray(gated(x, training=False))
        rec["rel_err"] = float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))
        c = np.asarray(model(x, training=False))
        rec["change_vs_unpruned"] = float(np.max(np.abs(c - b)) / max(np.max(np.abs(b)), 1e-12))
        rec["flops_before"] = kt.profile(model).flops
        rec["flops_after"] = kt.profile(pruned).flops
        ok = rec["rel_err"] <= 1e-5 and rec["flops_after"] < rec["flops_before"] and rec["change_vs_unpruned"] > 1e-4
        rec["status"] = "pass" if ok else "mismatch"
    except Exception as e:  # record and go on: this is a survey
        rec["status"] = "error"
        rec["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        rec["where"] = traceback.format_exc().strip().splitlines()[-3][:200]
    rec["seconds"] = round(time.time() - start, 1)
    keras.backend.clear_session()
    return rec


def main(argv):
    del argv
    keras.config.set_floatx(FLAGS.dtype)
    todo = constructors()
    if FLAGS.only:
        todo = {k: v for k, v in todo.items() if k in FLAGS.only}
    records = []
    for name, fn in sorted(todo.items()):
        rec = sweep_one(name, fn)
        records.append(rec)
        print(f"{name:28s} {rec['status']:8s} {rec.get('rel_err', ''):<24} {rec['seconds']}s {rec.get('error', '')[:150]}", flush=True)
    summary = {"passed": sum(r["status"] == "pass" for r in records), "total": len(records), "date": time.strftime("%Y-%m-%d"), "records": records}
    os.makedirs(os.path.dirname(FLAGS.output), exist_ok=True)
    with open(FLAGS.output, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"{summary['passed']} / {summary['total']} pass")


if __name__ == "__main__":
    app.run(main)
