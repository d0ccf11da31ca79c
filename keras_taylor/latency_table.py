"""Latency lookup tables measured on the runtime the user deploys to.

HALP (Shen, Molchanov et al., "Structural Pruning via Latency-Saliency
Knapsack", NeurIPS 2022; NVlabs/HALP `prune/cost.py:CostCalculator`) keys a
table by `(batch, c_in, c_out, fmap, kernel, stride, groups)` and charges the
i-th channel of a layer the increment `LUT(c_in, k) − LUT(c_in, k−1)`. They
ship one table (ResNet-50, TITAN V) and no script to build one. This module
builds such a table for any Keras model on `"tf"` (graph-mode `tf.function`),
`"tflite"` (LiteRT interpreter, XNNPACK, float32) or `"onnxruntime"` (CPU).

What is measured, per channel-creating layer (Conv1D/2D/3D, grouped convs,
Dense, SeparableConv, ConvTranspose), at its real input shape and batch size:

- a *segment*: the layer followed by the chain of channel-wise layers that
  ride on its output (BatchNormalization, activations, DepthwiseConv — so
  MobileNet's depthwise work is charged to the expansion conv whose channels
  it carries —, padding, pooling, dropout), as long as each has one input
  and is the only consumer of the previous one;
- two curves: latency against kept output channels at full input width,
  `A(cout)`, and against kept input channels at full output width, `B(cin)`
  (skipped when that side can never be pruned, e.g. the first conv's RGB
  input or the classifier's outputs). The table predicts
  `T(cin, cout) = A(cout) · B(cin) / B(full)` — bilinear work scales with
  both, alignment steps show up in both. Riding work that depends only on
  `cout` is scaled by the `cin` ratio too: a known simplification.
- widths are sampled sparsely at multiples of `step` (default 8): `step`,
  `2·step` and `full × {1/8, 1/4, …, 7/8}` rounded to a multiple, plus the
  full width. A width between samples is first rounded *up* to a multiple
  of `step` (the lanes a CPU/GPU kernel works in), then interpolated
  linearly between samples — so the curve is a staircase that never smooths
  across an alignment step.
- every time has the per-call overhead of the runtime (measured on a model
  with one tiny op) subtracted; a fixed per-model cost is the measured whole
  model minus the sum of its segments at full width (the Add/Concatenate/
  pooling work outside segments, call overhead, fusion effects), so the
  prediction is exact for the unpruned model and the sum of the parts
  predicts a pruned one.

Timing follows `keras_taylor.latency`: all sample models of a segment are
timed in interleaved rounds in a random order, and the minimum of the
per-round means is kept: on a shared machine every slower round is a round in
which something else held the core (on this project's 2-core box at load 9–11
the 25th percentile still came out ~5× above an uncontended run), so the
minimum is the estimate of the uncontended latency (as `timeit` advises).

Tables are cached as JSON (`~/.cache/keras_taylor/latency/` or `cache_dir`)
under a key of the segment's layer configs (names left out), input shape,
batch size, runtime, device and library versions, so a second `measure` of
the same model (or of one that shares layer signatures, like the repeated
blocks of a ResNet) measures nothing again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
import warnings

import keras
import numpy as np

from keras_taylor import graph as graph_lib
from keras_taylor import handlers as handlers_lib
from keras_taylor import latency as latency_lib

RUNTIMES = ("tf", "tflite", "onnxruntime")
_FRACTIONS = (1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8)
FORMAT = "keras_taylor.latency_table/1"
WHOLE_MODEL_BLOCK_MS = 25.0  # timing block of whole models (calibration, plan_for_latency)
REFERENCE = "dense"  # whole-model timings are paired to the model of this name (`_runtime_timer`)
WHOLE_MODEL_STAT = "paired-median"  # part of the calibration's cache key: changes with the statistic

L = keras.layers
# Channel-wise layers timed with the layer whose output they ride on.
_RIDERS = (
    L.BatchNormalization, L.Activation, L.ReLU, L.LeakyReLU, L.ELU, L.PReLU,
    L.DepthwiseConv1D, L.DepthwiseConv2D,
) + handlers_lib.CHANNELWISE_LAYERS


def sample_widths(full: int, step: int = 8, multiple_of: int = 1, fractions=_FRACTIONS) -> list:
    """The widths a curve is measured at (see the module docstring)."""
    full = int(full)
    unit = step * multiple_of // math.gcd(step, multiple_of)
    out = {full}
    for w in [step, 2 * step] + [full * f for f in fractions]:
        w = int(math.ceil(w / unit) * unit)
        if 0 < w < full:
            out.add(w)
    if multiple_of > 1:
        out = {w for w in out if w % multiple_of == 0 or w == full}
    return sorted(out)


def _interp(widths, times, w, step, full) -> np.ndarray:
    """The staircase: round up to `step` (but never past `full`), then interpolate."""
    w = np.asarray(w, dtype=np.float64)
    up = np.where(w >= full, full, np.minimum(np.ceil(w / step) * step, full))
    return np.where(w <= 0, 0.0, np.interp(up, widths, times))


# ---- segments -------------------------------------------------------------------
def _config(layer) -> dict:
    cfg = dict(layer.get_config())
    cfg.pop("name", None)
    cfg.pop("trainable", None)
    return cfg


def _structure_json(model: keras.Model) -> str:
    """The model's config as JSON with its own name dropped and every layer
    name replaced by the layer's position (`"#3"`), so that the same
    architecture built twice (`input_layer` vs `input_layer_1`, `functional`
    vs `functional_2`: names Keras numbers per process) has one cache key."""
    names = {layer.name: f"#{i}" for i, layer in enumerate(model.layers)}

    def canon(o):
        if isinstance(o, dict):
            return {k: canon(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [canon(v) for v in o]
        return names.get(o, o) if isinstance(o, str) else o

    cfg = dict(model.get_config())
    cfg.pop("name", None)
    return json.dumps(canon(cfg), sort_keys=True, default=str)


def _segments(graph: graph_lib.ChannelGraph) -> list:
    """`[(node, [rider nodes])]` for the first call of every creating layer."""
    consumers: dict = {}
    for n in graph.nodes:
        for k in n.in_keys:
            consumers.setdefault(k, []).append(n)
    out, seen = [], set()
    for n in graph.nodes:
        if n.handler is None or not n.handler.creates_channels or n.name in seen:
            continue
        seen.add(n.name)
        chain, cur = [], n
        while len(cur.out_keys) == 1:
            nxt = consumers.get(cur.out_keys[0], [])
            if len(nxt) != 1 or len(nxt[0].in_keys) != 1 or not isinstance(nxt[0].inner, _RIDERS):
                break
            cur = nxt[0]
            chain.append(cur)
        out.append((n, chain))
    return out


def _residual_terms(graph: graph_lib.ChannelGraph) -> list:
    """`[(layer name, channel ids, Melements per channel)]`: every tensor read
    or written by a layer call that is neither a channel-creating layer nor a
    rider of a segment (Add, Multiply, Concatenate, pooling or padding after a
    merge, reshapes…) — the work the segments do not time."""
    inside = set()
    for node, chain in _segments(graph):
        inside.add(id(node))
        inside.update(id(c) for c in chain)
    out = []
    for n in graph.nodes:
        if id(n) in inside or (n.handler is not None and n.handler.creates_channels):
            continue
        for maps, shapes in ((n.in_maps, n.in_shapes), (n.out_maps, n.out_shapes)):
            for ids, shape in zip(maps, shapes):
                if ids is None or len(shape) < 2:
                    continue
                per_channel = float(np.prod([d or 1 for d in shape[1:-1]])) if len(shape) > 2 else 1.0
                out.append((n.name, np.asarray(ids), per_channel / 1e6))
    return out


def _real_shape(canonical, axis) -> list:
    shape = list(canonical)
    if axis is None or axis == len(shape) - 1:
        return shape
    c = shape.pop()
    shape.insert(axis, c)
    return shape


class _Segment:
    def __init__(self, node, chain, graph):
        self.node, self.chain = node, chain
        layer = node.inner
        self.name = node.name
        self.in_shape = _real_shape(node.in_shapes[0], node.in_axes[0])
        self.in_axis = node.in_axes[0] if node.in_axes[0] is not None else len(self.in_shape) - 1
        self.cin_full = int(node.in_shapes[0][-1])
        self.cout_full = int(node.out_shapes[0][-1])
        groups = int(getattr(layer, "groups", 1) or 1)
        self.depthwise_form = groups > 1 and groups == self.cin_full == getattr(layer, "filters", None)
        self.groups = 1 if self.depthwise_form else groups
        of = graph.group_of_comp
        self.out_prunable = bool((of[graph.comp_of[node.out_maps[0]]] >= 0).any())
        self.in_prunable = (
            not self.depthwise_form and bool((of[graph.comp_of[node.in_maps[0]]] >= 0).any())
        )
        self.layers = [layer] + [c.inner for c in chain]

    def signature(self, batch_size) -> str:
        parts = [[type(l).__name__, _config(l)] for l in self.layers]
        return json.dumps([parts, self.in_shape[1:], batch_size], sort_keys=True, default=str)

    def build(self, cin: int, cout: int, batch_size: int) -> keras.Model:
        """The segment as a model with `cin` input and `cout` output channels."""
        shape = list(self.in_shape[1:])
        ax = self.in_axis - 1
        shape[ax] = cout if self.depthwise_form else cin
        x = inp = keras.Input(tuple(shape), batch_size=batch_size)
        for i, layer in enumerate(self.layers):
            cfg = _config(layer)
            if i == 0:
                key = "units" if "units" in cfg else "filters"
                cfg[key] = int(cout)
                if self.depthwise_form:
                    cfg["groups"] = int(cout)
            x = type(layer).from_config(cfg)(x)
        return keras.Model(inp, x)


# ---- runtimes ------------------------------------------------------------------------
def _device(runtime) -> str:
    import tensorflow as tf

    cpu = platform.processor() or platform.machine()
    if runtime == "tf":
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            return "GPU:" + ",".join(tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus)
    return f"CPU:{cpu}:{os.cpu_count()}"


def _versions(runtime) -> str:
    import tensorflow as tf

    v = f"tf {tf.__version__}, keras {keras.__version__}"
    if runtime == "tf":
        v += f", intra-op threads {tf.config.threading.get_intra_op_parallelism_threads()}"
    if runtime == "tflite":
        try:
            from importlib import metadata

            v += f", ai_edge_litert {metadata.version('ai-edge-litert')}"
        except Exception:  # noqa: BLE001 - tf.lite is used then
            pass
    if runtime == "onnxruntime":
        import onnxruntime

        v += f", onnxruntime {onnxruntime.__version__}"
    return v


def _runner(model: keras.Model, runtime: str, batch_size: int, rng, threads: int | None = None):
    """A no-argument callable that runs `model` once on a fixed random batch
    (`threads`: the tflite/onnxruntime thread count; None: the runtime's default)."""
    import tensorflow as tf

    shape = (batch_size, *model.inputs[0].shape[1:])
    x = rng.uniform(0, 1, shape).astype("float32")
    spec = tf.TensorSpec(shape, tf.float32)
    fn = tf.function(lambda t: model(t, training=False), input_signature=[spec])
    if runtime == "tf":
        xt = tf.constant(x)
        return lambda: fn(xt).numpy()
    if runtime == "tflite":
        from keras_taylor.export.tflite import _tflite_interpreter

        conv = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], model)
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        flatbuffer = conv.convert()
        if threads is None:
            interp, _ = _tflite_interpreter(flatbuffer)
        else:
            try:
                from ai_edge_litert import interpreter as litert
            except ImportError:
                litert = tf.lite
            interp = litert.Interpreter(model_content=flatbuffer, num_threads=int(threads))
        interp.allocate_tensors()
        i, o = interp.get_input_details()[0]["index"], interp.get_output_details()[0]["index"]

        def run():
            interp.set_tensor(i, x)
            interp.invoke()
            return interp.get_tensor(o)

        return run
    if runtime == "onnxruntime":
        from keras_taylor.export.onnx import _import_onnx_converter, _import_onnxruntime, _tf2onnx_convert

        tf2onnx, _ = _import_onnx_converter()
        ort = _import_onnxruntime()
        serve = tf.function(lambda t: {"output": model(t, training=False)}, input_signature=[tf.TensorSpec(shape, tf.float32, name="x")])
        proto = _tf2onnx_convert(tf2onnx, serve, ["x"], 17, None)
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
        sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return lambda: sess.run(None, {"x": x})
    raise ValueError(f"Expected runtime in {RUNTIMES}. Received: runtime={runtime!r}")


# ---- the table --------------------------------------------------------------------------
class LatencyTable:
    """Per-layer latency curves of one model on one runtime, plus a fixed cost.

    Build with `LatencyTable.measure(model, runtime=...)`; use as the `cost`
    of `keras_taylor.selection.knapsack_removal`, as
    `TaylorPruning(metric="latency", latency=table)`, or in
    `keras_taylor.profile(model, latency=table)`. `predict(model)` gives the
    predicted latency (ms) of the model or of any pruned version of it (layers
    are matched by name).

    Attributes:
        runtime, batch_size, device, versions: what it was measured on.
        layers: `{layer name: entry}`, an entry holding `cin_full`,
            `cout_full`, `step`, `out_widths`/`out_ms` (A(cout)) and
            `in_widths`/`in_ms` (B(cin), empty when the input is never pruned).
        fixed_ms: the per-model cost outside the layers' curves (without a
            calibration: measured dense model − Σ segments at full width).
        full_ms: the measured latency of the unpruned model.
        calibration: `None`, or the whole-model calibration (see
            `calibrate`): `{"coef": [a0, a1, a2], "points": [...]}` — the
            prediction is then `a0 + a1·Σ segments + a2·Σ residual Melements`.
        threads: the tflite/onnxruntime thread count it was measured with
            (None: the runtime's default); `plan_for_latency` times with it.
    """

    def __init__(self, layers, fixed_ms, full_ms, runtime, batch_size, device, versions, model_name="", calibration=None, threads=None):
        self.calibration = calibration
        self.threads = threads
        self.layers = dict(layers)
        self.fixed_ms = float(fixed_ms)
        self.full_ms = float(full_ms)
        self.runtime = runtime
        self.batch_size = int(batch_size)
        self.device = device
        self.versions = versions
        self.model_name = model_name

    # ---- building -----------------------------------------------------------------
    @classmethod
    def measure(
        cls,
        model: keras.Model,
        runtime: str = "tf",
        batch_size: int = 1,
        *,
        step: int = 8,
        rounds: int = 7,
        fractions=_FRACTIONS,
        threads: int | None = None,
        cache_dir: str | None = None,
        verbose: int = 1,
        seed: int = 0,
        calibrate: int = 8,
        calibration_rounds: int | None = None,
    ) -> "LatencyTable":
        """Measures the table of `model` on `runtime` (see the module docstring).

        Args:
            model: a built Functional or Sequential model (gated or not:
                gates are looked through).
            runtime: `"tf"`, `"tflite"` or `"onnxruntime"`.
            batch_size: batch size the latency is for. Defaults to `1`.
            step: the alignment step widths are sampled and rounded at.
            rounds: interleaved timing rounds per segment.
            fractions: fractions of the full width sampled (rounded up to a
                multiple of `step`; `step`, `2·step` and full are always
                sampled). Defaults to eighths 1/8 … 7/8; fewer build faster.
            threads: thread count for `"tflite"`/`"onnxruntime"` (the
                deployment's; on a loaded machine 1 is far steadier). Defaults
                to the runtime's default. Ignored by `"tf"` (set its pools with
                `tf.config.threading` before TF starts; their size is part of
                the cache key).
            cache_dir: where the JSON cache lives. Defaults to
                `$KERAS_TAYLOR_CACHE` or `~/.cache/keras_taylor/latency`.
            verbose: 1 shows a `keras.utils.Progbar`, 0 nothing.
            seed: seed for inputs and round orders.
            calibrate: number of random prunings of `model` measured whole to
                calibrate the table (`LatencyTable.calibrate`); `0` keeps the
                uncalibrated table (fixed cost = dense − Σ segments). Each costs
                one conversion and timing of a pruned model on `runtime`; the
                prunings are drawn from `seed` and cached with the table.
                Defaults to `8`.
            calibration_rounds: interleaved rounds of the whole-model timing
                of the calibration. Defaults to `3 · rounds` (few models, so
                more rounds are cheap, and the minimum over more rounds is
                steadier on a loaded machine).

        Raises:
            ValueError: for an unknown runtime, a bad batch size/step/rounds,
                or a model the analysis cannot read.
            ImportError: for `"onnxruntime"` without tf2onnx/onnxruntime.
        """
        if runtime not in RUNTIMES:
            raise ValueError(f"Expected runtime in {RUNTIMES}. Received: runtime={runtime!r}")
        fractions = tuple(float(f) for f in fractions)
        if not fractions or not all(0.0 < f < 1.0 for f in fractions):
            raise ValueError(f"Expected fractions in (0, 1). Received: fractions={fractions!r}")
        for arg, v in (("batch_size", batch_size), ("step", step), ("rounds", rounds)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Expected {arg} to be an integer >= 1. Received: {arg}={v!r}")
        if not isinstance(model, keras.Model):
            raise ValueError(f"Expected a keras.Model. Received: model={model!r} of class {type(model).__name__}")
        from keras_taylor.gates import is_gated, strip_gates

        plain = strip_gates(model) if is_gated(model) else model
        graph = graph_lib.analyze(plain, on_unknown="freeze")
        segments = [_Segment(n, chain, graph) for n, chain in _segments(graph)]
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"Expected threads to be None or an integer >= 1. Received: threads={threads!r}")
        if isinstance(calibrate, bool) or not isinstance(calibrate, int) or calibrate < 0:
            raise ValueError(f"Expected calibrate to be an integer >= 0. Received: calibrate={calibrate!r}")
        device, versions = _device(runtime), _versions(runtime) + (f", threads {threads}" if threads else "")
        cache = _Cache(cache_dir, runtime, batch_size, device, versions)
        rng = np.random.default_rng(seed)
        bar = keras.utils.Progbar(len(segments) + 1, unit_name="layer") if verbose else None
        overhead = cache.get("overhead")
        if overhead is None:
            probe = keras.Sequential([keras.Input((1,), batch_size=batch_size), keras.layers.ReLU()])
            overhead = _time({"o": _runner(probe, runtime, batch_size, rng, threads)}, rounds, rng)["o"]
            cache.put("overhead", overhead)
        layers = {}
        for seg in segments:
            key = _hash(seg.signature(batch_size) + f"|step={step}|fr={fractions}|in={seg.in_prunable}|out={seg.out_prunable}")
            entry = cache.get(key)
            if entry is None:
                entry = _measure_segment(seg, runtime, batch_size, step, rounds, rng, overhead, fractions, threads)
                cache.put(key, entry)
            layers[seg.name] = entry
            if bar is not None:
                bar.add(1)
        full_key = _hash(_structure_json(plain) + "|model")
        full_ms = cache.get(full_key)
        if full_ms is None:
            full_ms = _time({"m": _runner(plain, runtime, batch_size, rng, threads)}, rounds, rng)["m"] - overhead
            cache.put(full_key, full_ms)
        if bar is not None:
            bar.add(1)
        cache.save()
        table = cls(layers, 0.0, full_ms, runtime, batch_size, device, versions, plain.name, threads=threads)
        table.fixed_ms = full_ms - table.predict(plain)
        if calibrate:
            calibration_rounds = int(calibration_rounds or 3 * rounds)
            cal_key = _hash(f"{full_key}|calibrate={calibrate}|seed={seed}|rounds={calibration_rounds}|block={WHOLE_MODEL_BLOCK_MS}|stat={WHOLE_MODEL_STAT}|fit=loo-floor|{sorted((k, _hash(json.dumps(v, sort_keys=True))) for k, v in layers.items())}")
            cal = cache.get(cal_key)
            if cal is None:
                # Whole models are timed as a user runs them (call overhead included: `a0` holds it).
                timer = _runtime_timer(runtime, batch_size, threads, calibration_rounds, rng)
                cal = table.calibrate(plain, calibrate, timer, seed=seed)
                cache.put(cal_key, cal)
                cache.save()
            table.calibration = cal
        return table

    # ---- use ----------------------------------------------------------------------
    def layer_ms(self, name: str, cin, cout):
        """Predicted latency (ms) of layer `name`'s segment at `cin`/`cout` channels."""
        e = self.layers[name]
        a = _interp(e["out_widths"], e["out_ms"], cout, e["step"], e["cout_full"]) if e["out_widths"] else np.full(np.shape(cout), e["full_ms"])
        if e["in_widths"]:
            b = _interp(e["in_widths"], e["in_ms"], cin, e["step"], e["cin_full"])
            a = a * (b / e["full_ms"] if e["full_ms"] > 0 else 1.0)
        return a

    def cost_terms(self, graph: graph_lib.ChannelGraph, calibrated: bool = True):
        """The table as additive `selection.CostTerms` over `graph` (ms).

        With a calibration (and `calibrated`), the segment terms are scaled by
        `a1`, one term per residual tensor (`a2` ms per million elements at
        its live width) is added, and the constant is `a0`."""
        from keras_taylor.selection import CostTerms

        terms = self._segment_terms(graph)
        if not (calibrated and self.calibration):
            return CostTerms(terms, self.fixed_ms, unit="ms")
        a0, a1, a2 = (float(c) for c in self.calibration["coef"])
        terms = [(name, i, o, (lambda cin, cout, f=f: a1 * f(cin, cout))) for name, i, o, f in terms]
        for name, ids, melems in _residual_terms(graph):
            terms.append((name, None, ids, lambda cin, cout, k=a2 * melems: k * np.asarray(cout, dtype=np.float64)))
        return CostTerms(terms, a0, unit="ms")

    def features(self, graph: graph_lib.ChannelGraph, alive: np.ndarray) -> tuple:
        """`(Σ segment ms, Σ residual Melements)` at the `alive` channel ids: the
        two width-dependent features of the calibration."""
        seg = sum(v for _, v in self.cost_terms(graph, calibrated=False).per_term(alive))
        res = sum(m * float(np.count_nonzero(alive[ids])) for _, ids, m in _residual_terms(graph))
        return float(seg), float(res)

    def floor_ms(self, graph: graph_lib.ChannelGraph) -> float:
        """Σ of the segments' uncalibrated predictions with every prunable side
        at its narrowest sampled width: the part of the segment timings that
        no pruning removes."""
        total = 0.0
        for name, _, _, _ in self._segment_terms(graph):
            e = self.layers[name]
            cin = e["in_widths"][0] if e["in_widths"] else e["cin_full"]
            cout = e["out_widths"][0] if e["out_widths"] else e["cout_full"]
            total += float(self.layer_ms(name, cin, cout))
        return total

    def calibrate(self, model: keras.Model, n: int, measure, *, seed: int = 0, low: float = 0.25, high: float = 0.95) -> dict:
        """Fits the table to whole-model measurements of random prunings of `model`.

        The part of a model outside the segments (Add, Concatenate, pooling
        outside a segment, per-op dispatch, fusion) is not constant: it
        shrinks with the channels. This draws `n` random prunings of `model`
        (`selection.random_flops_removal`, FLOPs kept uniform in
        [`low`, `high`], every second one aligned to 8), measures them and the
        dense model with `measure`, and fits

            ms ≈ a0 + a1 · Σ segment predictions + a2 · Σ residual Melements

        by least squares on the relative error (every row divided by its
        measurement), `a1, a2 >= 0`; `Σ residual Melements` counts, at the
        kept widths, the elements of every tensor read or written by a layer
        that is not part of a segment (`_residual_terms`).

        Two fits are made: `a0 >= 0` (`"nonnegative"`), and `a0 >=
        −a1 · floor` (`"floor"`; `floor_ms`: the segments at their narrowest
        sampled widths). A negative `a0` says the isolated segment timings
        carry a cost the whole model does not pay (layers are never removed,
        so a constant per segment is one constant per model): on `tf` a
        segment timed at 8 channels still costs about half its full-width
        time. It can at most cancel that unremovable part, so a prediction
        never goes below `a2 · Σ residual` (≥ 0). With at least 5 points
        the fit with the lower median leave-one-out error over the
        calibration points is kept (ties: `a0 >= 0`); with fewer, `a0 >= 0`.
        The choice uses the calibration points only.

        Sets and returns `self.calibration` (`{"coef", "points",
        "fit_median_abs_err", "fit_worst_abs_err", "intercept"` (`"floor"`
        or `"nonnegative"`), `"loo_median_abs_err"` (`{fit: error}`, None
        with fewer than 5 points)`}`).

        Args:
            model: the model the table was measured on.
            n: number of random prunings (>= 2).
            measure: callable `{name: keras.Model} -> {name: ms}` (all timed
                together); `measure` builds it for the table's runtime.
            seed: seed of the prunings.
            low, high: range of the FLOPs kept.
        """
        from keras_taylor import selection
        from keras_taylor.plan import PruningPlan
        from keras_taylor.surgery import apply_plan

        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"Expected n to be an integer >= 2. Received: n={n!r}")
        if not callable(measure):
            raise ValueError(f"Expected measure to be a callable {{name: model}} -> {{name: ms}}. Received: measure={measure!r}")
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"Expected 0 < low <= high <= 1. Received: low={low!r}, high={high!r}")
        graph = graph_lib.analyze(model, on_unknown="freeze")
        rng = np.random.default_rng([int(seed), 7919])
        models, feats = {"dense": model}, {"dense": self.features(graph, graph.alive_ids(()))}
        keys = {"dense": ""}
        for i in range(n):
            removed = selection.random_flops_removal(graph, float(rng.uniform(low, high)), rng, multiple=8 if i % 2 else None)
            models[f"c{i}"] = apply_plan(model, PruningPlan.from_groups(graph, removed))
            feats[f"c{i}"] = self.features(graph, graph.alive_ids(removed))
            keys[f"c{i}"] = removal_key(removed)
        ms = measure(models)
        x = np.array([[1.0, *feats[k]] for k in models])
        y = np.array([ms[k] for k in models])
        floor = self.floor_ms(graph)
        fits, loo = {}, {}
        for intercept, shift in (("nonnegative", 0.0), ("floor", floor)):
            fits[intercept] = _fit_relative(x, y, shift)
            if len(y) >= 5:
                errs = []
                for i in range(len(y)):
                    keep = np.arange(len(y)) != i
                    errs.append(abs(x[i] @ _fit_relative(x[keep], y[keep], shift) / y[i] - 1.0))
                loo[intercept] = float(np.median(errs))
        # Equal fits (the floor fit's a0 >= 0) give equal errors up to rounding: a tie.
        chosen = "floor" if loo and loo["floor"] < loo["nonnegative"] - 1e-9 else "nonnegative"
        coef = fits[chosen]
        err = np.abs(x @ coef / y - 1.0)
        self.calibration = {
            "coef": [float(c) for c in coef],
            "intercept": chosen,
            "loo_median_abs_err": loo or None,
            "points": [
                {"name": k, "removed_key": keys[k], "segments_ms": feats[k][0], "residual_melems": feats[k][1], "ms": float(ms[k])}
                for k in models
            ],
            "fit_median_abs_err": float(np.median(err)), "fit_worst_abs_err": float(err.max()),
        }
        return self.calibration

    def _segment_terms(self, graph: graph_lib.ChannelGraph) -> list:
        terms, seen = [], set()
        for n in graph.nodes:
            if n.handler is None or not n.handler.creates_channels or n.name in seen:
                continue
            seen.add(n.name)
            if n.name not in self.layers:
                raise ValueError(
                    f"Expected the latency table to hold layer {n.name!r} of model "
                    f"{graph.model_name!r}: it was measured on model {self.model_name!r} "
                    f"with layers {sorted(self.layers)[:8]}..."
                )
            e = self.layers[n.name]
            in_ids = n.in_maps[0] if e["in_widths"] else None
            terms.append((n.name, in_ids, n.out_maps[0], lambda cin, cout, name=n.name: self.layer_ms(name, cin, cout)))
        return terms

    def per_layer(self, model: keras.Model) -> dict:
        """`{layer name: predicted ms}` of `model` (gated: live channels only)."""
        from keras_taylor.flops import removed_groups_from_gates
        from keras_taylor.gates import is_gated

        graph = graph_lib.analyze(model, on_unknown="freeze")
        removed = removed_groups_from_gates(model, graph) if is_gated(model) else ()
        out: dict = {}
        for name, v in self.cost_terms(graph).per_term(graph.alive_ids(removed)):
            out[name] = out.get(name, 0.0) + v
        return out

    def predict(self, model: keras.Model) -> float:
        """Predicted latency (ms) of `model`: the measured model or a pruned/gated version."""
        constant = float(self.calibration["coef"][0]) if self.calibration else self.fixed_ms
        return constant + float(sum(self.per_layer(model).values()))

    # ---- serialization ---------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "model_name": self.model_name, "runtime": self.runtime,
            "batch_size": self.batch_size, "device": self.device, "versions": self.versions,
            "fixed_ms": self.fixed_ms, "full_ms": self.full_ms, "layers": self.layers,
            "calibration": self.calibration, "threads": self.threads,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyTable":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"Expected a latency table dict with format={FORMAT!r}. Received: {str(d)[:200]!r}")
        return cls(d["layers"], d["fixed_ms"], d["full_ms"], d["runtime"], d["batch_size"], d["device"], d["versions"], d.get("model_name", ""), d.get("calibration"), d.get("threads"))

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f)

    @classmethod
    def load(cls, path: str) -> "LatencyTable":
        with open(path) as f:
            return cls.from_dict(json.load(f))


def _runtime_timer(runtime, batch_size, threads, rounds, rng, overhead=0.0, block_ms=WHOLE_MODEL_BLOCK_MS, reference=REFERENCE):
    """`{name: model} -> {name: ms}`: the models run on `runtime`, timed
    together in interleaved rounds (the runtime's per-call `overhead`
    subtracted). When `reference` (the dense model, `"dense"`) is among the
    names, times are paired (`latency.paired_ms`): the reference's minimum of
    per-round means × each model's median per-round ratio to it, so a
    model's ratio to the dense one is a median of same-round ratios (MobileNetV2
    224², TFLite, 1 thread, 6 repeats of 21 rounds: s.d. of a pruned/dense ratio 0.004–0.006
    against 0.006–0.014 for the ratio of the two minima; docs/latency.md);
    otherwise the minimum of per-round means. Each round runs a model for a block of
    about `block_ms` (several calls, so that a block is not one call on
    caches the other models just evicted; on tf, the dense MobileNetV2 at 64²
    measured 5.8 ms among 7 models and 6.7 ms among 45 with one-call blocks —
    the cause was not isolated, see docs/latency.md)."""

    built: dict = {}  # id(model) -> (model, runner): a model timed again is not converted again

    def measure(models: dict) -> dict:
        runners = {}
        for k, m in models.items():
            if id(m) not in built:
                built[id(m)] = (m, _runner(m, runtime, batch_size, rng, threads))
            runners[k] = built[id(m)][1]
        ref = reference if reference in runners else None
        return {k: max(v - overhead, 1e-9) for k, v in _time(runners, rounds, rng, block_ms, ref).items()}

    return measure


def _fit_relative(x: np.ndarray, y: np.ndarray, floor: float = 0.0) -> np.ndarray:
    """Least squares of `x @ coef ≈ y` (columns: 1, Σ segments, Σ residual)
    on the relative error, `coef[1:] >= 0` and `coef[0] >= −coef[1] · floor`
    (fitted as `a0' + a1 · (Σ segments − floor)` with `a0' >= 0`)."""
    from scipy.optimize import lsq_linear

    shifted = x.copy()
    shifted[:, 1] -= floor
    c = lsq_linear(shifted / y[:, None], np.ones_like(y), bounds=(0.0, np.inf), method="bvls").x
    c[0] -= c[1] * floor
    return c


def removal_key(removed) -> str:
    """A short digest of a set of removed groups (calibration points carry it,
    so that an evaluation can check it uses other prunings)."""
    return _hash(",".join(str(g) for g in sorted(int(g) for g in removed)))


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _time(runners: dict, rounds: int, rng, block_ms: float = 5.0, reference=None) -> dict:
    """Minimum over rounds of per-round mean ms, interleaved (`latency.time_callables`);
    with a `reference` name, paired times instead (`latency.paired_ms`)."""
    timed = latency_lib.time_callables(runners, rounds=rounds, target_ms=block_ms, seed=int(rng.integers(1 << 30)))
    if reference is not None:
        return latency_lib.paired_ms({k: v["per_round_ms"] for k, v in timed.items()}, reference)
    return {k: v["min_ms"] for k, v in timed.items()}


def _measure_segment(seg: _Segment, runtime, batch_size, step, rounds, rng, overhead, fractions=_FRACTIONS, threads=None) -> dict:
    mult = seg.groups
    outs = sample_widths(seg.cout_full, step, mult, fractions) if seg.out_prunable else [seg.cout_full]
    ins = sample_widths(seg.cin_full, step, mult, fractions) if seg.in_prunable else []
    runners = {}
    for w in outs:
        runners[("o", w)] = _runner(seg.build(seg.cin_full, w, batch_size), runtime, batch_size, rng, threads)
    for w in ins:
        if w != seg.cin_full:
            runners[("i", w)] = _runner(seg.build(w, seg.cout_full, batch_size), runtime, batch_size, rng, threads)
    keyed = {f"{k[0]}{k[1]}": r for k, r in runners.items()}
    t = {k: max(v - overhead, 0.0) for k, v in _time(keyed, rounds, rng).items()}
    full = t[f"o{seg.cout_full}"]
    return {
        "class": type(seg.layers[0]).__name__,
        "riders": [type(l).__name__ for l in seg.layers[1:]],
        "cin_full": seg.cin_full, "cout_full": seg.cout_full, "step": step, "full_ms": full,
        "out_widths": outs if seg.out_prunable else [], "out_ms": [t[f"o{w}"] for w in outs] if seg.out_prunable else [],
        "in_widths": ins, "in_ms": [full if w == seg.cin_full else t[f"i{w}"] for w in ins],
    }


class _Cache:
    """One JSON file per (runtime, batch, device, versions)."""

    def __init__(self, cache_dir, runtime, batch_size, device, versions):
        cache_dir = cache_dir or os.environ.get("KERAS_TAYLOR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "keras_taylor", "latency")
        self.path = os.path.join(cache_dir, f"{runtime}_b{batch_size}_{_hash(device + '|' + versions)}.json")
        self.data = {"device": device, "versions": versions, "entries": {}}
        self.dirty = False
        if os.path.exists(self.path):
            try:
                with open(self.path) as f:
                    data = json.load(f)
                if data.get("device") == device and data.get("versions") == versions:
                    self.data = data
            except (OSError, ValueError):
                pass  # a broken cache is rebuilt

    def get(self, key):
        return self.data["entries"].get(key)

    def put(self, key, value):
        self.data["entries"][key] = value
        self.dirty = True

    def save(self):
        if not self.dirty:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = self.path + f".{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f)
        os.replace(tmp, self.path)
        self.dirty = False


def plan_for_latency(
    model: keras.Model,
    scores,
    table: LatencyTable,
    target: float,
    *,
    measure=None,
    tolerance: float = 0.02,
    iterations: int = 4,
    rounds: int = 21,
    **knapsack_kwargs,
) -> tuple:
    """Plans a pruning of `model` whose *measured* latency is `target` × the dense one.

    A closed loop around the knapsack: plan with
    `selection.knapsack_plan(graph, scores, table, budget)`, build the pruned
    model (`apply_plan`), measure it beside the dense model on the runtime,
    and, if the measured ratio misses `target` by more than `tolerance`, move
    the predicted budget and plan again: once plans on both sides of the
    target are measured, to the linear interpolation of the measured ratio
    between the bracket's two budgets (regula falsi); before that, along the
    secant through the last two measured plans, or after the first plan to
    `predicted · target / measured`; always inside the bracket of budgets
    already seen to land under and over the target (bisection of it when a
    step leaves it or gives a plan already measured)
    — at most `iterations` measured plans. The table's prediction sets the
    first budget, so a good table needs one measurement; each further one
    costs one conversion and timing of a pruned model (and of the dense model
    beside it, for the ratio; the default `measure` converts each model once).

    Args:
        model: the dense model (the one `table` was measured on).
        scores: one importance per channel group of `kt.analyze(model)`
            (higher = more important).
        table: a `LatencyTable` of `model`.
        target: the measured latency ratio wanted, in (0, 1].
        measure: callable `{name: keras.Model} -> {name: ms}` timing the
            models together. Defaults to the table's runtime, batch size and
            threads, interleaved rounds, times paired to the dense model
            (the measured ratio is the median of same-round ratios).
        tolerance: stop when |measured ratio − target| ≤ this.
        iterations: most plans (and measurements of pruned models).
        rounds: interleaved timing rounds of the default `measure`.
        **knapsack_kwargs: passed to `selection.knapsack_plan`
            (`min_channels`, `channel_multiple`, ...).

    Returns:
        `(plan, history)`: the plan whose measured ratio is closest to
        `target` (among those within `tolerance` the one with the most
        importance kept, i.e. the first found), and one record per iteration
        with `budget_fraction`, `predicted_fraction`, `measured_fraction`,
        `dense_ms`, `pruned_ms`. Warns (`UserWarning`) when that plan misses
        `target` by more than `tolerance`.

    Raises:
        ValueError: for a `target` outside (0, 1], bad `iterations` or
            `tolerance`, or a `table` without `cost_terms`.
    """
    from keras_taylor import selection
    from keras_taylor.plan import PruningPlan
    from keras_taylor.surgery import apply_plan

    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < float(target) <= 1.0:
        raise ValueError(f"Expected target in (0, 1]. Received: target={target!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"Expected iterations to be an integer >= 1. Received: iterations={iterations!r}")
    if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or tolerance < 0:
        raise ValueError(f"Expected tolerance to be a number >= 0. Received: tolerance={tolerance!r}")
    if not callable(getattr(table, "cost_terms", None)):
        raise ValueError(f"Expected table to be a keras_taylor.LatencyTable. Received: table={table!r}")
    if measure is not None and not callable(measure):
        raise ValueError(f"Expected measure to be None or a callable {{name: model}} -> {{name: ms}}. Received: measure={measure!r}")
    graph = graph_lib.analyze(model, on_unknown="freeze")
    terms = selection.cost_terms(graph, table)
    dense_pred = terms.evaluate(graph.alive_ids(()))
    if measure is None:
        measure = _runtime_timer(table.runtime, table.batch_size, table.threads, rounds, np.random.default_rng(0))
    budget, lo, hi = float(target), 0.0, 1.0  # budgets known to land under / over the target
    at = {}  # measured ratio at the bracket's ends, once measured: {"lo": m, "hi": m}
    history, best, seen = [], None, {}

    def narrow(measured):
        nonlocal lo, hi
        if measured > target and budget <= hi:
            hi, at["hi"] = budget, measured
        elif measured <= target and budget >= lo:
            lo, at["lo"] = budget, measured

    for _ in range(4 * iterations):  # knapsack calls; a plan met before is not measured again
        if len(history) >= iterations or hi - lo < 1e-4:
            break
        removed = selection.knapsack_removal(graph, scores, terms, budget * dense_pred, **knapsack_kwargs)
        key = removal_key(removed)
        if key in seen:
            narrow(seen[key])
            budget = 0.5 * (lo + hi)  # the step was too small to change the plan: bisect the bracket
            continue
        plan = PruningPlan.from_groups(graph, removed)
        pruned = apply_plan(model, plan)
        ms = measure({"dense": model, "pruned": pruned})
        measured = seen[key] = ms["pruned"] / ms["dense"]
        predicted = terms.evaluate(graph.alive_ids(removed)) / dense_pred
        history.append({
            "budget_fraction": budget, "predicted_fraction": predicted, "measured_fraction": measured,
            "dense_ms": ms["dense"], "pruned_ms": ms["pruned"], "groups_removed": len(removed),
        })
        if best is None or abs(measured - target) < abs(best[1] - target):
            best = (plan, measured)
        if abs(measured - target) <= tolerance:
            break
        narrow(measured)
        # The next budget comes from the measurements (the table's error is what
        # the loop corrects): between the bracket's two measured ends (regula
        # falsi) once both sides are known, else the secant through the last two
        # measured plans, else (first step) scaled by measured ÷ predicted.
        pts = [(h["budget_fraction"], h["measured_fraction"]) for h in history[-2:]]
        (b0, m0), (b1, m1) = pts[0], pts[-1]
        if len(at) == 2 and at["hi"] > at["lo"]:
            budget = lo + (target - at["lo"]) * (hi - lo) / (at["hi"] - at["lo"])
        elif (m1 - m0) * (b1 - b0) > 0:  # two distinct plans measured, ratio rising with the budget
            budget = b1 + (target - m1) * (b1 - b0) / (m1 - m0)
        else:
            budget = predicted * target / measured
        if not lo < budget < hi:
            budget = 0.5 * (lo + hi)
    if abs(best[1] - target) > tolerance:
        cheapest = min(h["measured_fraction"] for h in history)
        reason = (f" The cheapest plan measured ({cheapest:.3f}) stays above the target: the runtime's "
                  "per-call cost does not shrink with the channels." if cheapest > target + tolerance else "")
        warnings.warn(
            f"plan_for_latency missed its target: the closest of {len(history)} measured plans runs at "
            f"{best[1]:.3f} of the dense model's latency against target={target} (tolerance={tolerance}).{reason}",
            stacklevel=2,
        )
    return best[0], history
