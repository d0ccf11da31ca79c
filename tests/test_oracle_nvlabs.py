"""The NVlabs oracle (`definition="nvlabs"`): mean over training minibatches of
|ΔL_b| in training mode, and the NViT-style correlation summaries."""

import json

import keras
import numpy as np
import pytest
from conftest import images, make

import keras_taylor as kt
from keras_taylor import oracle

N, BATCH = 20, 8  # 3 minibatches of sizes 8, 8, 4: each counts once in the mean


def loss_fn():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def gated_model(name="residual", seed=0):
    gated = kt.add_gates(make(name, seed))
    gated.compile(loss=loss_fn())
    return gated


def train_batches(seed=0, classes=5):
    return images(N, seed), np.random.default_rng(seed + 1).integers(0, classes, N)


def snapshot(model):
    return [np.array(v.numpy()) for v in model.variables + model.metrics_variables]


def direct_loop(gated, x, y):
    """The oracle of NVlabs' `run_full_oracle` written out: per minibatch, per
    group, zero the group's gates, rerun the minibatch in training mode,
    |L_b - L_b(g=0)|; then the mean over minibatches."""
    graph = kt.analyze(gated)
    gate_layers = kt.gates.gate_layers(gated)
    original = [np.array(l.gate.numpy()) for l in gate_layers]
    saved = [np.array(v.numpy()) for v in gated.non_trainable_variables]
    loss = loss_fn()
    per_batch = []
    for i in range(0, len(x), BATCH):
        xb, yb = x[i : i + BATCH], y[i : i + BATCH]
        base = float(loss(yb, gated(xb, training=True)))
        row = []
        for g in range(graph.num_groups):
            for layer, value in zip(gate_layers, original):
                member = graph.groups_of_layer_output(layer.name) == g
                layer.gate.assign(np.where(member, 0.0, value).astype("float32"))
            row.append(abs(float(loss(yb, gated(xb, training=True))) - base))
            for layer, value in zip(gate_layers, original):
                layer.gate.assign(value)
        per_batch.append(row)
    for v, value in zip(gated.non_trainable_variables, saved):
        v.assign(value)
    return np.mean(np.array(per_batch), axis=0)


@pytest.mark.parametrize("name", ["residual", "plain"])
def test_nvlabs_equals_direct_per_batch_loop(name):
    gated = gated_model(name)
    if name == "plain":  # Dropout draws new masks per call in training mode: not comparable
        gated.get_layer("drop").rate = 0.0
    x, y = train_batches()
    expected = direct_loop(gated, x, y)
    before = snapshot(gated)
    got = oracle.oracle_deltas(gated, (x, y), batch_size=BATCH, definition="nvlabs", progress=False)
    assert got.shape == (kt.analyze(gated).num_groups,)
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-6)
    assert np.all(got >= 0) and np.any(got > 0)
    after = snapshot(gated)  # gates, BN moving statistics, metrics all put back
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


def test_nvlabs_is_mean_of_abs_not_abs_of_pooled():
    """The two definitions differ: per-batch |ΔL_b| in training mode vs the
    pooled held-out ΔL in inference mode, on the same data."""
    gated = gated_model()
    x, y = train_batches()
    nv = oracle.oracle_deltas(gated, (x, y), batch_size=BATCH, definition="nvlabs", progress=False)
    held = oracle.oracle_deltas(gated, (x, y), batch_size=BATCH, progress=False)
    assert np.any(held < 0) or not np.allclose(nv, np.abs(held), rtol=1e-3)
    # One minibatch: mean over batches = that batch's |ΔL| (training mode)
    one = oracle.oracle_deltas(gated, (x[:BATCH], y[:BATCH]), batch_size=BATCH, definition="nvlabs", progress=False)
    np.testing.assert_allclose(one, direct_loop(gated, x[:BATCH], y[:BATCH]), rtol=2e-4, atol=1e-6)


def test_pruned_groups_are_nan():
    gated = gated_model()
    graph = kt.analyze(gated)
    first = graph.groups_of_layer_output(kt.gates.gate_layers(gated)[0].name)
    dead = int(first[first >= 0][0])
    for layer in kt.gates.gate_layers(gated):  # every member gate of the group
        groups = graph.groups_of_layer_output(layer.name)
        layer.gate.assign(np.where(groups == dead, 0.0, 1.0).astype("float32"))
    got = oracle.oracle_deltas(gated, train_batches(), batch_size=BATCH, definition="nvlabs", progress=False)
    assert np.isnan(got[dead]) and np.isfinite(np.delete(got, dead)).all()


def test_cache_distinguishes_definitions(tmp_path):
    gated = gated_model()
    data = train_batches()
    path = tmp_path / "oracle.npz"
    held = oracle.oracle_deltas(gated, data, batch_size=BATCH, cache=str(path), progress=False)
    nv = oracle.oracle_deltas(gated, data, batch_size=BATCH, cache=str(path), definition="nvlabs", progress=False)
    assert not np.allclose(nv, held, equal_nan=True)  # not the held-out file read back
    again = oracle.oracle_deltas(gated, data, batch_size=BATCH, cache=str(path), definition="nvlabs", progress=False)
    np.testing.assert_array_equal(again, nv)


def test_unknown_definition_raises_before_work():
    gated = gated_model()
    before = snapshot(gated)
    with pytest.raises(ValueError, match=r"definition in \('heldout', 'nvlabs'\).*'pooled'"):
        oracle.oracle_deltas(gated, train_batches(), definition="pooled")
    for a, b in zip(before, snapshot(gated)):
        np.testing.assert_array_equal(a, b)


# ---- the NViT-style summaries ---------------------------------------------------------
def test_pearson_and_layer_mean_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    o, s = rng.normal(size=45), rng.gamma(2.0, size=45)
    labels = [f"l{i % 3}" for i in range(45)]
    r = oracle.rank_correlations({"s": s}, o, labels)["s"]
    assert r["pearson"] == pytest.approx(stats.pearsonr(s, np.abs(o)).statistic, abs=1e-12)
    per = {}
    for k in ("l0", "l1", "l2"):
        sel = np.array(labels) == k
        per[k] = (stats.spearmanr(s[sel], np.abs(o[sel])).statistic, stats.kendalltau(s[sel], np.abs(o[sel])).statistic,
                  stats.pearsonr(s[sel], np.abs(o[sel])).statistic)
        assert r["per_layer"][k]["pearson"] == pytest.approx(per[k][2], abs=1e-12)
    for j, stat in enumerate(("spearman", "kendall", "pearson")):
        assert r["layer_mean"][stat] == pytest.approx(np.mean([v[j] for v in per.values()]), abs=1e-12)
    json.dumps(r, allow_nan=False)


def test_layer_mean_hand_made_and_constant_layer():
    # layer a: perfect (+1), layer b: reversed (-1), layer c: constant score -> NaN, left out of the mean
    o = np.array([1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 1.0, 2.0, 3.0])
    s = np.array([2.0, 4.0, 6.0, 3.0, 2.0, 1.0, 5.0, 5.0, 5.0])
    r = oracle.rank_correlations({"c": s}, o, ["a"] * 3 + ["b"] * 3 + ["c"] * 3)["c"]
    assert r["per_layer"]["a"]["spearman"] == pytest.approx(1.0)
    assert r["per_layer"]["b"]["pearson"] == pytest.approx(-1.0)
    assert np.isnan(r["per_layer"]["c"]["pearson"]) and np.isnan(r["per_layer"]["c"]["spearman"])
    for stat in ("spearman", "kendall", "pearson"):
        assert r["layer_mean"][stat] == pytest.approx(0.0, abs=1e-12)
