"""Latency per FLOP: does removing channels with keras_taylor buy latency in
proportion to the FLOPs it removes?

For each model (keras.applications ResNet50 and MobileNetV2, `weights=None`,
BN given trained-looking random statistics by `keras_taylor.testing.
lively_statistics`, 1000 classes) and each FLOPs target (default 0.7, 0.5,
0.3 of the original):

1. keras_taylor's own graph analysis (`kt.analyze`) lists the prunable
   channel groups; they are taken in one **random order** (seeded; no
   importance ranking: latency does not depend on which channels go), skipping
   any group that would leave a Conv/Dense with 0 channels. The shortest
   prefix of that order whose `kt.flops.CostModel` FLOPs are <= the target is
   removed (so targets are nested: the 30% model removes a superset of the
   50% model's groups), and `kt.apply_plan` (surgery) builds the physically
   smaller model. The FLOPs fraction actually reached is recomputed with
   `kt.profile` on the pruned model.
2. Latency, original and all pruned variants interleaved in the same rounds
   (shuffled order per round; median and min-max of per-round ratios
   pruned / original):
   - TF graph mode (`keras_taylor.latency.measure_latency`: the model called
     in a `tf.function`, training=False), batch 1 at `--size_b1` and batch
     `--batch` at `--size_batch`;
   - TFLite float32 (`keras_taylor.export.export_tflite`, then the
     interpreter with its default XNNPACK delegate, `--tflite_threads`
     threads), batch 1 at `--size_b1`.
   The calls per round are set so that the original runs about
   `--round_s_*` seconds per round (the same count for every variant).
3. Goal: latency ratio <= 1.10 x FLOPs ratio, checked per row on the median.
   To explain misses, the JSON holds, per model: the FLOPs share of layers
   that cannot shrink (neither input nor output channels prunable), that
   shrink only linearly (one side prunable, or depthwise), and that shrink
   quadratically (both sides prunable); the ratio of activation elements
   (sum of all layer outputs: the memory traffic of BN/ReLU/Add/pooling,
   which FLOPs do not count); the FLOPs ratio if every channel count were
   rounded up to a multiple of 16 (AVX-512 holds 16 float32 lanes); a
   `tf.profiler` op profile (time per op type, original vs `--profile`
   targets, both batch sizes); and, with `--align 16`, each target again
   with every layer's kept channels rounded to a multiple of 16
   (`keras_taylor.selection.align_to_target`, same ranking, FLOPs at or under the
   target), measured in the same rounds.

    python benchmarks/latency_per_flop.py                      # full run, ~20 min on 2 busy cores
    python benchmarks/latency_per_flop.py --models MobileNetV2 --quick
    python benchmarks/latency_per_flop.py --only_floor         # then: per-call overhead floor, merged (~3 min)

Writes benchmarks/results/latency_per_flop.json.
"""

from __future__ import annotations

import gc
import gzip
import json
import math
import os
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_taylor as kt  # noqa: E402
from keras_taylor import selection as kt_selection  # noqa: E402
from keras_taylor import export as kt_export  # noqa: E402
from keras_taylor.latency import measure_latency  # noqa: E402
from keras_taylor.testing import lively_statistics  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402

FLAGS = flags.FLAGS
AA = "original_copy"  # A/A control: the original model timed as a second variant


def define_flags():
    """The flags of this script (defined only when it runs, so that
    benchmarks/tfmot_contrast.py can import its functions)."""
    flags.DEFINE_list("models", ["ResNet50", "MobileNetV2"], "keras.applications constructors.")
    flags.DEFINE_list("targets", ["0.7", "0.5", "0.3"], "FLOPs fractions to prune to.")
    flags.DEFINE_integer("size_b1", 224, "Input height = width for batch 1 (TF and TFLite).")
    flags.DEFINE_integer("size_batch", 128, "Input height = width for the large batch.")
    flags.DEFINE_integer("batch", 32, "Large batch size (TF graph mode).")
    flags.DEFINE_integer("rounds_b1", 30, "Interleaved rounds, batch 1 (TF and TFLite).")
    flags.DEFINE_float("round_s_b1", 0.3, "Seconds the original model runs per round at batch 1; "
                       "sets the calls per round (1 to 50), the same for every variant.")
    flags.DEFINE_integer("rounds_batch", 15, "Interleaved rounds, large batch.")
    flags.DEFINE_float("round_s_batch", 1.0, "Seconds the original model runs per round at the large batch.")
    flags.DEFINE_integer("align", 16, "Also measure, per target, the same ranking with every layer's kept "
                         "channels rounded to this multiple (keras_taylor.selection.align_to_target); 0: off.")
    flags.DEFINE_bool("aa_control", True, f"Also time the original a second time as if it were a variant "
                      f"({AA!r}: its own tf.function / interpreter), to show the noise floor of a ratio.")
    flags.DEFINE_integer("floor_size", 32, "Input size of the per-call overhead floor (--only_floor).")
    flags.DEFINE_bool("only_floor", False, "Only measure the per-call overhead floor (each original at "
                      "--floor_size² vs --size_b1², batch 1, TF and TFLite) and merge it into --output "
                      "as 'overhead_floor'.")
    flags.DEFINE_list("profile", ["0.5"], "Targets whose TF graph-mode op times are profiled (tf.profiler) "
                      "against the original's, at both batch sizes (empty: none).")
    flags.DEFINE_integer("profile_reps", 3, "Interleaved profiling repetitions per model.")
    flags.DEFINE_integer("tflite_threads", 2, "Interpreter threads (the machine's cores).")
    flags.DEFINE_float("goal", 1.10, "Goal: latency ratio <= goal x FLOPs ratio.")
    _harness.define_common_flags(flags, "latency_per_flop.json", "Smoke run: 3 rounds, 2 calls, batch 8.")


# ---- models and pruning -------------------------------------------------------

def build(name: str, size: int, seed: int) -> keras.Model:
    """`keras.applications.<name>(weights=None)` at `size`², BN statistics made
    trained-looking (so activations neither vanish into denormals nor blow up)."""
    keras.utils.set_random_seed(seed)
    model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3))
    lively_statistics(model, seed)
    return model


def ordered_groups(graph: kt.ChannelGraph, seed: int) -> list:
    """All prunable groups in a random order, leaving out any group whose
    removal (after the ones before it) would leave a Conv/Dense with no channel."""
    rng = np.random.default_rng(seed)
    scores = np.empty(graph.num_groups)
    scores[rng.permutation(graph.num_groups)] = np.arange(graph.num_groups)
    return kt.selection.greedy_removal(graph, scores)[0]


def groups_for_target(graph, cost, order, target: float) -> tuple:
    """Shortest prefix of `order` with FLOPs <= target x original (bisection;
    FLOPs only fall as groups are removed)."""
    full = cost.evaluate(graph.alive_ids(()))[0]
    if cost.evaluate(graph.alive_ids(order))[0] > target * full:
        raise ValueError(f"Cannot reach {target} of the FLOPs without emptying a layer.")
    hi = kt.selection.shortest_prefix_within(graph, cost, order, target)
    return set(order[:hi]), cost.evaluate(graph.alive_ids(order[:hi]))[0] / full


def flops_classes(graph: kt.ChannelGraph, removed=()) -> dict:
    """FLOPs (MACs) split by how they shrink with channel pruning, and the FLOPs
    with every live channel count rounded up to a multiple of 16.

    - fixed: neither input nor output channels of the layer are prunable
      (e.g. a stem conv whose output is tied to the model input, a classifier
      on fixed features);
    - linear: exactly one side prunable (stem conv: 3 RGB inputs; classifier:
      1000 fixed classes), or a depthwise conv (cost ∝ channels);
    - quadratic: both sides prunable (cost ∝ c_in x c_out).
    """
    alive = graph.alive_ids(removed)
    prunable = graph.group_of_comp[graph.comp_of] >= 0
    out = {"fixed": 0.0, "linear": 0.0, "quadratic": 0.0, "depthwise": 0.0, "padded16": 0.0}
    ceil16 = lambda c: 16 * math.ceil(c / 16) if c else 0
    for node in graph.nodes:
        if node.handler is None:
            continue
        macs = node.handler.macs(node.inner, node.in_shapes, node.out_shapes)
        in_ids = node.in_maps[0] if node.in_maps else None
        out_ids = node.out_maps[0]
        cin = int(alive[in_ids].sum()) if in_ids is not None else 0
        cout = int(alive[out_ids].sum())
        f = macs.total(cin, cout)
        if f == 0:
            continue
        out["padded16"] += macs.total(ceil16(cin), ceil16(cout))
        pin = bool(in_ids is not None and prunable[in_ids].any())
        pout = bool(prunable[out_ids].any())
        if macs.a == 0:  # depthwise: cost ∝ channels
            out["depthwise"] += f
            out["linear" if pout else "fixed"] += f
        elif pin and pout:
            out["quadratic"] += f
        elif pin or pout:
            out["linear"] += f
        else:
            out["fixed"] += f
    return out


def activation_elements(model: keras.Model) -> int:
    """Sum over layers of output elements per sample: a proxy for the memory
    traffic of the element-wise layers (BN, ReLU, Add, padding, pooling)."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        outs = layer.output if isinstance(layer.output, (list, tuple)) else [layer.output]
        total += sum(math.prod(t.shape[1:]) for t in outs)
    return int(total)


def min_channels(model: keras.Model) -> int:
    return min(
        int(l.filters if hasattr(l, "filters") else l.units)
        for l in model.layers
        if isinstance(l, (keras.layers.Conv2D, keras.layers.Dense))
    )


def prune_variants(name: str, targets, sizes, seed: int, align_multiple: int = 0) -> dict:
    """`{"original": {size: model}, "p0.50": {size: model}, ...}` plus a record of each.

    The plans are made on the `sizes[0]` model and applied to a model of the same
    weights at every other size (weights do not depend on the input size). With
    `align_multiple` (e.g. 16), each target also gets a variant `p0.50a16`:
    the same random ranking, every layer's kept channels rounded to that
    multiple by `keras_taylor.selection.align_to_target` (at or under the target).
    """
    base = {s: build(name, s, seed) for s in sizes}
    weights = base[sizes[0]].get_weights()
    for s in sizes[1:]:
        base[s].set_weights(weights)
    graph = kt.analyze(base[sizes[0]])
    cost = kt.flops.CostModel(graph)
    order = ordered_groups(graph, seed)
    profile0 = {s: kt.profile(base[s]) for s in sizes}
    classes0 = flops_classes(graph)
    total0 = sum(classes0[k] for k in ("fixed", "linear", "quadratic"))
    info = {
        "constructor": f"keras.applications.{name}(weights=None, input_shape=(S, S, 3)), 1000 classes",
        "layers": len(base[sizes[0]].layers),
        "prunable_groups": graph.num_groups,
        "groups_removable_without_emptying_a_layer": len(order),
        "flops": {str(s): profile0[s].flops for s in sizes},
        "params": profile0[sizes[0]].params,
        "activation_elements": {str(s): activation_elements(base[s]) for s in sizes},
        "flops_share": {k: classes0[k] / total0 for k in ("fixed", "linear", "quadratic", "depthwise")},
        "variants": {},
    }
    # Scores for alignment: the random order is the ranking (removed first = lowest).
    scores = np.full(graph.num_groups, float(len(order)))
    scores[np.asarray(order, dtype=np.int64)] = np.arange(len(order), dtype=float)
    full = cost.evaluate(graph.alive_ids(()))[0]
    fraction = lambda rem: cost.evaluate(graph.alive_ids(rem))[0] / full
    models = {"original": base}
    for target in targets:
        removed, cm_ratio = groups_for_target(graph, cost, order, target)
        todo = [(f"p{target:.2f}", removed, None)]
        if align_multiple:
            aligned = kt_selection.align_to_target(graph, removed, scores, align_multiple, fraction, target)
            todo.append((f"p{target:.2f}a{align_multiple}", aligned, align_multiple))
        for key, rem, multiple in todo:
            plan = kt.PruningPlan.from_groups(graph, rem)
            models[key] = {}
            for s in sizes:
                g = graph if s == sizes[0] else kt.analyze(base[s])
                models[key][s] = kt.apply_plan(base[s], kt.PruningPlan.from_groups(g, plan.removed_groups(g)))
            p = {s: kt.profile(models[key][s]) for s in sizes}
            cls = flops_classes(graph, rem)
            report16 = kt_selection.alignment_report(graph, rem, 16)
            info["variants"][key] = {
                "target": target,
                "aligned_to": multiple,
                "removed_groups": len(rem),
                "removed_channels": plan.num_removed,
                "flops_ratio": {str(s): p[s].flops / profile0[s].flops for s in sizes},
                "flops_ratio_costmodel": fraction(rem),
                "params_ratio": p[sizes[0]].params / profile0[sizes[0]].params,
                "activation_ratio": {
                    str(s): activation_elements(models[key][s]) / info["activation_elements"][str(s)] for s in sizes
                },
                "flops_ratio_if_channels_padded_to_16": cls["padded16"] / classes0["padded16"],
                "flops_ratio_by_class": {
                    k: (cls[k] / classes0[k] if classes0[k] else None) for k in ("fixed", "linear", "quadratic", "depthwise")
                },
                "layers_with_kept_channels_multiple_of_16": f"{sum(r.aligned for r in report16)} of {len(report16)}",
                "min_channels": min_channels(models[key][sizes[0]]),
            }
            assert info["variants"][key]["min_channels"] >= 1
            print(f"{name} {key}: FLOPs {info['variants'][key]['flops_ratio']} params "
                  f"{info['variants'][key]['params_ratio']:.3f}, aligned to 16: "
                  f"{info['variants'][key]['layers_with_kept_channels_multiple_of_16']}", flush=True)
    return models, info


# ---- TFLite ---------------------------------------------------------------------

def tflite_interpreter(path: str, batch: int, threads: int):
    """The interpreter of `path` (ai_edge_litert's when installed, else
    tf.lite's; default delegates, i.e. XNNPACK) resized to `batch`."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = tf.lite.Interpreter
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*Interpreter is deprecated")
        interp = Interpreter(model_path=path, num_threads=threads)
    d = interp.get_input_details()[0]
    interp.resize_tensor_input(d["index"], [batch, *d["shape_signature"][1:]])
    interp.allocate_tensors()
    return interp


def measure_tflite(paths: dict, batch: int, rounds: int, calls: int | None, threads: int, seed: int,
                   warmup: int = 3, round_s: float = 0.3) -> dict:
    """Interleaved `invoke()` latency of TFLite files, as `measure_latency` does
    for Keras models (the same loop, `_harness.measure`): per round a shuffled
    order, `calls` invokes each; ratios against the first entry of `paths`.
    `calls=None`: as many as make the first model run about `round_s` seconds
    (1 to 50)."""
    rng = np.random.default_rng(seed)
    names = list(paths)
    interps = {n: tflite_interpreter(p, batch, threads) for n, p in paths.items()}
    shape = interps[names[0]].get_input_details()[0]["shape"]
    x = rng.uniform(0, 1, shape).astype("float32")
    for it in interps.values():
        it.set_tensor(it.get_input_details()[0]["index"], x)
    out = _harness.measure({n: it.invoke for n, it in interps.items()}, rounds, calls=calls, round_s=round_s,
                           seed=rng, warmup=warmup)
    del out["rounds"]
    return out


def tf_calls(model: keras.Model, batch: int, round_s: float, seed: int) -> int:
    """`calls_for` the model's `tf.function` forward at `batch`."""
    fn = tf.function(lambda x: model(x, training=False))
    x = tf.constant(np.random.default_rng(seed).uniform(0, 1, (batch, *model.inputs[0].shape[1:])).astype("float32"))
    fn(x).numpy()
    fn(x).numpy()
    return _harness.calls_for(lambda: fn(x).numpy(), round_s)


# ---- where the time goes: TF op profile ------------------------------------------

BOOKKEEPING = {"ReadVariableOp", "Identity", "Const", "NoOp", "_Arg", "_Retval", "Cast"}
ELEMENTWISE = {"AddV2", "Add", "Mul", "Sub", "Relu", "Relu6", "Rsqrt", "BiasAdd", "Sigmoid",
               "Maximum", "Minimum", "AddN", "RealDiv", "Square", "SquaredDifference"}


def op_category(op_type: str) -> str:
    if "Depthwise" in op_type:
        return "depthwise_conv"
    if "Conv2D" in op_type:
        return "conv"
    if "MatMul" in op_type:
        return "dense"
    if op_type in ELEMENTWISE:
        return "elementwise (BN, ReLU, Add)"
    if op_type in BOOKKEEPING:
        return "bookkeeping"
    return "other (pad, pool, mean, softmax)"


def op_profile(model: keras.Model, batch: int, calls: int, seed: int) -> dict:
    """Runs the model's `tf.function` forward `calls` times under
    `tf.profiler` and sums the TF op durations recorded on the executor's
    compute threads, per op type and category, per call. Ops on the two
    threads can overlap, and the profiler adds its own overhead, so the sum
    and the wall time are both only indicative; their shares and ratios are
    what is compared."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    fn = tf.function(lambda x: model(x, training=False))
    x = tf.constant(np.random.default_rng(seed).uniform(0, 1, (batch, *model.inputs[0].shape[1:])).astype("float32"))
    fn(x).numpy()
    fn(x).numpy()
    logdir = tempfile.mkdtemp(prefix="op_profile_")
    tf.profiler.experimental.start(logdir)
    start = time.perf_counter()
    for _ in range(calls):
        fn(x).numpy()
    wall = (time.perf_counter() - start) / calls
    tf.profiler.experimental.stop()
    import glob
    import shutil

    path = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True))[-1]
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    shutil.rmtree(logdir, ignore_errors=True)
    by_type, count = {}, {}
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for ev in line.events:
                name = plane.event_metadata[ev.metadata_id].name
                if ":" not in name or "::" in name:
                    continue
                t = name.rsplit(":", 1)[1]
                by_type[t] = by_type.get(t, 0.0) + ev.duration_ps / 1e9 / calls  # ms per call
                count[t] = count.get(t, 0) + 1
    cats = {}
    for t, ms in by_type.items():
        c = op_category(t)
        cats[c] = cats.get(c, 0.0) + ms
    return {
        "wall_ms_per_call": wall * 1e3,
        "op_ms_per_call": sum(by_type.values()),
        "category_ms_per_call": cats,
        "op_type_ms_per_call": dict(sorted(by_type.items(), key=lambda kv: -kv[1])),
        "ops_per_call": {t: c / calls for t, c in count.items()},
    }


def profile_pair(models: dict, batch: int, reps: int, round_s: float, seed: int) -> dict:
    """`op_profile` of each model, interleaved over `reps` repetitions; the
    median per model and the median of per-repetition ratios against the first."""
    names = list(models)
    calls = tf_calls(models[names[0]], batch, round_s, seed)
    runs = _harness.in_rounds(names, reps, lambda n: op_profile(models[n], batch, calls, seed), seed=seed)
    out = {"calls": calls, "reps": reps, "models": {}}
    ref = runs[names[0]]
    for n in names:
        r = runs[n]
        cats = sorted({c for p in r + ref for c in p["category_ms_per_call"]})
        med = lambda key: float(np.median([p[key] for p in r]))
        cat_ms = {c: float(np.median([p["category_ms_per_call"].get(c, 0.0) for p in r])) for c in cats}
        entry = {
            "wall_ms_per_call": med("wall_ms_per_call"),
            "op_ms_per_call": med("op_ms_per_call"),
            "category_ms_per_call": cat_ms,
            "category_share_of_op_time": {c: v / med("op_ms_per_call") for c, v in cat_ms.items()},
            "op_type_ms_per_call_first_rep": {k: round(v, 4) for k, v in list(r[0]["op_type_ms_per_call"].items())[:25]},
            "ops_per_call": r[0]["ops_per_call"],
        }
        if n != names[0]:
            ratio = lambda f: float(np.median([f(p) / f(q) for p, q in zip(r, ref) if f(q) > 0]))
            entry["ratio_wall"] = ratio(lambda p: p["wall_ms_per_call"])
            entry["ratio_op_time"] = ratio(lambda p: p["op_ms_per_call"])
            entry["ratio_by_category"] = {
                c: ratio(lambda p, c=c: p["category_ms_per_call"].get(c, 0.0)) for c in cats
                if all(q["category_ms_per_call"].get(c, 0.0) > 0 for q in ref)
            }
        out["models"][n] = entry
    return out


def file_sizes(path: str) -> dict:
    """Raw and gzip (level 9) size of a file or of every file under a directory."""
    files = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    raw = sum(os.path.getsize(f) for f in files)
    gz = 0
    for f in files:
        with open(f, "rb") as fh:
            gz += len(gzip.compress(fh.read(), compresslevel=9))
    return {"raw_bytes": raw, "gzip_bytes": gz}


def export_all(models: dict, size: int, directory: str, seed: int) -> dict:
    """Writes each `models[key][size]` as float32 TFLite (checked against Keras
    on 2 inputs) and returns `{key: path}` plus the check results."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (2, size, size, 3)).astype("float32")
    paths, checks = {}, {}
    for key, by_size in models.items():
        path = os.path.join(directory, f"{key}_{size}.tflite")
        start = time.time()
        info = kt_export.export_tflite(by_size[size], path, check_inputs=x)
        paths[key] = path
        checks[key] = {
            "max_abs_diff": info["max_abs_diff"], "max_abs_output": info["max_abs_output"],
            "runtime": info["runtime"], "convert_s": round(time.time() - start, 1), **file_sizes(path),
        }
        print(f"  tflite {key}: {checks[key]}", flush=True)
    return paths, checks


# ---- reporting ----------------------------------------------------------------

def machine() -> dict:
    return _harness.machine()


def load() -> list:
    return _harness.load()


def fit_fixed_share(rows: list) -> dict:
    """Least-squares fit, over one model's pruned variants on one backend, of
    latency ratio = a x FLOPs ratio + (1 - a): `1 - a` is the share of the
    original's time that did not shrink at all as FLOPs fell (a crude
    one-parameter model; the op profile is the direct measurement)."""
    f = np.array([r["flops_ratio"] for r in rows])
    l = np.array([r["latency_ratio"] for r in rows])
    d = f - 1.0
    a = float(np.dot(d, l - 1.0) / np.dot(d, d))
    resid = l - (a * f + (1 - a))
    return {"share_scaling_with_flops": a, "share_not_shrinking": 1 - a, "rms_residual": float(np.sqrt(np.mean(resid**2)))}


def overhead_floor(name: str, seed: int, tmp: str) -> dict:
    """Batch-1 time of the original at --floor_size² against --size_b1², in
    alternating rounds, in TF graph mode and TFLite. The same ops run at both
    sizes and the small input has (floor/size)² of the FLOPs, so the small
    time bounds from above the per-call cost that does not shrink with
    channels (op dispatch, executor, interpreter overhead)."""
    small, big = FLAGS.floor_size, FLAGS.size_b1
    models = {s: build(name, s, seed) for s in (big, small)}
    flops = {s: kt.profile(m).flops for s, m in models.items()}
    rng = np.random.default_rng(seed)
    out = {"sizes": [big, small], "flops": {str(s): f for s, f in flops.items()}, "load_before": load()}
    # TF graph mode
    fns, xs = {}, {}
    for s, m in models.items():
        fns[s] = tf.function(lambda x, m=m: m(x, training=False))
        xs[s] = tf.constant(rng.uniform(0, 1, (1, s, s, 3)).astype("float32"))
        for _ in range(3):
            fns[s](xs[s]).numpy()
    runs = {s: (lambda s=s: fns[s](xs[s]).numpy()) for s in models}
    out["tf_graph_b1"] = _alternate(runs, FLAGS.rounds_b1, FLAGS.round_s_b1, big)
    # TFLite
    paths = {}
    for s, m in models.items():
        paths[s] = os.path.join(tmp, f"floor_{name}_{s}.tflite")
        kt_export.export_tflite(m, paths[s])
    its = {s: tflite_interpreter(p, 1, FLAGS.tflite_threads) for s, p in paths.items()}
    for s, it in its.items():
        it.set_tensor(it.get_input_details()[0]["index"], rng.uniform(0, 1, (1, s, s, 3)).astype("float32"))
        for _ in range(3):
            it.invoke()
    out["tflite_b1"] = _alternate({s: it.invoke for s, it in its.items()}, FLAGS.rounds_b1, FLAGS.round_s_b1, big)
    for key in ("tf_graph_b1", "tflite_b1"):
        r = out[key]
        print(f"{name} {key}: {big}² {r[str(big)]['median_ms']:.2f} ms, {small}² {r[str(small)]['median_ms']:.2f} ms, "
              f"ratio {r['ratio_median']:.3f} [{r['ratio_min']:.2f}-{r['ratio_max']:.2f}] (FLOPs ratio {flops[small] / flops[big]:.4f})", flush=True)
    out["load_after"] = load()
    return out


def _alternate(runs: dict, rounds: int, round_s: float, reference) -> dict:
    """Interleaved rounds (shuffled order) of two zero-argument runs; the same
    number of calls each, set by the reference's time."""
    res = _harness.measure(runs, rounds, round_s=round_s, reference=reference, warmup=0)
    other = [n for n in runs if n != reference][0]
    return {
        **{str(n): {k: res[n][k] for k in ("median_ms", "min_ms", "max_ms")} for n in runs},
        **{k: res[other][k] for k in ("ratio_median", "ratio_min", "ratio_max")},
        "calls_per_round": res["calls_per_round"], "rounds": rounds,
    }


def quiet_logs():
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    tf.get_logger().setLevel("ERROR")


def main(argv):
    del argv
    quiet_logs()
    wall0 = time.time()
    if FLAGS.quick:
        FLAGS.rounds_b1, FLAGS.rounds_batch, FLAGS.batch, FLAGS.profile_reps = 3, 3, 8, 1
        FLAGS.round_s_b1, FLAGS.round_s_batch = 0.05, 0.1
    if FLAGS.only_floor:
        with open(FLAGS.output) as f:
            result = json.load(f)
        tmp = tempfile.mkdtemp(prefix="latency_floor_")
        floor = {
            "command": " ".join(["python", "benchmarks/latency_per_flop.py"] + sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "what": f"batch-1 time of each original at {FLAGS.floor_size}x{FLAGS.floor_size} vs {FLAGS.size_b1}x{FLAGS.size_b1} "
                    "(same ops, ~2% of the FLOPs): an upper bound of the per-call cost that pruning cannot remove",
        }
        for name in FLAGS.models:
            floor[name] = overhead_floor(name, FLAGS.seed, tmp)
            keras.backend.clear_session()
        floor["wall_s"] = round(time.time() - wall0, 1)
        result["overhead_floor"] = floor
        with open(FLAGS.output, "w") as f:
            json.dump(result, f, indent=1)
        print(f"merged overhead_floor into {FLAGS.output} ({floor['wall_s']} s)")
        return
    targets = [float(t) for t in FLAGS.targets]
    sizes = [FLAGS.size_b1] if FLAGS.size_batch == FLAGS.size_b1 else [FLAGS.size_b1, FLAGS.size_batch]
    cmd = " ".join(["python", "benchmarks/latency_per_flop.py"] + sys.argv[1:])
    result = {
        "command": cmd,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        **machine(),
        "load_average_1_5_15min": {"start": load()},
        "selection": "random order of keras_taylor channel groups (seeded), shortest prefix reaching the FLOPs target; no layer emptied",
        "settings": {
            "size_b1": FLAGS.size_b1, "size_batch": FLAGS.size_batch, "batch": FLAGS.batch,
            "rounds_b1": FLAGS.rounds_b1, "round_s_b1": FLAGS.round_s_b1,
            "rounds_batch": FLAGS.rounds_batch, "round_s_batch": FLAGS.round_s_batch,
            "tflite_threads": FLAGS.tflite_threads, "goal": FLAGS.goal, "seed": FLAGS.seed,
            "profile": FLAGS.profile, "profile_reps": FLAGS.profile_reps, "align": FLAGS.align,
            "aa_control": FLAGS.aa_control,
            "tf_threads": {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                           "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
                           "note": "0 = TensorFlow's default (all cores)"},
        },
        "models": {},
        "rows": [],
    }
    tmp = tempfile.mkdtemp(prefix="latency_per_flop_")
    show = lambda r: ", ".join(f"{k} {v['median_ms']:.1f}ms x{v['ratio_median']:.3f}" for k, v in r.items() if isinstance(v, dict))
    for name in FLAGS.models:
        t0 = time.time()
        models, info = prune_variants(name, targets, sizes, FLAGS.seed, FLAGS.align)
        info["prune_s"] = round(time.time() - t0, 1)
        keys = list(models)
        for key, batch, size, round_s, rounds in (
            ("tf_b1", 1, FLAGS.size_b1, FLAGS.round_s_b1, FLAGS.rounds_b1),
            ("tf_batch", FLAGS.batch, FLAGS.size_batch, FLAGS.round_s_batch, FLAGS.rounds_batch),
        ):
            info[f"load_before_{key}"] = load()
            t0 = time.time()
            calls = tf_calls(models["original"][size], batch, round_s, FLAGS.seed)
            info[key] = measure_latency(
                {**{k: models[k][size] for k in keys}, **({AA: models["original"][size]} if FLAGS.aa_control else {})},
                batch_size=batch,
                rounds=rounds, calls_per_round=calls, warmup=3 if batch == 1 else 2, seed=FLAGS.seed,
            )
            info[key]["calls_per_round"] = calls
            info[f"{key}_s"] = round(time.time() - t0, 1)
            print(f"{name} {key} ({calls} calls/round): {show(info[key])}", flush=True)
        # Where the time goes (TF graph mode), original vs the profiled targets.
        info["op_profile"] = {}
        for t in FLAGS.profile:
            v = f"p{float(t):.2f}"
            if v not in models:
                continue
            for key, batch, size, round_s in (("b1", 1, FLAGS.size_b1, FLAGS.round_s_b1),
                                              (f"b{FLAGS.batch}", FLAGS.batch, FLAGS.size_batch, FLAGS.round_s_batch)):
                t0 = time.time()
                prof = profile_pair({"original": models["original"][size], v: models[v][size]}, batch,
                                    FLAGS.profile_reps, round_s, FLAGS.seed)
                prof["seconds"] = round(time.time() - t0, 1)
                info["op_profile"][f"{v}_{key}"] = prof
                pm = prof["models"][v]
                print(f"{name} op profile {v} {key}: wall x{pm['ratio_wall']:.3f}, op time x{pm['ratio_op_time']:.3f}, "
                      + ", ".join(f"{c} x{r:.2f}" for c, r in pm["ratio_by_category"].items()), flush=True)
        # TFLite, batch 1
        t0 = time.time()
        paths, info["tflite_files"] = export_all(models, FLAGS.size_b1, tmp, FLAGS.seed)
        info["tflite_export_s"] = round(time.time() - t0, 1)
        info["load_before_tflite_b1"] = load()
        t0 = time.time()
        if FLAGS.aa_control:
            paths[AA] = paths["original"]  # a second interpreter on the same file
        info["tflite_b1"] = measure_tflite(paths, 1, FLAGS.rounds_b1, None, FLAGS.tflite_threads, FLAGS.seed,
                                           round_s=FLAGS.round_s_b1)
        info["tflite_b1_s"] = round(time.time() - t0, 1)
        print(f"{name} TFLite b1 ({info['tflite_b1']['calls_per_round']} calls/round): {show(info['tflite_b1'])}", flush=True)
        # Rows and the goal check.
        model_rows = []
        for backend, key, batch, size in (
            ("tf_graph", "tf_b1", 1, FLAGS.size_b1),
            ("tf_graph", "tf_batch", FLAGS.batch, FLAGS.size_batch),
            ("tflite_xnnpack", "tflite_b1", 1, FLAGS.size_b1),
        ):
            for v in keys[1:]:
                lat = info[key][v]
                var = info["variants"][v]
                fr = var["flops_ratio"][str(size)]
                row = {
                    "model": name, "variant": v, "aligned_to": var["aligned_to"], "backend": backend, "batch": batch, "input": size,
                    "flops_ratio": fr, "flops_ratio_padded16": var["flops_ratio_if_channels_padded_to_16"],
                    "activation_ratio": var["activation_ratio"][str(size)],
                    "latency_ratio": lat["ratio_median"], "latency_ratio_min": lat["ratio_min"], "latency_ratio_max": lat["ratio_max"],
                    "original_ms": info[key]["original"]["median_ms"], "pruned_ms": lat["median_ms"],
                    "latency_per_flop": lat["ratio_median"] / fr,
                }
                row["goal_met"] = bool(row["latency_per_flop"] <= FLAGS.goal)
                model_rows.append(row)
        if FLAGS.aa_control:
            info["aa_control"] = {
                key: {k: info[key][AA][k] for k in ("ratio_median", "ratio_min", "ratio_max")}
                for key in ("tf_b1", "tf_batch", "tflite_b1")
            }
            print(f"{name} A/A control (original ÷ original): " + ", ".join(
                f"{k} {v['ratio_median']:.3f} [{v['ratio_min']:.2f}-{v['ratio_max']:.2f}]" for k, v in info["aa_control"].items()), flush=True)
        info["fit_fixed_share"] = {}
        for backend, batch in (("tf_graph", 1), ("tf_graph", FLAGS.batch), ("tflite_xnnpack", 1)):
            sel = [r for r in model_rows if r["backend"] == backend and r["batch"] == batch and not r["aligned_to"]]
            info["fit_fixed_share"][f"{backend}_b{batch}"] = fit_fixed_share(sel)
        result["rows"] += model_rows
        result["models"][name] = info
        del models
        keras.backend.clear_session()
        gc.collect()
        with open(FLAGS.output + ".partial", "w") as f:  # survive a crash in the next model
            json.dump(result, f, indent=1)
    result["load_average_1_5_15min"]["end"] = load()
    result["wall_s"] = round(time.time() - wall0, 1)
    os.makedirs(os.path.dirname(FLAGS.output), exist_ok=True)
    with open(FLAGS.output, "w") as f:
        json.dump(result, f, indent=1)
    if os.path.exists(FLAGS.output + ".partial"):
        os.remove(FLAGS.output + ".partial")
    print(f"\n{'model':12s} {'variant':9s} {'backend':15s} {'batch':>5s} {'FLOPs':>6s} {'pad16':>6s} {'act':>6s} {'latency [min-max]':>22s} {'lat/FLOP':>8s} goal")
    for r in result["rows"]:
        print(f"{r['model']:12s} {r['variant']:9s} {r['backend']:15s} {r['batch']:5d} {r['flops_ratio']:6.3f} {r['flops_ratio_padded16']:6.3f} "
              f"{r['activation_ratio']:6.3f} {r['latency_ratio']:6.3f} [{r['latency_ratio_min']:.2f}-{r['latency_ratio_max']:.2f}] "
              f"{r['latency_per_flop']:8.3f} {'met' if r['goal_met'] else 'NOT met'}")
    print(f"wall {result['wall_s']} s; load {result['load_average_1_5_15min']}; wrote {FLAGS.output}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
