"""Scoring overhead: fit step time with the TaylorPruning callback ÷ without.

Three variants of the same ResNet train side by side in one process:
  original  the user's model, plain `fit`;
  gated     `add_gates(model)`, plain `fit` (cost of the gates alone);
  scoring   `add_gates(model)` + `TaylorPruning` (scores accumulate in the
            train step; `prune_every` is set past the run, so no channel is
            removed and all three do the same arithmetic).
Rounds run the variants in a fresh random order; a round's step time is the
median over its minibatches (first two dropped). Reported: per-variant median
step time and the median [min–max] of per-round ratios.

    python benchmarks/scoring_overhead.py                 # ResNet-14, 28×28, batch 128
    python benchmarks/scoring_overhead.py --jit_compile
    python benchmarks/scoring_overhead.py --criteria=taylor_fo_fg,iclr17_taylor,...

`--criteria` adds one `scoring:<id>` variant per criterion to the same
rounds and reports each one's step time ÷ the Taylor-FO-BN `scoring` variant:
what per-example gradients and activation statistics cost.
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
from keras_taylor import models  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("rounds", 30, "Interleaved rounds.")
flags.DEFINE_bool("quick", False, "Smoke run: 2 rounds of 3 minibatches of 8 on a ResNet-8 at 16x16.")
flags.DEFINE_integer("steps", 10, "Minibatches per variant per round.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("blocks", 2, "Residual blocks per stage of the CIFAR-style ResNet (2: ResNet-14, 3: ResNet-20).")
flags.DEFINE_enum("model", "cifar_resnet", ["cifar_resnet", "resnet50"], "cifar_resnet: models.resnet; resnet50: keras.applications.ResNet50 (random weights).")
flags.DEFINE_integer("input_size", None, "Input height/width (default 28 for cifar_resnet with 1 channel, 64 for resnet50).")
flags.DEFINE_integer("channels", None, "Input channels (default 1 for cifar_resnet, 3 for resnet50).")
flags.DEFINE_bool("jit_compile", False, "Compile the train step with XLA.")
flags.DEFINE_list("criteria", [], "Extra criteria to time against the default Taylor-FO-BN scoring.")
flags.DEFINE_string("output", None, "JSON output path (default benchmarks/results/scoring_overhead[_jit].json).")


def compile_model(model):
    return _harness.compile_model(model, 0.01, metrics=False, jit_compile=FLAGS.jit_compile)


def main(argv):
    del argv
    if FLAGS.quick:
        FLAGS.rounds, FLAGS.steps, FLAGS.batch_size, FLAGS.blocks = 2, 3, 8, 1
        FLAGS.input_size = FLAGS.input_size or 16
        FLAGS.output = FLAGS.output or os.path.join(os.environ.get("TMPDIR", "/tmp"), "scoring_overhead_quick.json")
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    n = FLAGS.steps * FLAGS.batch_size
    size = FLAGS.input_size or (28 if FLAGS.model == "cifar_resnet" else 64)
    channels = FLAGS.channels or (1 if FLAGS.model == "cifar_resnet" else 3)
    x = rng.uniform(0, 1, (n, size, size, channels)).astype("float32")
    y = rng.integers(0, 10, n).astype("int32")
    if FLAGS.model == "resnet50":
        base = keras.applications.ResNet50(weights=None, input_shape=(size, size, channels), classes=10, classifier_activation=None)
        description = f"keras.applications.ResNet50 (random weights), {size}x{size}x{channels}, batch {FLAGS.batch_size}"
    else:
        base = models.resnet(input_shape=(size, size, channels), widths=(16, 32, 64), blocks_per_stage=FLAGS.blocks)
        description = f"ResNet-{2 + 6 * FLAGS.blocks} (widths 16/32/64), {size}x{size}x{channels}, batch {FLAGS.batch_size}"
    variants = {
        "original": (compile_model(base), []),
        "gated": (compile_model(kt.add_gates(base)), []),
    }
    scored = compile_model(kt.add_gates(base))
    pruner = kt.TaylorPruning(target=0.5, prune_every=10**9)
    variants["scoring"] = (scored, [pruner])
    for criterion in FLAGS.criteria:
        extra = kt.TaylorPruning(target=0.5, prune_every=10**9, criterion=criterion)
        variants[f"scoring:{criterion}"] = (compile_model(kt.add_gates(base)), [extra])
    for model, cbs in variants.values():  # warm-up: trace and compile
        model.fit(x, y, batch_size=FLAGS.batch_size, epochs=1, steps_per_epoch=5, verbose=0, callbacks=cbs)

    def median_step(name):
        model, cbs = variants[name]
        timer = _harness.StepTimer()
        model.fit(x, y, batch_size=FLAGS.batch_size, epochs=1, verbose=0, shuffle=False, callbacks=cbs + [timer])
        return float(np.median(timer.times[2:]))

    per_round = _harness.in_rounds(variants, FLAGS.rounds, median_step, seed=rng)
    assert float(pruner.scorer.steps.numpy()) > 0, "the scoring step did not run"
    t = {k: np.array(v) for k, v in per_round.items()}
    result = {
        "command": " ".join(["python benchmarks/scoring_overhead.py"] + sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        **_harness.machine(),
        "model": description,
        "jit_compile": FLAGS.jit_compile,
        "rounds": FLAGS.rounds,
        "steps_per_round": FLAGS.steps,
        "load_average_at_end": list(os.getloadavg()),
        "median_step_ms": {k: float(np.median(v) * 1e3) for k, v in t.items()},
    }
    pairs = [("scoring", "gated"), ("scoring", "original"), ("gated", "original")]
    pairs += [(f"scoring:{c}", "scoring") for c in FLAGS.criteria]
    for num, den in pairs:
        r = t[num] / t[den]
        result[f"{num}/{den}"] = {"median": float(np.median(r)), "min": float(r.min()), "max": float(r.max())}
    out = FLAGS.output or os.path.join(
        os.path.dirname(__file__), "results", "scoring_overhead" + ("_jit" if FLAGS.jit_compile else "") + ("_criteria" if FLAGS.criteria else "") + ".json"
    )
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    app.run(main)
