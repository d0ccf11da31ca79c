"""Surgery time: `apply_plan` on ResNet-50 ÷ a plain Keras rebuild of it.

Four operations on the same `keras.applications.ResNet50(weights=None)`:
  rebuild   `keras.Model.from_config(model.get_config())` + `set_weights`
            (the floor: what any copy of the model costs);
  surgery   `keras_taylor.apply_plan(model, plan)`, the plan removing a random
            ~30% of the prunable channel groups (every layer keeps a channel);
  analyze   `keras_taylor.analyze(model)` alone (information);
  add_gates `keras_taylor.add_gates(model)` (information).
Each round runs all four once, in an order rotated by one per round, after a
`gc.collect()` (and `keras.backend.clear_session()` between rounds). One
untimed warm-up call of each comes first. Reported: per-operation median
seconds and the median [min–max] of the per-round ratio surgery / rebuild
(target: ≤ 2×). With `--profile_top N` (default 15), one more `apply_plan`
runs under cProfile and its top-N functions by cumulative time are stored.

    python benchmarks/surgery_time.py                 # ResNet-50, 224×224, 7 rounds
    python benchmarks/surgery_time.py --rounds 3 --input_size 128
"""

from __future__ import annotations

import cProfile
import gc
import io
import json
import os
import pstats
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_taylor as kt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("rounds", 7, "Interleaved rounds.")
flags.DEFINE_integer("input_size", 224, "Input height = width of the ResNet50.")
flags.DEFINE_float("fraction", 0.3, "Fraction of the prunable channel groups to draw for removal.")
flags.DEFINE_integer("profile_top", 15, "Profile one extra apply_plan with cProfile and keep its top-N functions by cumulative time (0: skip).")
_harness.define_common_flags(flags, "surgery_time.json", "Smoke run: 1 round, 32x32 input, no cProfile.")

OPS = ("rebuild", "surgery", "analyze", "add_gates")


def random_groups(graph: kt.ChannelGraph, fraction: float, seed: int) -> set:
    """A random `fraction` of the groups, dropping any that would empty a layer.

    As in tests/test_applications.py: draw, keep the groups that leave every
    channel-creating layer a channel on their own, then (since groups of one
    layer could still empty it together) drop groups until every layer lives.
    """
    rng = np.random.default_rng(seed)
    drawn = rng.choice(graph.num_groups, size=max(1, int(fraction * graph.num_groups)), replace=False).tolist()
    removed = [g for g in drawn if min(graph.layer_channel_counts({g}).values()) > 0]
    while removed and min(graph.layer_channel_counts(set(removed)).values()) == 0:
        removed.pop()
    return set(removed)


def make_ops(model, plan) -> dict:
    def rebuild():
        new = keras.Model.from_config(model.get_config())
        new.set_weights(model.get_weights())
        return new

    return {
        "rebuild": rebuild,
        "surgery": lambda: kt.apply_plan(model, plan),
        "analyze": lambda: kt.analyze(model),
        "add_gates": lambda: kt.add_gates(model),
    }


def timed(fn) -> float:
    gc.collect()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    del out
    return seconds


def profile_surgery(model, plan, top: int) -> dict:
    prof = cProfile.Profile()
    prof.enable()
    pruned = kt.apply_plan(model, plan)
    prof.disable()
    del pruned
    stats = pstats.Stats(prof)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(top)
    rows = []
    for (path, line, func), (cc, nc, tt, ct, _) in sorted(stats.stats.items(), key=lambda kv: -kv[1][3])[:top]:
        rows.append({
            "function": f"{_short(path)}:{line}({func})",
            "calls": nc,
            "tottime_s": round(tt, 4),
            "cumtime_s": round(ct, 4),
        })
    return {"total_s": round(stats.total_tt, 4), "top_by_cumtime": rows, "pstats_text": text.getvalue()}


def _short(path: str) -> str:
    for marker in ("site-packages/", "keras_taylor/"):
        i = path.rfind(marker)
        if i >= 0:
            return path[i + len(marker):] if marker == "site-packages/" else path[i:]
    return path


def machine() -> dict:
    return _harness.machine()


def main(argv):
    del argv
    if FLAGS.quick:
        FLAGS.rounds, FLAGS.input_size, FLAGS.profile_top = 1, 32, 0
    keras.utils.set_random_seed(0)
    size = FLAGS.input_size
    model = keras.applications.ResNet50(weights=None, input_shape=(size, size, 3))
    graph = kt.analyze(model)
    removed = random_groups(graph, FLAGS.fraction, FLAGS.seed)
    plan = kt.PruningPlan.from_groups(graph, removed)
    ops = make_ops(model, plan)

    load_before = os.getloadavg()
    pruned = kt.apply_plan(model, plan)  # also the check that the plan works
    params = {"original": model.count_params(), "pruned": pruned.count_params()}
    assert params["pruned"] < params["original"], params
    del pruned
    warmup = {name: timed(fn) for name, fn in ops.items()}

    per_round = {name: [] for name in OPS}
    orders = []
    for r in range(FLAGS.rounds):
        keras.backend.clear_session()
        gc.collect()
        order = list(OPS[r % len(OPS):] + OPS[:r % len(OPS)])
        orders.append(order)
        for name in order:
            per_round[name].append(timed(ops[name]))
        ratio = per_round["surgery"][-1] / per_round["rebuild"][-1]
        print(
            f"round {r + 1}/{FLAGS.rounds}: "
            + ", ".join(f"{n} {per_round[n][-1]:.2f}s" for n in OPS)
            + f", surgery/rebuild {ratio:.2f}x",
            flush=True,
        )
    load_after = os.getloadavg()

    t = {k: np.array(v) for k, v in per_round.items()}
    ratio = t["surgery"] / t["rebuild"]
    cmd = " ".join(["python", "benchmarks/surgery_time.py"] + sys.argv[1:])
    result = {
        "command": cmd,
        "date": time.strftime("%Y-%m-%d"),
        **machine(),
        "load_average_1_5_15min": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in load_after]},
        "model": f"keras.applications.ResNet50(weights=None), {size}x{size}x3",
        "layers": len(model.layers),
        "prunable_groups": graph.num_groups,
        "removed_groups": len(removed),
        "removed_channels": plan.num_removed,
        "params": params,
        "rounds": FLAGS.rounds,
        "warmup_s": {k: round(v, 4) for k, v in warmup.items()},
        "median_s": {k: float(np.median(v)) for k, v in t.items()},
        "per_round_s": {k: [round(x, 4) for x in v] for k, v in per_round.items()},
        "orders": orders,
        "surgery/rebuild": {
            "median": float(np.median(ratio)),
            "min": float(ratio.min()),
            "max": float(ratio.max()),
            "per_round": [round(float(x), 4) for x in ratio],
            "target": 2.0,
        },
    }
    for num in ("analyze", "add_gates"):
        r = t[num] / t["rebuild"]
        result[f"{num}/rebuild"] = {"median": float(np.median(r)), "min": float(r.min()), "max": float(r.max())}
    if FLAGS.profile_top > 0:
        keras.backend.clear_session()
        result["profile_apply_plan"] = profile_surgery(model, plan, FLAGS.profile_top)
    os.makedirs(os.path.dirname(FLAGS.output), exist_ok=True)
    with open(FLAGS.output, "w") as f:
        json.dump(result, f, indent=1)
    shown = {k: v for k, v in result.items() if k != "profile_apply_plan"}
    print(json.dumps(shown, indent=1))
    if "profile_apply_plan" in result:
        print(result["profile_apply_plan"]["pstats_text"])
    s = result["surgery/rebuild"]
    print(
        f"surgery / rebuild = {s['median']:.2f}x (median of {FLAGS.rounds} interleaved rounds, "
        f"[{s['min']:.2f}–{s['max']:.2f}]); target ≤ {s['target']:.0f}x"
    )


if __name__ == "__main__":
    app.run(main)
