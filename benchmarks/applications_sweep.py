"""Sweep every keras.applications constructor: gate, prune a random ~30% of the
channel groups, apply surgery, check the pruned model equals the gated model
with those gates at 0 (≤1e-5 relative) and that FLOPs fell.

    python benchmarks/applications_sweep.py [--only ResNet50,MobileNetV2]

Writes benchmarks/results/applications_sweep.json: one record per constructor
with its status (pass / the error), the input size used, FLOPs before/after,
the relative output error and the seconds it took.
"""

from __future__ import annotations

import json
import os
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402

import keras  # noqa: E402
from keras_taylor.testing import application_constructors, prune_application  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("only", None, "Constructor names to run (default: all).")
flags.DEFINE_string("dtype", "float64", "Compute dtype of the check: float64 keeps rounding noise of very deep nets (EfficientNetV2-L) far below the 1e-5 tolerance.")
flags.DEFINE_string("output", os.path.join(os.path.dirname(__file__), "results", "applications_sweep.json"), "JSON output.")

def sweep_one(name, fn, seed=0) -> dict:
    start = time.time()
    try:
        rec = prune_application(fn, seed=seed)
        ok = rec["rel_err"] <= 1e-5 and rec["flops_after"] < rec["flops_before"] and rec["change_vs_unpruned"] > 1e-4
        rec["status"] = "pass" if ok else "mismatch"
    except Exception as e:  # record and go on: this is a survey
        rec = {"name": name, "status": "error", "error": f"{type(e).__name__}: {str(e)[:400]}"}
        rec["where"] = traceback.format_exc().strip().splitlines()[-3][:200]
    rec["seconds"] = round(time.time() - start, 1)
    keras.backend.clear_session()
    return rec


def main(argv):
    del argv
    keras.config.set_floatx(FLAGS.dtype)
    todo = application_constructors()
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
