"""Fuzz: random functional graphs, pruned == gated-with-zero-gates.

A hypothesis strategy draws a tiny random CNN (6×6–8×8 inputs or a 1-D
sequence, ≤8 filters per conv, 1–8 blocks) as Python *source code*, executed
with a seed taken from the drawn data (biases, BN statistics and PReLU slopes
are then randomised, so BN(0) != 0 and biased layers lift zeros). Blocks:
Conv (bias or not; relu/None/swish/tanh/sigmoid; strides 1/2; same/valid;
dilation), Conv+BN+activation, BatchNormalization (center/scale on or off),
activation layers (ReLU variants, LeakyReLU, ELU, PReLU, Softmax, Activation
with zero-preserving and zero-lifting functions), grouped Conv (general form
and the depthwise form groups == in == filters), DepthwiseConv (multiplier
1/2), SeparableConv, ConvTranspose, pooling, UpSampling/Resizing,
ZeroPadding/Cropping, Dropout/SpatialDropout, Dense on feature maps,
Permute and Reshape round trips, residual blocks (identity/projection/two
bodies, stride 2, merged by Add/Subtract/Average/Maximum/Minimum/Multiply or
`+ * -`, `ops.maximum/minimum`), long skips to any earlier tensor,
Concatenate (with earlier tensors, of concatenations, along space),
squeeze-excite (GAP keepdims or GAP→Reshape, Conv or Dense reduce/expand,
sigmoid inside the layer / as an Activation / hard-sigmoid `relu6(x+3)/6`
with keras.ops or layers, Multiply or `*`, broadcast or upsampled), GLU-style
`a * sigmoid(b)`, one-channel spatial attention (broadcast merges),
keras.ops element-wise functions and constants (`x + 1`, `x / 2`), shared
conv layers called twice, and aux outputs. Heads: GAP→Dense(→Dense),
GAP→Dense→BN→ReLU→Dense, GlobalMaxPool→Dense, Flatten→Dense. Some models
are Sequential, 1-D, or channels_first.

The property is the surgery spine of `test_surgery.py`: gate the model, zero
the gates of a random set of channel groups (leaving ≥1 channel in every
layer), prune, and the pruned model must compute the masked gated model's
function (float32, rel. error ≤ 1e-5), be no larger, and be counted the same
by `kt.profile`.

A failing example prints its model source (and seeds), so it can be pasted
into a standalone script. The fast test runs in the default suite
(derandomized, no shrinking); the 500-example sweep (which shrinks) is
marked `exhaustive`:

    .venv/bin/python -m pytest -q -m exhaustive tests/test_fuzz.py
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, event, given, note, settings
from hypothesis import strategies as st
from keras import layers, ops

import keras_taylor as kt
from conftest import randomize_bn, rel_err

MAX_CH = 8  # filters of one conv
MAX_CAT = 12  # channels of a concatenation
MAX_SPATIAL = 12

# KERAS_ADD_BUG: with the TensorFlow backend (Keras 3.15), `keras.ops.add(x1, x2)`
# takes a `tf.nn.bias_add` shortcut when `x2` has a single dimension > 1 whose
# size equals `x1.shape[1]` or `x1.shape[-1]`, and picks NHWC whenever the last
# dimension matches, whatever axis that size sits on in `x2`. So a
# channels_first conv with a bias adds it along the width when width == filters,
# and `x + a` with a one-channel map `a` of shape (B, 1, 1, 1) adds the batch
# along the channels when B == C. Pruning changes channel counts, so such
# models differ from their masked version for reasons outside keras_taylor.
# The generator steers clear: no biases in channels_first models, and in a
# broadcasting add the one-channel operand comes first (`a + x`).


# --------------------------------------------------------------------------
# Model source builder.
# --------------------------------------------------------------------------


def _namespace() -> dict:
    return {"keras": keras, "layers": layers, "ops": ops}


class _Builder:
    """Emits model source line by line, executing each line to learn shapes."""

    def __init__(self, rank: int, sequential: bool, channels_first: bool = False):
        self.rank = rank
        self.D = f"{rank}D"
        self.sequential = sequential
        self.cf = channels_first
        # Appended to the arguments of every layer that takes a data_format.
        self.fmt = ", data_format='channels_first'" if channels_first else ""
        self.chax = 1 if channels_first else -1  # channel axis of a batch tensor
        self.ns = _namespace()
        self.lines: list = []
        self.chain: list = []  # layer expressions, for a Sequential model
        self.count = 0
        self.pool: list = ["inputs"]  # every tensor so far, candidates for skips and merges
        self.shared: list = []  # [(layer var, in channels, needs spatial >=)]
        self.kinds: list = []

    # ---- emitting --------------------------------------------------------
    def fresh(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def run(self, line: str) -> None:
        # Building layers draws Keras seeds from Python's global `random`;
        # leave it as it was (hypothesis forbids strategies that change it).
        state = random.getstate()
        try:
            exec(line, self.ns)
        finally:
            random.setstate(state)
        self.lines.append(line)

    def layer(self, expr: str, x) -> str:
        """`out = expr(x)`, or `expr([x, ...])` for a list of inputs."""
        out = self.fresh("t")
        arg = f"[{', '.join(x)}]" if isinstance(x, list) else x
        self.run(f"{out} = {expr}({arg})")
        self.pool.append(out)
        if self.sequential:
            assert not isinstance(x, list)
            self.chain.append(expr)
        return out

    def op(self, expr: str) -> str:
        """`out = expr`, a keras.ops expression (functional models only)."""
        assert not self.sequential
        out = self.fresh("t")
        self.run(f"{out} = {expr}")
        self.pool.append(out)
        return out

    # ---- shapes ------------------------------------------------------------
    def shape(self, x) -> tuple:
        return tuple(int(d) for d in self.ns[x].shape[1:])

    def C(self, x) -> int:
        return self.shape(x)[0] if self.cf else self.shape(x)[-1]

    def sp(self, x) -> tuple:
        return self.shape(x)[1:] if self.cf else self.shape(x)[:-1]

    def lo(self, x) -> int:
        return min(self.sp(x))

    def hi(self, x) -> int:
        return max(self.sp(x))

    def source(self, outputs: list) -> str:
        if self.sequential:
            head = self.lines[0]  # inputs = keras.Input(...)
            shape_expr = head.split("=", 1)[1].strip()
            body = ",\n    ".join([shape_expr, *self.chain])
            return f"model = keras.Sequential([\n    {body},\n], name=\"fuzz_seq\")\n"
        outs = outputs[0] if len(outputs) == 1 else f"[{', '.join(outputs)}]"
        return "\n".join(self.lines + [f'model = keras.Model(inputs, {outs}, name="fuzz")']) + "\n"


# --------------------------------------------------------------------------
# Drawing helpers.
# --------------------------------------------------------------------------

ACTS = st.sampled_from([None, "relu", "swish", None, "relu", "tanh", "sigmoid"])


def _geometry(draw, b, x, kernels=(1, 3)):
    """(kernel, strides, padding) valid for the spatial size of `x`."""
    lo = b.lo(x)
    k = draw(st.sampled_from([k for k in kernels if k <= lo] or [1]))
    padding = draw(st.sampled_from(["same", "valid"]))
    strides = draw(st.sampled_from([1, 2])) if lo >= 2 else 1
    return k, strides, padding


def _bias(b, draw) -> bool:
    """use_bias, never for channels_first (see KERAS_ADD_BUG)."""
    return draw(st.booleans()) and not b.cf


def _conv_expr(b, draw, filters, k, strides=1, padding="same", act=None, bias=True, extra="", prefix="conv"):
    bias = bias and not b.cf  # see KERAS_ADD_BUG
    return (
        f"layers.Conv{b.D}({filters}, {k}, strides={strides}, padding={padding!r}, "
        f"use_bias={bias}, activation={act!r}{extra}{b.fmt}, name={b.fresh(prefix)!r})"
    )


def _bn_expr(b, draw):
    center = draw(st.sampled_from([True, True, True, False]))
    scale = draw(st.sampled_from([True, True, True, False]))
    axis = "axis=1, " if b.cf else ""
    return f"layers.BatchNormalization({axis}center={center}, scale={scale}, name={b.fresh('bn')!r})"


ACT_LAYERS = [
    "layers.ReLU(name={n!r})",
    "layers.ReLU(6.0, name={n!r})",
    "layers.Activation('swish', name={n!r})",
    "layers.Activation('relu', name={n!r})",
    "layers.ReLU(negative_slope=0.1, name={n!r})",
    "layers.ReLU(threshold=0.3, name={n!r})",
    "layers.ReLU(negative_slope=0.1, threshold=0.3, name={n!r})",
    "layers.LeakyReLU(negative_slope=0.2, name={n!r})",
    "layers.ELU(name={n!r})",
    "layers.PReLU(shared_axes={axes}, name={n!r})",
    "layers.PReLU(name={n!r})",
    "layers.Activation('tanh', name={n!r})",
    "layers.Activation('gelu', name={n!r})",
    "layers.Activation('sigmoid', name={n!r})",
    "layers.Activation('hard_sigmoid', name={n!r})",
    "layers.Activation('softplus', name={n!r})",
    "layers.Activation('hard_swish', name={n!r})",
    "layers.Activation('selu', name={n!r})",
    "layers.Activation('mish', name={n!r})",
    "layers.Activation('linear', name={n!r})",
    "layers.Softmax(name={n!r})",
]


def _act_expr(b, draw, common=False):
    choices = ACT_LAYERS[:4] if common else ACT_LAYERS
    if b.cf:  # a PReLU's alpha and a Softmax's axis are laid out channels-last
        choices = [c for c in choices if "PReLU" not in c and "Softmax" not in c]
    axes = list(range(1, b.rank + 1))
    return draw(st.sampled_from(choices)).format(n=b.fresh("act"), axes=axes)


# --------------------------------------------------------------------------
# Chain blocks: one tensor in, one tensor out (allowed in Sequential models).
# --------------------------------------------------------------------------


def blk_conv(b, draw, x):
    filters = draw(st.integers(1, MAX_CH))
    k, s, p = _geometry(draw, b, x)
    extra = ""
    if s == 1 and draw(st.integers(0, 4)) == 0 and b.lo(x) >= (5 if p == "valid" else 1) and k == 3:
        extra = ", dilation_rate=2"
    expr = _conv_expr(b, draw, filters, k, s, p, draw(ACTS), draw(st.booleans()), extra)
    if not b.sequential and draw(st.integers(0, 3)) == 0:
        # A named layer object that a later `shared` block may call again.
        lvar = b.fresh("L")
        b.run(f"{lvar} = {expr}")
        need = 1 + (k - 1) * (2 if extra else 1) if p == "valid" else 1
        b.shared.append((lvar, b.C(x), need))
        return b.op(f"{lvar}({x})")
    return b.layer(expr, x)


def blk_conv_bn_act(b, draw, x):
    filters = draw(st.integers(1, MAX_CH))
    k, s, p = _geometry(draw, b, x)
    x = b.layer(_conv_expr(b, draw, filters, k, s, p, None, draw(st.booleans())), x)
    x = b.layer(_bn_expr(b, draw), x)
    if draw(st.integers(0, 5)):
        x = b.layer(_act_expr(b, draw, common=True), x)
    return x


def blk_bn(b, draw, x):
    return b.layer(_bn_expr(b, draw), x)


def blk_act(b, draw, x):
    return b.layer(_act_expr(b, draw), x)


def blk_grouped(b, draw, x):
    cin = b.C(x)
    divisors = [g for g in range(2, cin + 1) if cin % g == 0]
    if not divisors:
        return blk_conv(b, draw, x)
    k, s, p = _geometry(draw, b, x)
    if draw(st.booleans()):  # depthwise form: groups == in == filters (ConvNeXt)
        g, filters = cin, cin
    else:
        g = draw(st.sampled_from(divisors))
        filters = g * draw(st.integers(1, max(1, MAX_CH // g)))
    expr = _conv_expr(b, draw, filters, k, s, p, draw(ACTS), draw(st.booleans()), f", groups={g}", prefix="gconv")
    return b.layer(expr, x)


def blk_depthwise(b, draw, x):
    k, s, p = _geometry(draw, b, x)
    dm = draw(st.sampled_from([1, 2])) if 2 * b.C(x) <= MAX_CAT else 1
    expr = (
        f"layers.DepthwiseConv{b.D}({k}, strides={s}, padding={p!r}, depth_multiplier={dm}, "
        f"use_bias={_bias(b, draw)}, activation={draw(ACTS)!r}{b.fmt}, name={b.fresh('dw')!r})"
    )
    return b.layer(expr, x)


def blk_separable(b, draw, x):
    k, s, p = _geometry(draw, b, x)
    expr = (
        f"layers.SeparableConv{b.D}({draw(st.integers(1, MAX_CH))}, {k}, strides={s}, padding={p!r}, "
        f"depth_multiplier={draw(st.sampled_from([1, 2]))}, use_bias={_bias(b, draw)}, "
        f"activation={draw(ACTS)!r}{b.fmt}, name={b.fresh('sep')!r})"
    )
    return b.layer(expr, x)


def blk_transpose(b, draw, x):
    hi = b.hi(x)
    k = draw(st.sampled_from([1, 2, 3]))
    options = [(s, p) for s in (1, 2) for p in ("same", "valid") if (hi * s if p == "same" else (hi - 1) * s + k) <= MAX_SPATIAL]
    s, p = draw(st.sampled_from(options or [(1, "same")]))
    expr = (
        f"layers.Conv{b.D}Transpose({draw(st.integers(1, MAX_CH))}, {k}, strides={s}, padding={p!r}, "
        f"use_bias={_bias(b, draw)}, activation={draw(ACTS)!r}{b.fmt}, name={b.fresh('tconv')!r})"
    )
    return b.layer(expr, x)


def blk_pool(b, draw, x):
    if b.lo(x) < 2:
        return blk_dropout(b, draw, x)
    kind = draw(st.sampled_from(["Max", "Average"]))
    s = draw(st.sampled_from([2, 1]))
    p = draw(st.sampled_from(["valid", "same"]))
    return b.layer(f"layers.{kind}Pooling{b.D}(2, strides={s}, padding={p!r}{b.fmt}, name={b.fresh('pool')!r})", x)


def blk_resize(b, draw, x):
    if b.hi(x) * 2 > MAX_SPATIAL:
        return blk_pool(b, draw, x)
    if b.rank == 2 and draw(st.booleans()):
        h, w = (d + 2 for d in b.sp(x))
        interp = draw(st.sampled_from(["bilinear", "nearest"]))
        return b.layer(f"layers.Resizing({h}, {w}, interpolation={interp!r}{b.fmt}, name={b.fresh('resize')!r})", x)
    return b.layer(f"layers.UpSampling{b.D}(2{b.fmt}, name={b.fresh('up')!r})", x)


def blk_pad(b, draw, x):
    if b.lo(x) >= 3 and draw(st.booleans()):
        return b.layer(f"layers.Cropping{b.D}(1{b.fmt}, name={b.fresh('crop')!r})", x)
    if b.hi(x) + 2 > MAX_SPATIAL:
        return blk_dropout(b, draw, x)
    return b.layer(f"layers.ZeroPadding{b.D}(1{b.fmt}, name={b.fresh('pad')!r})", x)


def blk_dropout(b, draw, x):
    if draw(st.booleans()):
        return b.layer(f"layers.Dropout(0.3, name={b.fresh('drop')!r})", x)
    fmt = b.fmt if b.rank > 1 else ""
    return b.layer(f"layers.SpatialDropout{b.D}(0.3{fmt}, name={b.fresh('drop')!r})", x)


def blk_dense_map(b, draw, x):
    """Dense on a feature map: a 1×1 conv in disguise."""
    if b.cf:  # Dense reads the last axis, a spatial one here
        return b.layer(_conv_expr(b, draw, draw(st.integers(1, MAX_CH)), 1, act=draw(ACTS)), x)
    units = draw(st.integers(1, MAX_CH))
    expr = f"layers.Dense({units}, activation={draw(ACTS)!r}, use_bias={draw(st.booleans())}, name={b.fresh('dmap')!r})"
    return b.layer(expr, x)


def blk_reshape(b, draw, x):
    """2-D: Permute(H, W) or a Reshape round trip through a Conv1D."""
    if b.rank != 2:
        return blk_bn(b, draw, x)
    (h, w), c = b.sp(x), b.C(x)
    if b.cf:
        return b.layer(f"layers.Permute((1, 3, 2), name={b.fresh('perm')!r})", x)
    if draw(st.booleans()):
        return b.layer(f"layers.Permute((2, 1, 3), name={b.fresh('perm')!r})", x)
    x = b.layer(f"layers.Reshape(({h * w}, {c}), name={b.fresh('to_seq')!r})", x)
    if draw(st.booleans()):
        c = draw(st.integers(1, MAX_CH))
        x = b.layer(f"layers.Conv1D({c}, 3, padding='same', activation={draw(ACTS)!r}, name={b.fresh('c1d')!r})", x)
    return b.layer(f"layers.Reshape(({h}, {w}, {c}), name={b.fresh('to_img')!r})", x)


# --------------------------------------------------------------------------
# Graph blocks (functional models only).
# --------------------------------------------------------------------------

MERGES = ["Add", "Add", "Subtract", "Average", "Maximum", "Minimum", "Multiply", "+", "*", "-", "ops.maximum", "ops.minimum"]
MULTI = {"Add", "Average", "Maximum", "Minimum", "Multiply", "+", "*"}


def _merge(b, draw, inputs: list) -> str:
    kinds = [m for m in MERGES if len(inputs) == 2 or m in MULTI]
    kind = draw(st.sampled_from(kinds))
    if kind in ("+", "*", "-"):
        return b.op(f" {kind} ".join(inputs))
    if kind.startswith("ops."):
        return b.op(f"{kind}({', '.join(inputs)})")
    return b.layer(f"layers.{kind}(name={b.fresh(kind.lower())!r})", inputs)


def _maybe_lift(b, draw, y) -> str:
    """Sometimes end a branch with an op that maps 0 to non-zero (a removed
    channel is then non-zero there, whatever its gate)."""
    kind = draw(st.sampled_from(["none", "none", "none", "none", "sigmoid", "softplus", "plus", "hard_sigmoid"]))
    if kind == "none":
        return y
    if kind == "plus":
        return b.op(f"{y} + 1.0")
    return b.layer(f"layers.Activation({kind!r}, name={b.fresh('lift')!r})", y)


def _body(b, draw, x, target: int, stride: int) -> str:
    """1-3 layers, 'same' padding, ending with `target` channels."""
    n = draw(st.integers(1, 3))
    y = x
    for i in range(n):
        last = i == n - 1
        s = stride if i == 0 else 1
        filters = target if last else draw(st.integers(1, MAX_CH))
        kind = draw(st.sampled_from(["conv_bn", "conv", "sep", "dw_pw"]))
        if kind == "conv_bn":
            y = b.layer(_conv_expr(b, draw, filters, draw(st.sampled_from([3, 1])), s, "same", None, draw(st.booleans())), y)
            y = b.layer(_bn_expr(b, draw), y)
            if not last or draw(st.booleans()):
                y = b.layer(_act_expr(b, draw, common=True), y)
        elif kind == "conv":
            act = draw(ACTS) if not last else draw(st.sampled_from([None, "relu"]))
            y = b.layer(_conv_expr(b, draw, filters, draw(st.sampled_from([3, 1])), s, "same", act, draw(st.booleans())), y)
        elif kind == "sep":
            y = b.layer(
                f"layers.SeparableConv{b.D}({filters}, 3, strides={s}, padding='same', "
                f"depth_multiplier={draw(st.sampled_from([1, 2]))}, use_bias={_bias(b, draw)}"
                f"{b.fmt}, name={b.fresh('sep')!r})",
                y,
            )
        else:
            dm = draw(st.sampled_from([1, 2]))
            y = b.layer(
                f"layers.DepthwiseConv{b.D}(3, strides={s}, padding='same', depth_multiplier={dm}, "
                f"use_bias={_bias(b, draw)}{b.fmt}, name={b.fresh('dw')!r})",
                y,
            )
            if draw(st.booleans()):
                y = b.layer(_bn_expr(b, draw), y)
            y = b.layer(_act_expr(b, draw, common=True), y)
            y = b.layer(_conv_expr(b, draw, filters, 1, 1, "same", None, draw(st.booleans()), prefix="pw"), y)
    return _maybe_lift(b, draw, y)


def blk_residual(b, draw, x):
    c = b.C(x)
    target = c if draw(st.booleans()) else draw(st.integers(1, MAX_CH))
    stride = 2 if b.lo(x) >= 2 and draw(st.integers(0, 3)) == 0 else 1
    body = _body(b, draw, x, target, stride)
    skip_kind = draw(st.sampled_from(["identity", "projection", "body"]))
    if skip_kind == "body":
        skip = _body(b, draw, x, target, stride)
    elif skip_kind == "identity" and target == c:
        skip = x
        if stride == 2:
            kind = draw(st.sampled_from(["Average", "Max"]))
            skip = b.layer(f"layers.{kind}Pooling{b.D}(2, strides=2, padding='same'{b.fmt}, name={b.fresh('pool')!r})", x)
    else:
        skip = b.layer(_conv_expr(b, draw, target, 1, stride, "same", None, draw(st.booleans()), prefix="proj"), x)
        if draw(st.booleans()):
            skip = b.layer(_bn_expr(b, draw), skip)
    branches = [skip, body] if draw(st.booleans()) else [body, skip]
    if draw(st.integers(0, 4)) == 0:
        branches.append(_body(b, draw, x, target, stride))
    y = _merge(b, draw, branches)
    if draw(st.booleans()):
        y = b.layer(_act_expr(b, draw, common=True), y)
    return y


def blk_merge_skip(b, draw, x):
    """A long skip: merge with an earlier tensor of the same shape (any
    tensor of the graph so far, inside blocks too; rarely `x` itself)."""
    same = [v for v in b.pool if v != x and b.shape(v) == b.shape(x)]
    if draw(st.integers(0, 7)) == 0:
        same = [x]
    if not same:
        return blk_residual(b, draw, x)
    return _merge(b, draw, [x, draw(st.sampled_from(same))])


def _sigmoid_like(b, draw, y) -> str:
    kind = draw(st.sampled_from(["layer", "hard_layer", "hard_ops", "relu6_layer", "ops_sigmoid"]))
    if kind == "ops_sigmoid":
        return b.op(f"ops.sigmoid({y})")
    if kind == "layer":
        return b.layer(f"layers.Activation('sigmoid', name={b.fresh('sig')!r})", y)
    if kind == "hard_layer":
        return b.layer(f"layers.Activation('hard_sigmoid', name={b.fresh('hsig')!r})", y)
    if kind == "hard_ops":
        return b.op(f"ops.relu6({y} + 3.0) / 6.0")
    return b.op(f"layers.ReLU(6.0, name={b.fresh('relu6')!r})({y} + 3.0) * (1.0 / 6.0)")


def blk_gated_merge(b, draw, x):
    """GLU-style `a * sigmoid(b)` on full feature maps (not squeeze-excite)."""
    target = b.C(x) if draw(st.booleans()) else draw(st.integers(1, MAX_CH))
    a = x if target == b.C(x) and draw(st.booleans()) else _body(b, draw, x, target, 1)
    g = _sigmoid_like(b, draw, _body(b, draw, x, target, 1))
    parts = [a, g] if draw(st.booleans()) else [g, a]
    if draw(st.booleans()):
        return b.op(f"{parts[0]} * {parts[1]}")
    return b.layer(f"layers.Multiply(name={b.fresh('gmul')!r})", parts)


def _side(b, draw, x, max_out: int) -> str:
    """A branch keeping the spatial size: conv, separable, depthwise or pooling."""
    return _maybe_lift(b, draw, _side_inner(b, draw, x, max_out))


def _side_inner(b, draw, x, max_out: int) -> str:
    kind = draw(st.sampled_from(["conv", "conv_bn", "pool", "sep", "dw"]))
    f = draw(st.integers(1, max(1, min(MAX_CH, max_out))))
    if kind == "conv":
        return b.layer(_conv_expr(b, draw, f, draw(st.sampled_from([1, 3])), 1, "same", draw(ACTS), draw(st.booleans())), x)
    if kind == "conv_bn":
        y = b.layer(_conv_expr(b, draw, f, draw(st.sampled_from([1, 3])), 1, "same", None, False), x)
        y = b.layer(_bn_expr(b, draw), y)
        return b.layer(_act_expr(b, draw, common=True), y)
    if kind == "sep":
        return b.layer(
            f"layers.SeparableConv{b.D}({f}, 3, padding='same', activation={draw(ACTS)!r}, "
            f"use_bias={_bias(b, draw)}{b.fmt}, name={b.fresh('sep')!r})",
            x,
        )
    if kind == "dw" and b.C(x) <= max_out:
        return b.layer(f"layers.DepthwiseConv{b.D}(3, padding='same', use_bias={_bias(b, draw)}{b.fmt}, name={b.fresh('dw')!r})", x)
    if b.C(x) <= max_out:
        return b.layer(f"layers.MaxPooling{b.D}(3, strides=1, padding='same'{b.fmt}, name={b.fresh('pool')!r})", x)
    return b.layer(_conv_expr(b, draw, f, 1, 1, "same", None, True), x)


def blk_concat(b, draw, x):
    c = b.C(x)
    mode = draw(st.sampled_from(["with_branch", "two_branches", "with_earlier", "three"]))
    earlier = [v for v in b.pool if v != x and b.sp(v) == b.sp(x) and b.C(v) + c <= MAX_CAT]
    if mode == "with_earlier" and earlier:
        parts = [x, draw(st.sampled_from(earlier))]
    elif mode == "two_branches" or c >= MAX_CAT:
        a = _side(b, draw, x, MAX_CAT // 2)
        parts = [a, _side(b, draw, x, MAX_CAT - b.C(a))]
    else:
        parts = [x, _side(b, draw, x, MAX_CAT - c)]
        if mode == "three" and sum(b.C(p) for p in parts) < MAX_CAT:
            parts.append(_side(b, draw, x, MAX_CAT - sum(b.C(p) for p in parts)))
    if draw(st.booleans()):
        parts.reverse()
    axis = 1 if b.cf else draw(st.sampled_from([-1, -1, b.rank + 1]))
    return b.layer(f"layers.Concatenate(axis={axis}, name={b.fresh('cat')!r})", parts)


def blk_spatial_concat(b, draw, x):
    """Concatenate along a spatial axis: channels of the inputs are tied."""
    if b.sp(x)[0] * 2 > 16:
        return blk_concat(b, draw, x)
    same = [v for v in b.pool if v != x and b.shape(v) == b.shape(x)]
    other = draw(st.sampled_from(same)) if same and draw(st.booleans()) else _body(b, draw, x, b.C(x), 1)
    return b.layer(f"layers.Concatenate(axis={2 if b.cf else 1}, name={b.fresh('scat')!r})", [x, other])


def blk_se(b, draw, x):
    """Squeeze-excite: x * gate(expand(relu(reduce(pool(x)))))."""
    c, r = b.C(x), b.rank
    ones = (1,) * r
    if draw(st.booleans()):
        s = b.layer(f"layers.GlobalAveragePooling{b.D}(keepdims=True{b.fmt}, name={b.fresh('se_pool')!r})", x)
    else:
        s = b.layer(f"layers.GlobalAveragePooling{b.D}(name={b.fresh('se_pool')!r}{b.fmt})", x)
        target = (c, *ones) if b.cf else (*ones, c)
        s = b.layer(f"layers.Reshape({target}, name={b.fresh('se_reshape')!r})", s)
    dense = draw(st.booleans()) and not b.cf
    squeeze = draw(st.integers(1, max(1, min(4, c))))
    gate = draw(st.sampled_from(["sigmoid_inside", "sigmoid_layer", "hard_ops", "hard_layer", "hard_sigmoid"]))

    def proj(units, act, prefix):
        if dense:
            return f"layers.Dense({units}, activation={act!r}, name={b.fresh(prefix)!r})"
        return _conv_expr(b, draw, units, 1, act=act, prefix=prefix)

    if draw(st.booleans()):
        s = b.layer(proj(squeeze, "relu", "se_reduce"), s)
    else:
        s = b.layer(proj(squeeze, None, "se_reduce"), s)
        s = b.layer(f"layers.ReLU(name={b.fresh('se_relu')!r})", s)
    s = b.layer(proj(c, "sigmoid" if gate == "sigmoid_inside" else None, "se_expand"), s)
    if gate == "sigmoid_layer":
        s = b.layer(f"layers.Activation('sigmoid', name={b.fresh('se_sig')!r})", s)
    elif gate == "hard_sigmoid":
        s = b.layer(f"layers.Activation('hard_sigmoid', name={b.fresh('se_hsig')!r})", s)
    elif gate == "hard_ops":
        s = b.op(f"ops.relu6({s} + 3.0) / 6.0")
    elif gate == "hard_layer":
        s = b.op(f"layers.ReLU(6.0, name={b.fresh('se_relu6')!r})({s} + 3.0) * (1.0 / 6.0)")
    mul = draw(st.sampled_from(["layer", "layer_swapped", "op", "upsampled"]))
    if mul == "upsampled":
        size = b.sp(x)[0] if r == 1 else b.sp(x)
        s = b.layer(f"layers.UpSampling{b.D}({size}{b.fmt}, name={b.fresh('se_up')!r})", s)
    if mul == "op":
        return b.op(f"{x} * {s}")
    parts = [s, x] if mul == "layer_swapped" else [x, s]
    return b.layer(f"layers.Multiply(name={b.fresh('se_mul')!r})", parts)


def blk_attention(b, draw, x):
    """Spatial attention: a one-channel map broadcast over the channels of `x`."""
    src = draw(st.sampled_from([v for v in b.pool if b.sp(v) == b.sp(x)] or [x])) if draw(st.booleans()) else x
    act = draw(st.sampled_from(["sigmoid", "sigmoid", None, "relu", "tanh"]))
    a = b.layer(_conv_expr(b, draw, 1, draw(st.sampled_from([3, 1])), 1, "same", act, draw(st.booleans()), prefix="att"), src)
    kind = draw(st.sampled_from(["Multiply", "Multiply", "*", "Add", "+", "Subtract", "Maximum", "Minimum", "Average"]))
    parts = [x, a] if draw(st.booleans()) else [a, x]
    if kind in ("Add", "+", "Average"):
        parts = [a, x]  # see KERAS_ADD_BUG
    if kind in ("*", "+"):
        return b.op(f"{parts[0]} {kind} {parts[1]}")
    return b.layer(f"layers.{kind}(name={b.fresh('att_' + kind.lower())!r})", parts)


# keras.ops element-wise functions (continuous ones: a rounding function would
# turn float32 noise into O(1) differences).
OPS_ACTS = [
    "ops.relu({x})", "ops.relu6({x})", "ops.sigmoid({x})", "ops.tanh({x})", "ops.silu({x})",
    "ops.hard_sigmoid({x})", "ops.maximum({x}, 0.0)", "ops.minimum({x}, 0.5)", "ops.maximum({x}, -0.5)",
    "ops.abs({x})", "ops.square({x})", "ops.negative({x})", "ops.exp({x})", "ops.softplus({x})",
    "ops.clip({x}, -1.0, 1.0)", "ops.cast({x}, 'float32')", "ops.sin({x})",
]


def blk_ops_act(b, draw, x):
    return b.op(draw(st.sampled_from(OPS_ACTS)).format(x=x))


def blk_scale_op(b, draw, x):
    expr = draw(st.sampled_from(["{x} * 0.5", "0.5 * {x}", "{x} / 2.0", "{x} + 1.0", "{x} - 0.25"]))
    return b.op(expr.format(x=x))


def blk_shared(b, draw, x):
    """Call one conv layer object twice."""
    usable = [(lvar, need) for lvar, cin, need in b.shared if cin == b.C(x) and b.lo(x) >= need]
    if usable:
        lvar, _ = draw(st.sampled_from(usable))
        return b.op(f"{lvar}({x})")
    # A fresh shared conv on x and on a same-shape variant of x, then merged.
    lvar = b.fresh("L")
    b.run(f"{lvar} = " + _conv_expr(b, draw, draw(st.integers(1, MAX_CH)), 3, 1, "same", draw(ACTS), draw(st.booleans()), prefix="shared"))
    b.shared.append((lvar, b.C(x), 1))
    y1 = b.op(f"{lvar}({x})")
    z = b.layer(draw(st.sampled_from([_act_expr(b, draw, common=True), _bn_expr(b, draw)])), x)
    y2 = b.op(f"{lvar}({z})")
    if draw(st.booleans()):
        return _merge(b, draw, [y1, y2])
    return b.layer(f"layers.Concatenate(name={b.fresh('cat')!r})", [y1, y2])


CHAIN_BLOCKS = {
    "conv": blk_conv,
    "conv_bn_act": blk_conv_bn_act,
    "bn": blk_bn,
    "act": blk_act,
    "grouped": blk_grouped,
    "depthwise": blk_depthwise,
    "separable": blk_separable,
    "transpose": blk_transpose,
    "pool": blk_pool,
    "resize": blk_resize,
    "pad": blk_pad,
    "dropout": blk_dropout,
    "dense_map": blk_dense_map,
    "reshape": blk_reshape,
}
GRAPH_BLOCKS = {
    "residual": blk_residual,
    "concat": blk_concat,
    "se": blk_se,
    "merge_skip": blk_merge_skip,
    "spatial_concat": blk_spatial_concat,
    "scale_op": blk_scale_op,
    "shared": blk_shared,
    "gated_merge": blk_gated_merge,
    "attention": blk_attention,
    "ops_act": blk_ops_act,
}
# Weighted: the first entries are where shrinking goes.
CHAIN_CHOICES = ["conv", "conv_bn_act", "conv_bn_act", "bn", "act", "grouped", "depthwise", "separable",
                 "transpose", "pool", "resize", "pad", "dropout", "dense_map", "reshape"]
GRAPH_CHOICES = CHAIN_CHOICES + ["residual", "residual", "residual", "concat", "concat", "se", "se", "se",
                                 "merge_skip", "merge_skip", "spatial_concat", "scale_op", "scale_op", "shared",
                                 "gated_merge", "attention", "ops_act"]
BLOCKS = {**CHAIN_BLOCKS, **GRAPH_BLOCKS}


def _head(b, draw, x) -> str:
    kind = draw(st.sampled_from(["gap", "gap_dense", "flatten", "gmp", "gap_bn"]))
    out = draw(st.integers(2, 5))
    if kind == "flatten":
        y = b.layer(f"layers.Flatten(name={b.fresh('flat')!r}{b.fmt})", x)
    elif kind == "gmp":
        y = b.layer(f"layers.GlobalMaxPooling{b.D}(name={b.fresh('gmp')!r}{b.fmt})", x)
    else:
        y = b.layer(f"layers.GlobalAveragePooling{b.D}(name={b.fresh('gap')!r}{b.fmt})", x)
    if kind == "gap_dense":
        y = b.layer(f"layers.Dense({draw(st.integers(1, MAX_CH))}, activation={draw(ACTS)!r}, name={b.fresh('fc')!r})", y)
    elif kind == "gap_bn":
        y = b.layer(f"layers.Dense({draw(st.integers(1, MAX_CH))}, use_bias=False, name={b.fresh('fc')!r})", y)
        y = b.layer(_bn_expr(b, draw), y)
        y = b.layer(f"layers.ReLU(name={b.fresh('fc_relu')!r})", y)
    return b.layer(f"layers.Dense({out}, name={b.fresh('logits')!r})", y)


# --------------------------------------------------------------------------
# The drawn case.
# --------------------------------------------------------------------------


@dataclass
class Case:
    source: str
    input_shape: tuple
    seed: int
    percent: int  # share of prunable groups to try to remove
    pick_seed: int
    kinds: list = field(default_factory=list)

    def __repr__(self):
        return (
            f"Case(input_shape={self.input_shape}, seed={self.seed}, percent={self.percent}, "
            f"pick_seed={self.pick_seed}, kinds={self.kinds}) with source:\n{self.source}"
        )


@st.composite
def cases(draw):
    rank = draw(st.sampled_from([2, 2, 2, 2, 1]))
    sequential = draw(st.integers(0, 7)) == 0
    channels_first = rank == 2 and draw(st.integers(0, 5)) == 0
    b = _Builder(rank, sequential, channels_first)
    if rank == 2:
        spatial = draw(st.sampled_from([(8, 8), (6, 6), (7, 5)]))
    else:
        spatial = (draw(st.sampled_from([12, 9, 16])),)
    cin = draw(st.integers(1, 3))
    shape = (cin, *spatial) if channels_first else (*spatial, cin)
    b.run(f'inputs = keras.Input({shape}, name="x")')
    x = "inputs"
    choices = CHAIN_CHOICES if sequential else GRAPH_CHOICES
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(choices))
        b.kinds.append(kind)
        x = BLOCKS[kind](b, draw, x)
    outputs = [_head(b, draw, x)]
    if not sequential and len(b.pool) > 2 and draw(st.integers(0, 5)) == 0:
        # An auxiliary output: a raw feature map (its channels are kept) or a small head.
        v = draw(st.sampled_from([v for v in b.pool[1:] if v != outputs[0] and len(b.shape(v)) == rank + 1]))
        if draw(st.booleans()):
            b.kinds.append("aux_raw")
            outputs.append(v)
        else:
            b.kinds.append("aux_head")
            g = b.layer(f"layers.GlobalAveragePooling{b.D}(name={b.fresh('aux_gap')!r}{b.fmt})", v)
            outputs.append(b.layer(f"layers.Dense(2, name={b.fresh('aux')!r})", g))
    if sequential:
        b.kinds.append("sequential")
    if channels_first:
        b.kinds.append("channels_first")
    return Case(
        source=b.source(outputs),
        input_shape=shape,
        seed=draw(st.integers(0, 2**16)),
        percent=draw(st.sampled_from([30, 50, 100, 10, 70, 30, 50, 0])),
        pick_seed=draw(st.integers(0, 2**16)),
        kinds=b.kinds,
    )


# --------------------------------------------------------------------------
# The property.
# --------------------------------------------------------------------------


def build(source: str, seed: int) -> keras.Model:
    """Executes model source with a fixed seed; random BN statistics, biases and PReLU slopes."""
    keras.utils.set_random_seed(seed)
    ns = _namespace()
    exec(source, ns)
    model = ns["model"]
    randomize_bn(model, seed)
    rng = np.random.default_rng(seed + 1)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            continue
        names = [v.name.split("/")[-1] for v in layer.weights]
        if not any(n in ("bias", "alpha") for n in names):
            continue
        layer.set_weights(
            [
                rng.normal(0.0, 0.5, w.shape).astype(w.dtype) if n in ("bias", "alpha") else w
                for n, w in zip(names, layer.get_weights())
            ]
        )
    return model


def pick_groups(graph, percent: int, seed: int) -> set:
    """About `percent`% of the groups, greedily skipping any that would empty a layer."""
    target = int(np.ceil(percent / 100 * graph.num_groups))
    removed: set = set()
    for g in np.random.default_rng(seed).permutation(graph.num_groups).tolist():
        if len(removed) >= target:
            break
        trial = removed | {int(g)}
        if min(graph.layer_channel_counts(trial).values(), default=1) > 0:
            removed = trial
    return removed


def zero_gates(gated, graph, removed) -> None:
    for layer in gated.layers:
        if isinstance(layer, kt.ChannelGate):
            of = graph.groups_of_layer_output(layer.name)
            layer.gate.assign(np.where(np.isin(of, list(removed)), 0.0, 1.0).astype("float32"))


def _outputs(model, x) -> list:
    out = model(x, training=False)
    return [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]


def check(case: Case) -> dict:
    """The fuzz property; returns a few facts about the example."""
    note(repr(case))
    model = build(case.source, case.seed)
    x = np.random.default_rng(case.seed).uniform(-1, 1, (3, *case.input_shape)).astype("float32")
    before = [w.copy() for w in model.get_weights()]
    reference = _outputs(model, x)

    if kt.analyze(model).num_groups == 0:
        with pytest.raises(ValueError, match="Expected a model with prunable channels"):
            kt.add_gates(model)  # nothing prunable: said at add_gates, with the reason
        return {"groups": 0, "removed": 0}
    gated = kt.add_gates(model)
    for a, r in zip(_outputs(gated, x), reference):
        assert rel_err(a, r) <= 1e-6, "the gated model (gates at 1) differs from the model"
    graph = kt.analyze(gated)
    removed = pick_groups(graph, case.percent, case.pick_seed)
    note(f"num_groups={graph.num_groups} removed={sorted(removed)}")
    assert all(v > 0 for v in graph.layer_channel_counts(removed).values())
    zero_gates(gated, graph, removed)

    pruned = kt.prune(gated)
    masked = _outputs(gated, x)
    got = _outputs(pruned, x)
    assert len(got) == len(masked)
    changed = any(rel_err(m, r) > 1e-4 for m, r in zip(masked, reference))
    for i, (p, m) in enumerate(zip(got, masked)):
        assert p.shape == m.shape, f"output {i}: shape {p.shape} != {m.shape}"
        err = rel_err(p, m)
        assert err <= 1e-5, f"output {i}: pruned differs from masked gated model, rel_err={err:.3g}"

    assert type(pruned) is type(model)
    assert not any(getattr(l, "is_channel_gate", False) for l in pruned.layers)
    p_model, p_gated, p_pruned = kt.profile(model), kt.profile(gated), kt.profile(pruned)
    assert p_pruned.flops <= p_model.flops
    assert pruned.count_params() <= model.count_params()
    if removed:
        assert pruned.count_params() < model.count_params()
    assert p_pruned.params == pruned.count_params()
    assert p_gated.flops == p_pruned.flops and p_gated.params == p_pruned.params
    # The user's model is untouched.
    for a, w in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, w)
    return {"groups": graph.num_groups, "removed": len(removed), "changed": changed}


def _events(case: Case, facts: dict) -> None:
    for kind in sorted(set(case.kinds)):
        event(f"block {kind}")
    event("no prunable groups" if facts["groups"] == 0 else ("nothing removed" if facts["removed"] == 0 else "groups removed"))
    if facts.get("changed"):
        event("masking changed the output (the check is not vacuous)")


HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]


# No shrinking here: a failure is reported at once with its full model source
# (shrinking these examples can take minutes); the exhaustive run shrinks.
@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=HEALTH,
)
@given(case=cases())
def test_fuzz_pruned_equals_masked(case):
    _events(case, check(case))


@pytest.mark.exhaustive
@settings(max_examples=500, deadline=None, suppress_health_check=HEALTH)
@given(case=cases())
def test_fuzz_pruned_equals_masked_exhaustive(case):
    _events(case, check(case))
