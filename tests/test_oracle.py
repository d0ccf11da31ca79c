"""The oracle tool: ΔL per channel group (CVPR'19) and rank correlations."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import images, make, randomize_bn

import keras_taylor as kt
from keras_taylor import oracle

N, BATCH = 20, 8  # 3 batches of sizes 8, 8, 4: the loss must weight them by size


def loss_fn():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def gated_model(name, seed=0):
    gated = kt.add_gates(make(name, seed))
    gated.compile(loss=loss_fn())
    return gated


def held_out(seed=0, classes=5):
    return images(N, seed), np.random.default_rng(seed + 1).integers(0, classes, N)


def snapshot(model):
    return [np.array(v.numpy()) for v in model.variables + model.metrics_variables]


def assert_same(before, after):
    assert len(before) == len(after)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def residual32():
    gated = gated_model("residual")
    data = held_out()
    return gated, data, oracle.oracle_deltas(gated, data, batch_size=BATCH, progress=False)


@pytest.fixture
def float64():
    old_floatx, old_policy = keras.config.floatx(), keras.config.dtype_policy().name
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx(old_floatx)
    keras.config.set_dtype_policy(old_policy)


# ---- the deltas -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["residual", "plain"])
def test_gating_equals_surgery(name, float64):
    """ΔL from gates at 0 equals ΔL of the model with the group physically removed."""
    gated = gated_model(name)
    x, y = held_out()
    graph = kt.analyze(gated)
    deltas = oracle.oracle_deltas(gated, (x, y), batch_size=BATCH, graph=graph, progress=False)
    assert deltas.dtype == np.float64 and deltas.shape == (graph.num_groups,)
    assert np.all(np.isfinite(deltas)) and np.max(np.abs(deltas)) > 1e-2  # BN randomized: not all ~0
    base = float(loss_fn()(y, gated(x, training=False)))
    labels = oracle.group_labels(graph)
    picks = {int(np.argmax(np.abs(deltas))), int(np.argmin(np.abs(deltas))), graph.num_groups - 1}
    picks |= {g for g, l in enumerate(labels) if "+" in l and g % 5 == 0}  # residual-stream groups
    for g in sorted(picks):
        pruned = kt.apply_plan(gated, kt.PruningPlan.from_groups(graph, [g]))
        assert not kt.is_gated(pruned)
        surgery = float(loss_fn()(y, pruned(x, training=False))) - base
        assert abs(deltas[g] - surgery) <= 1e-5 * max(abs(surgery), 1e-6), (g, labels[g], deltas[g], surgery)


def test_batches_weighted_by_size_and_dataset_input(residual32):
    gated, (x, y), deltas = residual32
    whole = oracle.oracle_deltas(gated, (x, y), batch_size=N, progress=False)
    np.testing.assert_allclose(deltas, whole, atol=2e-6)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    np.testing.assert_allclose(oracle.oracle_deltas(gated, ds, progress=False), deltas, atol=1e-7)


def test_already_pruned_group_is_nan():
    gated = gated_model("residual")
    graph = kt.analyze(gated)
    g = 5
    for name, ch in graph.group_members()[g]:
        layer = gated.get_layer(name)
        value = layer.gate.numpy()
        value[ch] = 0.0
        layer.gate.assign(value)
    before = snapshot(gated)
    deltas = oracle.oracle_deltas(gated, held_out(), batch_size=BATCH, graph=graph, progress=False)
    assert np.isnan(deltas[g])
    assert np.isfinite(np.delete(deltas, g)).all()
    assert_same(before, snapshot(gated))  # the pruned group's gates stay at 0


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_model_unchanged_also_when_evaluation_raises(residual32, monkeypatch, error):
    gated, data, deltas = residual32
    before = snapshot(gated)
    again = oracle.oracle_deltas(gated, data, batch_size=BATCH, progress=True)
    np.testing.assert_array_equal(again, deltas)
    assert_same(before, snapshot(gated))

    real, calls = oracle._mean_loss, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:  # base, group 0, then group 1 with its gates at 0
            raise error("stop")
        return real(*args)

    monkeypatch.setattr(oracle, "_mean_loss", failing)
    with pytest.raises(error):
        oracle.oracle_deltas(gated, data, batch_size=BATCH, progress=False)
    assert len(calls) == 3
    assert_same(before, snapshot(gated))


def test_cache(residual32, tmp_path, monkeypatch):
    gated, (x, y), deltas = residual32
    path = str(tmp_path / "oracle.npz")
    first = oracle.oracle_deltas(gated, (x, y), batch_size=BATCH, cache=path, progress=False)
    np.testing.assert_array_equal(first, deltas)

    def no_evaluation(*args, **kwargs):
        raise AssertionError("evaluated although the cache matches")

    monkeypatch.setattr(oracle, "_evaluate", no_evaluation)
    cached = oracle.oracle_deltas(gated, (x, y), batch_size=BATCH, cache=path, progress=False)
    np.testing.assert_array_equal(cached, first)
    # Other data, or one changed weight, do not match the key: they evaluate.
    x2 = x.copy()
    x2[0, 0, 0, 0] += 1.0
    with pytest.raises(AssertionError, match="evaluated"):
        oracle.oracle_deltas(gated, (x2, y), batch_size=BATCH, cache=path, progress=False)
    kernel = gated.get_layer("s0b0_conv1").kernel
    old = kernel.numpy()
    try:
        kernel.assign(old * 1.5)
        with pytest.raises(AssertionError, match="evaluated"):
            oracle.oracle_deltas(gated, (x, y), batch_size=BATCH, cache=path, progress=False)
        monkeypatch.undo()
        changed = oracle.oracle_deltas(gated, (x, y), batch_size=BATCH, cache=path, progress=False)
        assert not np.allclose(changed, first)
        with np.load(path) as f:  # overwritten with the new deltas
            np.testing.assert_array_equal(f["deltas"], changed)
    finally:
        kernel.assign(old)


def test_group_labels():
    res = kt.analyze(gated_model("residual"))
    labels = oracle.group_labels(res)
    assert len(labels) == res.num_groups
    stream = [l for l in labels if "+" in l]
    assert "s1b0_conv2+s1b0_proj+s1b1_conv2" in stream
    assert stream.count("s1b0_conv2+s1b0_proj+s1b1_conv2") == 8  # one label for the whole stream
    plain = kt.analyze(gated_model("plain"))
    assert sorted(set(oracle.group_labels(plain))) == ["c1", "c2", "c3", "fc"]


# ---- correlations -------------------------------------------------------------------------
def test_rank_correlations_monotone_reversed_nan():
    rng = np.random.default_rng(0)
    o = rng.normal(size=40)
    o[[3, 7]] = np.nan
    s_nan = np.abs(o) * 2.0
    s_nan[11] = np.nan
    scores = {"mono": 3.0 * np.log(np.abs(o)) + 1.0, "rev": -np.abs(o), "with_nan": s_nan}
    r = oracle.rank_correlations(scores, o, ["l"] * 40)
    for stat in ("spearman", "kendall"):
        assert r["mono"][stat] == pytest.approx(1.0)
        assert r["rev"][stat] == pytest.approx(-1.0)
        assert r["with_nan"][stat] == pytest.approx(1.0)
    assert r["mono"]["n"] == 38 and r["with_nan"]["n"] == 37
    assert r["mono"]["per_layer"]["l"]["n"] == 38
    json.dumps(r, allow_nan=False)  # plain floats and ints, all finite here


def test_rank_correlations_per_layer_hand_made():
    o = np.array([1.0, -2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, np.nan])
    s = np.array([1.0, 2.0, 3.0, 4.0, 7.0, 6.0, 5.0, 1.0, 2.0, 0.0])
    labels = ["a"] * 4 + ["b"] * 3 + ["c"] * 2 + ["a"]
    r = oracle.rank_correlations({"crit": s}, o, labels)["crit"]
    assert set(r["per_layer"]) == {"a", "b"}  # "c" has 2 < 3 groups
    rank_keys = ("spearman", "kendall", "n")
    assert {k: r["per_layer"]["a"][k] for k in rank_keys} == {"spearman": 1.0, "kendall": 1.0, "n": 4}  # the NaN one left out
    assert {k: r["per_layer"]["b"][k] for k in rank_keys} == {"spearman": -1.0, "kendall": -1.0, "n": 3}
    assert {k: r["layer_median"][k] for k in ("spearman", "kendall")} == {"spearman": 0.0, "kendall": 0.0}
    assert r["layer_weighted_mean"]["spearman"] == pytest.approx(1 / 7)
    assert r["layer_weighted_mean"]["kendall"] == pytest.approx(1 / 7)
    assert r["n"] == 9
    assert set(oracle.rank_correlations({"crit": s}, o, labels, min_per_layer=2)["crit"]["per_layer"]) == {"a", "b", "c"}


def test_rank_correlations_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    o, s = rng.normal(size=60), rng.gamma(2.0, size=60)
    labels = [f"l{i % 4}" for i in range(60)]
    r = oracle.rank_correlations({"s": s}, o, labels)["s"]
    assert r["spearman"] == pytest.approx(stats.spearmanr(s, np.abs(o)).statistic, abs=1e-12)
    assert r["kendall"] == pytest.approx(stats.kendalltau(s, np.abs(o)).statistic, abs=1e-12)
    sel = np.array(labels) == "l2"
    assert r["per_layer"]["l2"]["spearman"] == pytest.approx(stats.spearmanr(s[sel], np.abs(o[sel])).statistic)
    per = [r["per_layer"][k]["spearman"] for k in sorted(r["per_layer"])]
    assert r["layer_median"]["spearman"] == pytest.approx(float(np.median(per)))
    assert all(type(v) is float for v in (r["spearman"], r["kendall"], *per))


def test_plot_correlations(tmp_path):
    rng = np.random.default_rng(2)
    o = rng.normal(size=30)
    o[0] = np.nan
    scores = {"taylor": np.abs(o) + rng.uniform(0, 0.1, 30), "signed": rng.normal(size=30), "zeros": np.zeros(30)}
    corr = oracle.rank_correlations(scores, o, None)
    path = oracle.plot_correlations(corr, scores, o, tmp_path / "corr.png")
    assert path == str(tmp_path / "corr.png")
    with open(path, "rb") as f:
        head = f.read(8)
    assert head == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "corr.png").stat().st_size > 5000


# ---- bad input --------------------------------------------------------------------------
def test_bad_model_inputs_raise_and_leave_model_unchanged():
    x, y = held_out()
    plain = make("plain")
    plain.compile(loss=loss_fn())
    with pytest.raises(ValueError, match=r"gated model.*gated='plain'"):
        oracle.oracle_deltas(plain, (x, y), progress=False)
    uncompiled = kt.add_gates(make("plain"))
    before = snapshot(uncompiled)
    with pytest.raises(ValueError, match="gated='plain'.*not compiled with a loss"):
        oracle.oracle_deltas(uncompiled, (x, y), progress=False)
    assert_same(before, snapshot(uncompiled))
    gated = gated_model("plain")
    with pytest.raises(ValueError, match="graph='res'"):
        oracle.oracle_deltas(gated, (x, y), graph=kt.analyze(make("residual")), progress=False)


@pytest.mark.parametrize(
    "data, match",
    [
        ("empty", "0 examples"),
        ("empty_ds", "0 examples"),
        ("infinite_ds", "infinite"),
        ("x_only", "data of type ndarray"),
        ("short_y", "20 inputs and 5 targets"),
        ("unbatched_x_ds", "elements of type"),
        ("bad_batch", "batch_size=0"),
    ],
)
def test_bad_data_raises(data, match):
    gated = gated_model("plain")
    x, y = held_out()
    kwargs = {}
    data = {
        "empty": (x[:0], y[:0]),
        "empty_ds": tf.data.Dataset.from_tensor_slices((x, y)).take(0).batch(4),
        "infinite_ds": tf.data.Dataset.from_tensor_slices((x, y)).batch(4).repeat(),
        "x_only": x,
        "short_y": (x, y[:5]),
        "unbatched_x_ds": tf.data.Dataset.from_tensor_slices(x).batch(4),
        "bad_batch": (x, y),
    }[data]
    if match == "batch_size=0":
        kwargs["batch_size"] = 0
    before = snapshot(gated)
    with pytest.raises(ValueError, match=match):
        oracle.oracle_deltas(gated, data, progress=False, **kwargs)
    assert_same(before, snapshot(gated))


def test_bad_scores_and_labels_raise():
    o = np.arange(5.0)
    with pytest.raises(ValueError, match=r"scores\['taylor'\].*shape \(5,\).*shape \(4,\)"):
        oracle.rank_correlations({"taylor": np.ones(4)}, o, ["a"] * 5)
    with pytest.raises(ValueError, match="labels.*5.*Received: 3 labels"):
        oracle.rank_correlations({"taylor": np.ones(5)}, o, ["a"] * 3)
    with pytest.raises(ValueError, match="scores as a non-empty dict"):
        oracle.rank_correlations(np.ones(5), o, ["a"] * 5)
    with pytest.raises(ValueError, match=r"scores\['x'\]"):
        oracle.plot_correlations({}, {"x": np.ones(3)}, o, "unused.png")


def two_output_model():
    """A compiled loss over two outputs tracks each term in metrics of its own."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, name="c")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(x))
    model = keras.Model(inputs, [keras.layers.Dense(3, name="a")(x), keras.layers.Dense(2, name="b")(x)])
    gated = kt.add_gates(randomize_bn(model))
    gated.compile(loss=[loss_fn(), loss_fn()], loss_weights=[1.0, 0.5])
    return gated


def test_two_outputs_weighted_loss_and_loss_trackers_restored():
    gated = two_output_model()
    x = images(N)
    y = (np.arange(N) % 3, np.arange(N) % 2)
    deltas = oracle.oracle_deltas(gated, (x, y), batch_size=BATCH, progress=False)
    assert all(float(v.numpy()) == 0.0 for v in gated.metrics_variables)  # created, then reset
    a, b = gated(x, training=False)
    base = float(loss_fn()(y[0], a)) + 0.5 * float(loss_fn()(y[1], b))
    graph = kt.analyze(gated)
    pruned = kt.apply_plan(gated, kt.PruningPlan.from_groups(graph, [1]))
    a, b = pruned(x, training=False)
    surgery = float(loss_fn()(y[0], a)) + 0.5 * float(loss_fn()(y[1], b)) - base
    assert abs(deltas[1] - surgery) <= 1e-5 * abs(surgery) + 1e-6
    gated.evaluate(x, y, verbose=0)  # trackers hold values now
    before = snapshot(gated)
    oracle.oracle_deltas(gated, (x, y), batch_size=BATCH, progress=False)
    assert_same(before, snapshot(gated))
