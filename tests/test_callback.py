"""Scoring inside fit, and global iterative pruning."""

import json
import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_taylor as kt
from keras_taylor import testing
from conftest import images, make, rel_err

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def data(n=48, seed=0, classes=5):
    rng = np.random.default_rng(seed)
    return images(n, seed), rng.integers(0, classes, n)


def reference_scores(gated, graph, x, y, batch):
    """Independent (dL/dm)^2 per group, summed over members, averaged over batches."""
    return testing.reference_scores(gated, x, y, batch, LOSS, graph)


@pytest.mark.parametrize("spe,jit", [(1, False), (3, False), (1, True), (2, True)])
def test_accumulated_score_equals_independent_tape(spe, jit):
    model = make("residual")
    gated = kt.add_gates(model)
    x, y = data(48)
    # lr=0: the weights the reference sees are those the fit saw.
    gated.compile(optimizer=keras.optimizers.SGD(0.0), loss=LOSS, steps_per_execution=spe, jit_compile=jit)
    pruner = kt.TaylorPruning(target=0.5, prune_every=10_000)
    gated.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[pruner])
    scores, steps = pruner.scorer.read()
    assert steps == 6
    graph = kt.analyze(gated)
    ref = reference_scores(gated, graph, x, y, 8)
    assert any(len(m) > 1 for m in graph.group_members()), "needs residual groups"
    # Relative to the largest score (float32 accumulation).
    assert rel_err(scores, ref) <= 1e-5
    big = ref > 1e-3 * ref.max()
    assert np.max(np.abs(scores[big] - ref[big]) / ref[big]) <= 1e-4


def test_group_score_is_square_of_summed_member_gradients():
    """A residual group scores (sum of gradients)^2, not the sum of squares."""
    model = make("residual")
    gated = kt.add_gates(model)
    graph = kt.analyze(gated)
    x, y = data(8)
    gate_layers = [l for l in gated.layers if isinstance(l, kt.ChannelGate)]
    scorer = kt.TaylorScorer(gated, graph)
    with tf.GradientTape() as tape:
        for l in gate_layers:
            tape.watch(l.gate.value)
        loss = LOSS(y, gated(x, training=True))
    grads = tape.gradient(loss, [l.gate.value for l in gate_layers])
    scorer.accumulate(grads)
    scores, _ = scorer.read()
    g = next(i for i, m in enumerate(graph.group_members()) if len(m) == 3)
    by_layer = dict(zip([l.name for l in gate_layers], grads))
    members = [float(by_layer[name][ch]) for name, ch in graph.group_members()[g]]
    assert scores[g] == pytest.approx(sum(members) ** 2, rel=1e-5)
    assert scores[g] != pytest.approx(sum(v * v for v in members), rel=1e-3)


def test_iterative_pruning_reaches_target_and_pruned_stay_zero(caplog):
    model = make("vgg_sequential")
    gated = kt.add_gates(model)
    x, y = data(64)
    gated.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss=LOSS, steps_per_execution=2)
    pruner = kt.TaylorPruning(target=0.6, prune_every=2, channels_per_step=2, min_channels=2)
    history = {}

    class Spy(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            history.setdefault("logs", []).append(dict(logs))

    with caplog.at_level(logging.INFO, logger="keras_taylor"):
        gated.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[pruner, Spy()])
    assert pruner.done
    fractions = [h["flops_fraction"] for h in pruner.history]
    assert fractions == sorted(fractions, reverse=True)
    assert fractions[-1] <= 0.6 < fractions[-2]
    assert all(h["removed"] <= 2 for h in pruner.history)
    assert "kt_flops" in history["logs"][-1] and history["logs"][-1]["kt_flops"] <= 0.6
    assert any("removed" in r.getMessage() for r in caplog.records)
    # min_channels holds for every Conv/Dense.
    counts = kt.analyze(gated).layer_channel_counts(pruner.removed)
    assert min(counts.values()) >= 2
    # Gates of removed groups are exactly 0 and nothing revives them.
    zero_before = {k: v == 0 for k, v in kt.gate_values(gated).items()}
    assert sum(int(v.sum()) for v in zero_before.values()) > 0
    gated.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[pruner])
    for name, v in kt.gate_values(gated).items():
        assert np.all(v[zero_before[name]] == 0)
    probe = keras.Model(gated.inputs, gated.get_layer("bn0a").output)
    out = probe(x[:4], training=True).numpy()
    assert np.all(out[..., zero_before["bn0a"]] == 0)
    # The plan matches the gates; surgery gives the same function and FLOPs.
    plan = pruner.plan
    assert plan.to_dict() == kt.PruningPlan.from_gates(gated).to_dict()
    pruned = kt.prune(gated)
    assert rel_err(pruned(x[:4]), gated(x[:4])) <= 1e-5
    assert kt.profile(pruned).flops / kt.profile(model).flops == pytest.approx(fractions[-1])
    # State is plain data.
    state = json.loads(json.dumps(pruner.state()))
    assert state["done"] and len(state["removed_groups"]) == len(pruner.removed)
    # After pruning finished, fit runs the model's own train function again.
    assert "train_step" not in vars(gated)
    assert gated.train_function is not pruner.scorer._scoring_function


def test_ema_and_global_ranking():
    """Lowest EMA is removed first across layers; EMA = 0.9*old + 0.1*new."""
    model = make("plain")
    gated = kt.add_gates(model)
    gated.compile(optimizer="sgd", loss=LOSS)
    pruner = kt.TaylorPruning(target=0.01, prune_every=1, channels_per_step=1, momentum=0.9)
    pruner.set_model(gated)
    pruner._setup()
    n = pruner.graph.num_groups
    first = np.linspace(1.0, 2.0, n)
    first[7] = 0.01  # the global minimum, wherever its layer is
    pruner.scorer.write_window(first, 1.0)
    pruner._prune_step()
    assert pruner.removed == [7]
    second = np.full(n, 10.0)
    second[3] = 0.0
    pruner.scorer.write_window(second, 1.0)
    pruner._prune_step()
    expected = 0.9 * first + 0.1 * second
    np.testing.assert_allclose(pruner.ema, expected, rtol=1e-6)
    # The EMA is stored in the gates (float32) and reads back the same.
    np.testing.assert_allclose(pruner.scorer.read_ema(), expected, rtol=1e-6)
    assert pruner.removed == [7, int(np.argmin(np.where(np.arange(n) == 7, np.inf, expected)))]


def test_nan_batches_are_skipped():
    model = make("plain")
    gated = kt.add_gates(model)
    graph = kt.analyze(gated)
    scorer = kt.TaylorScorer(gated, graph)
    gl = [l for l in gated.layers if isinstance(l, kt.ChannelGate)]
    good = [tf.ones((l.channels,)) for l in gl]
    bad = [tf.fill((l.channels,), np.nan) for l in gl]
    scorer.accumulate(good)
    scorer.accumulate(bad)
    scores, steps = scorer.read()
    assert steps == 1 and np.all(np.isfinite(scores))
    assert float(scorer.skipped.numpy()) == 1.0


def test_bad_arguments_and_ungated_model():
    for kwargs, match in [
        ({"target": 0.0}, "target in"),
        ({"target": 1.5}, "target in"),
        ({"metric": "energy"}, "metric in"),  # "latency" is a metric now (needs latency=)
        ({"prune_every": 0}, "prune_every"),
        ({"min_channels": 0}, "min_channels"),
        ({"channels_per_step": 0}, "channels_per_step"),
        ({"momentum": 1.0}, "momentum"),
    ]:
        with pytest.raises(ValueError, match=match):
            kt.TaylorPruning(**kwargs)
    model = make("plain")
    model.compile(optimizer="sgd", loss=LOSS)
    x, y = data(8)
    with pytest.raises(ValueError, match="Expected a gated model"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[kt.TaylorPruning()])


def test_params_and_channels_targets():
    for metric in ("params", "channels"):
        gated = kt.add_gates(make("plain"))
        pruner = kt.TaylorPruning(target=0.7, metric=metric, prune_every=1, channels_per_step=3)
        gated.compile(optimizer="sgd", loss=LOSS)
        x, y = data(64)
        gated.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[pruner])
        assert pruner.done
        assert pruner.history[-1][f"{metric}_fraction"] <= 0.7


def test_scoring_function_is_reused_across_fits_and_rebuilt_on_recompile():
    gated = kt.add_gates(make("plain"))
    gated.compile(optimizer="sgd", loss=LOSS)
    pruner = kt.TaylorPruning(target=0.5, prune_every=10_000)
    x, y = data(16)
    gated.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[pruner])
    first = pruner.scorer._scoring_function
    gated.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[pruner])
    assert pruner.scorer._scoring_function is first
    assert float(pruner.scorer.steps.numpy()) == 4
    gated.compile(optimizer="adam", loss=LOSS)
    gated.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[pruner])
    assert pruner.scorer._scoring_function is not first
    assert float(pruner.scorer.steps.numpy()) == 6


def test_loss_scaling_is_undone():
    """With a LossScaleOptimizer the scores equal those of the unscaled loss."""
    x, y = data(16)
    scores = []
    for opt in (keras.optimizers.SGD(0.0), keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.0), initial_scale=1024.0)):
        gated = kt.add_gates(make("residual"))
        gated.compile(optimizer=opt, loss=LOSS)
        pruner = kt.TaylorPruning(target=0.5, prune_every=10_000)
        gated.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[pruner])
        scores.append(pruner.scorer.read()[0])
    assert rel_err(scores[1], scores[0]) <= 1e-5


def test_non_finite_batches_warn_once_and_never_reach_the_ranking(caplog):
    """A NaN loss batch in fit: nothing added to the scores, one warning, finite EMA."""
    model = make("plain")
    gated = kt.add_gates(model)
    # LossScaleOptimizer skips non-finite steps, so the NaN does not spread into the weights.
    gated.compile(optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.01)), loss=LOSS)
    x, y = data(32)
    x[8:16] = np.nan  # the second minibatch of every epoch
    pruner = kt.TaylorPruning(target=0.2, prune_every=2, channels_per_step=1)
    with caplog.at_level(logging.WARNING, logger="keras_taylor"):
        gated.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[pruner])
    warnings = [r for r in caplog.records if "NaN/Inf" in r.getMessage()]
    assert len(warnings) == 1
    assert pruner.scorer.counters()["skipped"] == 2
    assert pruner.history and np.all(np.isfinite(pruner.ema))
