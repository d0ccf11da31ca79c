"""Scoring under `keras.mixed_precision` ("mixed_float16", "mixed_bfloat16").

Gate variables are float32 (`autocast=False`), so the tape's gate gradients
are float32 sums of 16-bit parameter gradients; the scorer casts them to
float32 before `segment_sum`, squares in float32 and accumulates into float32
variables. What 16-bit compute changes is the gradients themselves. The tests
measure how much against a float32 copy of the same model with the same
weights and batches (SGD with learning rate 0: the weights do not move), and
against an independent GradientTape on the same mixed-precision model with the
same loss scale ("same policy"), which isolates the scorer (grouping,
unscaling, skipping, float32 accumulation) from 16-bit arithmetic.

Measured on the conftest residual model (36 groups, 6 batches of 8; TF 2.21
CPU, Keras 3.15). err = max|score - ref| / max ref (`conftest.rel_err`);
overlap = shared fraction of the 9 lowest-scored groups (lowest 25%):

                        seed 0 (tested)           worst of seeds 0-9
    mixed_float16   err 3.1e-3, rho 0.9977,   err 1.5e-2, rho 0.9964,
                    overlap 8/9, same 3.2e-5  overlap 8/9, same 3.2e-5
    mixed_bfloat16  err 6.0e-3, rho 0.9964,   err 3.0e-2, rho 0.9905,
                    overlap 8/9, same 3.7e-6  overlap 8/9, same 3.7e-6

    loss x2000 (seed 0 tested; worst of seeds 0-4):
    mixed_float16   16 batches, 13 skipped, 3 counted (all growth steps),
                    max score 4.2e5; err 4.8e-3, rho 0.9997, overlap 9/9,
                    same 1.5e-8.  Worst: err 1.1e-2, rho 0.9982, overlap
                    8/9, same 6.7e-4
    mixed_bfloat16  max score 5.5e5; err 5.2e-3, rho 0.9961, overlap 8/9,
                    same 3.9e-8.  Worst: err 1.9e-2, rho 0.9959, overlap 8/9

Tolerances, about 3x the worst of those runs (10-16x the tested seed):
float32 err <= 0.05 (float16), 0.1 (bfloat16); Spearman >= 0.98 (2x the
worst 1 - rho); low-25% overlap >= 0.75 (at most 2 of 9 differ; worst seen
1). Same policy err <= 5e-3 (7x the worst; the differences are eager versus
compiled 16-bit kernels). The loss-scale defects this file guards against
give 0.75 (a step unscaled with the scale the step leaves behind is off 4x).
"""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.stats import spearmanr

import keras_taylor as kt
from conftest import images, make, rel_err

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
POLICIES = ("mixed_float16", "mixed_bfloat16")
FP16_MAX = 65504.0
# Tolerances: see the module docstring for the measurements behind them.
SAME_POLICY_TOL = 5e-3
FLOAT32_TOL = {"mixed_float16": 0.05, "mixed_bfloat16": 0.1}
SPEARMAN_MIN = 0.98
OVERLAP_MIN = 0.75


@pytest.fixture
def policy(request):
    """Sets the global dtype policy; restores the previous policy and floatx."""
    prev_policy, prev_floatx = keras.config.dtype_policy(), keras.config.floatx()
    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy(request.param)
    try:
        yield request.param
    finally:
        keras.config.set_dtype_policy(prev_policy)
        keras.config.set_floatx(prev_floatx)
        keras.backend.clear_session()


@contextlib.contextmanager
def float32_policy():
    prev = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(prev)


def data(n, seed=0, classes=5):
    return images(n, seed), np.random.default_rng(seed).integers(0, classes, n)


def scaled_loss(factor):
    return (lambda y_true, y_pred: factor * LOSS(y_true, y_pred)) if factor != 1.0 else LOSS


def loss_scale(optimizer):
    """The loss scale the next step uses (a LossScaleOptimizer is built in the first step)."""
    if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return 1.0
    if not optimizer.built:
        return float(optimizer.initial_scale)
    return float(keras.ops.convert_to_numpy(optimizer.dynamic_scale))


class Recorder(keras.callbacks.Callback):
    """Per batch: whether the scorer counted it, and the loss scale before/after."""

    def __init__(self, pruner):
        super().__init__()
        self.pruner = pruner
        self.counted, self.scale_before, self.scale_after = [], [], []
        self._last = 0.0

    def on_train_batch_begin(self, batch, logs=None):
        self.scale_before.append(loss_scale(self.model.optimizer))

    def on_train_batch_end(self, batch, logs=None):
        steps = float(keras.ops.convert_to_numpy(self.pruner.scorer.steps))
        self.counted.append(steps > self._last)
        self._last = steps
        self.scale_after.append(loss_scale(self.model.optimizer))

    @property
    def applied(self):
        """Batches the optimizer applied (a LossScaleOptimizer halves its scale when it skips one)."""
        return [after >= before for before, after in zip(self.scale_before, self.scale_after)]


def mean_scores(gated, x, y, batch, loss_fn, counted, scales=None):
    """Independent GradientTape: (sum over a group's members of dL/dm)^2 in
    float64, averaged over the counted batches (batch b's loss scaled by scales[b])."""
    graph = kt.analyze(gated)
    gl = [l for l in gated.layers if isinstance(l, kt.ChannelGate)]
    out = []
    for b, i in enumerate(range(0, len(x), batch)):
        if not counted[b]:
            continue
        scale = 1.0 if scales is None else scales[b]
        with tf.GradientTape() as tape:
            for l in gl:
                tape.watch(l.gate.value)
            loss = scale * loss_fn(y[i : i + batch], gated(x[i : i + batch], training=True))
        grads = tape.gradient(loss, [l.gate.value for l in gl])
        group_grad = np.zeros(graph.num_groups)
        for layer, g in zip(gl, grads):
            groups = graph.groups_of_layer_output(layer.name)
            np.add.at(group_grad, groups[groups >= 0], g.numpy().astype("float64")[groups >= 0] / scale)
        out.append(group_grad**2)
    return np.mean(out, axis=0)


def float32_reference(gated, x, y, batch, loss_fn, counted):
    """Mean scores of a float32 copy of `gated` with the same weights."""
    with float32_policy():
        ref = kt.add_gates(make("residual"))
        ref.set_weights(gated.get_weights())
        assert all(v.dtype == "float32" for v in ref.weights)
        return mean_scores(ref, x, y, batch, loss_fn, counted)


def low_overlap(a, b, fraction=0.25):
    k = max(1, int(len(a) * fraction))
    return len(set(np.argsort(a)[:k]) & set(np.argsort(b)[:k])) / k


def fit_scoring(gated, x, y, batch, loss_fn, optimizer=None):
    gated.compile(optimizer=optimizer or keras.optimizers.SGD(0.0), loss=loss_fn)
    pruner = kt.TaylorPruning(target=0.5, prune_every=10_000)  # scores, never prunes
    rec = Recorder(pruner)
    gated.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0, callbacks=[pruner, rec])
    assert pruner.history == [] and pruner.removed == []
    return pruner.scorer, rec


def accumulator_variables(scorer):
    """The float state the scorer accumulates into (wherever it lives)."""
    found = [v for v in vars(scorer).values() if isinstance(v, keras.Variable)]
    for gate in scorer.gates:
        inner = {id(v) for v in gate.layer.weights}
        found += [v for v in gate.weights if id(v) not in inner]
    return found


@pytest.mark.parametrize("policy", POLICIES, indirect=True)
def test_scores_accumulate_in_float32_and_rank_like_float32(policy):
    gated = kt.add_gates(make("residual"))
    assert gated.dtype_policy.name == policy and gated.compute_dtype != "float32"
    x, y = data(48)
    scorer, rec = fit_scoring(gated, x, y, 8, LOSS)
    # mixed_float16: compile wrapped the optimizer in a LossScaleOptimizer.
    assert isinstance(gated.optimizer, keras.optimizers.LossScaleOptimizer) == (policy == "mixed_float16")
    for v in accumulator_variables(scorer):
        assert v.dtype == "float32", v.path
    scores, steps = scorer.read()
    assert np.all(np.isfinite(scores)) and np.all(scores >= 0)
    assert rec.counted == rec.applied and steps == sum(rec.counted) >= 4
    # Same policy, independent tape (same loss scale): the in-graph grouping,
    # unscaling and float32 accumulation add no error of their own.
    same = mean_scores(gated, x, y, 8, LOSS, rec.counted, rec.scale_before)
    same_err = rel_err(scores, same)
    # Float32 model, same weights and batches: the error of computing in 16 bits.
    ref = float32_reference(gated, x, y, 8, LOSS, rec.counted)
    err = rel_err(scores, ref)
    rho = spearmanr(scores, ref).statistic
    overlap = low_overlap(scores, ref)
    print(f"\n{policy}: same-policy err {same_err:.2e}, float32 err {err:.2e}, spearman {rho:.4f}, low-25% overlap {overlap:.3f}")
    assert same_err <= SAME_POLICY_TOL
    assert err <= FLOAT32_TOL[policy]
    assert rho >= SPEARMAN_MIN
    assert overlap >= OVERLAP_MIN


@pytest.mark.parametrize("policy", POLICIES, indirect=True)
def test_group_sums_and_squares_in_float32(policy):
    """16-bit gate gradients whose group sum (and square) exceed float16's range.

    Summing the 3 members of a residual group in float16 gives Inf (the batch
    would be skipped); the scorer casts to float32 before `segment_sum`.
    """
    dtype = keras.config.dtype_policy().compute_dtype
    gated = kt.add_gates(make("residual"))
    graph = kt.analyze(gated)
    scorer = kt.TaylorScorer(gated, graph)
    gl = [l for l in gated.layers if isinstance(l, kt.ChannelGate)]
    value = 2.0**15  # exact in float16 and bfloat16; 3 members sum to 98304 > 65504
    scorer.accumulate([tf.fill((l.channels,), tf.constant(value, dtype)) for l in gl])
    scores, steps = scorer.read()
    members = np.array([len(m) for m in graph.group_members()], "float64")
    assert steps == 1 and members.max() >= 3
    np.testing.assert_allclose(scores, (value * members) ** 2, rtol=1e-6)
    assert scores.max() > FP16_MAX**2
    # A 16-bit Inf skips the batch.
    scorer.accumulate([tf.fill((l.channels,), tf.constant(np.inf, dtype)) for l in gl])
    assert scorer.read()[1] == 1 and float(keras.ops.convert_to_numpy(scorer.skipped)) == 1


@pytest.mark.parametrize("policy", POLICIES, indirect=True)
def test_large_gradients_do_not_overflow_and_overflow_steps_count_nothing(policy):
    """Loss x2000: group gradients ~700, squares up to ~5e5 > float16's 65504.

    mixed_float16 runs a LossScaleOptimizer that doubles its scale after every
    finite step (`dynamic_growth_steps=1`): from the default 2**15 the scaled
    gradients overflow float16 for the first ten steps, which it skips,
    halving the scale down to 32; then growth steps (scale doubled inside the
    step) alternate with more overflow steps. The scorer must count exactly the
    steps the optimizer applies, and unscale each by the scale its gradients
    carry, not the scale the step leaves behind.
    """
    gated = kt.add_gates(make("residual"))
    loss = scaled_loss(2000.0)
    fp16 = policy == "mixed_float16"
    x, y = data(128 if fp16 else 48)
    opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.0), dynamic_growth_steps=1) if fp16 else None
    scorer, rec = fit_scoring(gated, x, y, 8, loss, opt)
    scores, steps = scorer.read()
    skipped = float(keras.ops.convert_to_numpy(scorer.skipped))
    assert np.all(np.isfinite(scores)) and scores.max() > FP16_MAX
    assert rec.counted == rec.applied and steps == sum(rec.counted) and skipped == len(rec.counted) - steps
    if fp16:
        grew = [c and after > before for c, before, after in zip(rec.counted, rec.scale_before, rec.scale_after)]
        assert skipped >= 5 and steps >= 2 and any(grew)
    same = mean_scores(gated, x, y, 8, loss, rec.counted, rec.scale_before)
    ref = float32_reference(gated, x, y, 8, loss, rec.counted)
    same_err, err = rel_err(scores, same), rel_err(scores, ref)
    rho, overlap = spearmanr(scores, ref).statistic, low_overlap(scores, ref)
    print(
        f"\n{policy} x2000: steps {steps:.0f} skipped {skipped:.0f} max score {scores.max():.3g}, same-policy err "
        f"{same_err:.2e}, float32 err {err:.2e}, spearman {rho:.4f}, low-25% overlap {overlap:.3f}"
    )
    assert same_err <= SAME_POLICY_TOL
    assert err <= FLOAT32_TOL[policy]
    assert rho >= SPEARMAN_MIN
    assert overlap >= OVERLAP_MIN
