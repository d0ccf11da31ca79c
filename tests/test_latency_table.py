"""keras_taylor.LatencyTable: measured per-layer latency, its cache, and pruning to it."""

import json
import warnings

import keras
import numpy as np
import pytest

import keras_taylor as kt
from keras_taylor import latency_table as lt
from keras_taylor import selection
from conftest import images, make

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def tiny(filters=16):
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(filters, 3, padding="same", name="c0")(inp)
    x = keras.layers.BatchNormalization(name="b0")(x)
    x = keras.layers.ReLU(name="r0")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", name="c1")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inp, keras.layers.Dense(3, name="head")(x))


def _count_measurements(monkeypatch):
    calls = []
    real = lt._measure_segment

    def counting(seg, *args, **kwargs):
        calls.append(seg.name)
        return real(seg, *args, **kwargs)

    monkeypatch.setattr(lt, "_measure_segment", counting)
    return calls


def test_segments_and_sample_widths():
    graph = kt.analyze(tiny())
    segs = {n.name: [c.name for c in chain] for n, chain in lt._segments(graph)}
    assert segs == {"c0": ["b0", "r0"], "c1": ["gap"], "head": []}
    assert lt.sample_widths(64) == [8, 16, 24, 32, 40, 48, 56, 64]
    w = lt.sample_widths(100)
    assert w[-1] == 100 and all(x % 8 == 0 for x in w[:-1])
    assert all(x % 3 == 0 or x == 30 for x in lt.sample_widths(30, 8, multiple_of=3))


def test_interpolation_is_a_staircase_across_alignment_steps():
    widths, times = [8, 16, 32], [1.0, 1.0, 3.0]
    got = lt._interp(widths, times, np.array([1, 8, 9, 16, 17, 24, 25, 32]), 8, 32)
    # 9..16 cost like 16; 17..24 like 24 (halfway between the samples 16 and 32); 25 like 32.
    np.testing.assert_allclose(got, [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0])
    assert lt._interp(widths, times, 0, 8, 32) == 0.0


def test_measure_tf_caches_and_invalidates(tmp_path, monkeypatch):
    calls = _count_measurements(monkeypatch)
    model = tiny()
    table = kt.LatencyTable.measure(model, runtime="tf", rounds=2, calibrate=0, cache_dir=str(tmp_path), verbose=0)
    assert sorted(calls) == ["c0", "c1", "head"]
    assert table.predict(model) == pytest.approx(table.full_ms)
    assert table.layers["c0"]["in_widths"] == []  # RGB input: never pruned
    assert table.layers["head"]["out_widths"] == []  # logits: never pruned
    assert table.layers["c1"]["out_widths"] == [8, 16]
    # Second call: nothing measured, same table.
    again = kt.LatencyTable.measure(model, runtime="tf", rounds=2, calibrate=0, cache_dir=str(tmp_path), verbose=0)
    assert sorted(calls) == ["c0", "c1", "head"]
    assert again.to_dict() == table.to_dict()
    # Saved and loaded.
    table.save(str(tmp_path / "t.json"))
    assert kt.LatencyTable.load(str(tmp_path / "t.json")).to_dict() == table.to_dict()
    # A changed layer is measured again (and the layer it feeds: its input shape changed), the rest not.
    kt.LatencyTable.measure(tiny(filters=24), runtime="tf", rounds=2, calibrate=0, cache_dir=str(tmp_path), verbose=0)
    assert sorted(calls[3:]) == ["c0", "c1"]
    # Another runtime: everything again.
    kt.LatencyTable.measure(model, runtime="tflite", rounds=2, calibrate=0, cache_dir=str(tmp_path), verbose=0)
    assert sorted(calls[5:]) == ["c0", "c1", "head"]


def test_same_architecture_built_again_hits_the_whole_model_cache(tmp_path, monkeypatch):
    # Keras numbers auto-generated names per process (input_layer, input_layer_1, functional_3):
    # the whole-model entry must not depend on them.
    first, second = tiny(), tiny()
    assert first.layers[0].name != second.layers[0].name and first.name != second.name
    assert lt._structure_json(first) == lt._structure_json(second)
    assert lt._structure_json(first) != lt._structure_json(tiny(filters=24))
    kt.LatencyTable.measure(first, runtime="tf", rounds=2, calibrate=0, cache_dir=str(tmp_path), verbose=0)
    timed = []
    real = lt._time
    monkeypatch.setattr(lt, "_time", lambda runners, *a, **k: timed.append(sorted(runners)) or real(runners, *a, **k))
    again = kt.LatencyTable.measure(second, runtime="tf", rounds=2, calibrate=0, cache_dir=str(tmp_path), verbose=0)
    assert timed == []  # neither a segment nor the whole model timed again
    assert again.predict(second) == pytest.approx(again.full_ms)


@pytest.mark.parametrize("runtime", ["tflite", "onnxruntime"])
def test_measure_other_runtimes_predict_pruned_models(tmp_path, runtime):
    if runtime == "onnxruntime":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("tf2onnx")
    model = tiny()
    table = kt.LatencyTable.measure(model, runtime=runtime, rounds=3, threads=1, calibrate=2, cache_dir=str(tmp_path), verbose=0)
    assert "threads 1" in table.versions
    assert table.runtime == runtime and table.full_ms > 0 and table.calibration["coef"][0] >= 0
    graph = kt.analyze(model)
    scores = np.random.default_rng(0).uniform(size=graph.num_groups)
    removed = selection.random_removal(graph, 0.6, np.random.default_rng(0))
    pruned = kt.apply_plan(model, kt.PruningPlan.from_groups(graph, removed))
    pred = table.predict(pruned)
    assert np.isfinite(pred)
    # The gated model with those gates at 0 predicts the same as the pruned model.
    terms = table.cost_terms(graph)
    assert terms.evaluate(graph.alive_ids(removed)) == pytest.approx(pred)
    # Monotone-ish: every channel removed never predicts more than the dense model by much.
    small = selection.greedy_removal(graph, scores)[0]
    assert terms.evaluate(graph.alive_ids(small)) <= 1.5 * table.predict(model)


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="runtime"):
        kt.LatencyTable.measure(tiny(), runtime="tensorrt", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="batch_size"):
        kt.LatencyTable.measure(tiny(), batch_size=0, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="LatencyTable"):
        kt.TaylorPruning(metric="latency", target=0.5)
    table = synthetic_table(tiny())
    with pytest.raises(ValueError, match="hold layer"):
        table.cost_terms(kt.analyze(make("plain")))


def synthetic_table(model, step=4):
    """A deterministic table: each layer costs (ceil(cout/step)·step)·(cin/full) + a rider term."""
    graph = kt.analyze(model, on_unknown="freeze")
    layers = {}
    for node, _ in lt._segments(graph):
        seg = lt._Segment(node, [], graph)
        outs = list(range(1, seg.cout_full + 1)) if seg.out_prunable else []
        ins = list(range(1, seg.cin_full + 1)) if seg.in_prunable else []
        full = float(seg.cout_full)
        layers[node.name] = {
            "class": "X", "riders": [], "cin_full": seg.cin_full, "cout_full": seg.cout_full, "step": step,
            "full_ms": full, "out_widths": outs, "out_ms": [float(np.ceil(w / step) * step) for w in outs],
            "in_widths": ins, "in_ms": [full * w / seg.cin_full for w in ins],
        }
    table = kt.LatencyTable(layers, 0.0, 0.0, "synthetic", 1, "none", "none", model.name)
    table.fixed_ms = 1.0
    table.full_ms = table.predict(model)
    return table


def test_profile_shows_predicted_latency():
    model = tiny()
    table = synthetic_table(model)
    prof = kt.profile(model, latency=table)
    assert prof.latency_ms == pytest.approx(table.full_ms)
    assert prof.by_name()["c0"].latency_ms == pytest.approx(16.0)
    assert "latency ms" in prof.table() and "fixed (per model)" in prof.table()
    assert kt.profile(model).latency_ms is None and "latency" not in kt.profile(model).table()


@pytest.mark.parametrize("multiple", [None, 4])
def test_latency_targeted_fit_ends_under_its_predicted_budget(multiple):
    model = make("residual")
    gated = kt.add_gates(model)
    table = synthetic_table(model)
    gated.compile(optimizer=keras.optimizers.SGD(0.01), loss=LOSS)
    pruner = kt.TaylorPruning(
        metric="latency", target=0.7, latency=table, prune_every=2, channels_per_step=4, channel_multiple=multiple,
    )
    x, y = images(64, 0), np.random.default_rng(0).integers(0, 5, 64)
    gated.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[pruner])
    assert pruner.done
    hist = pruner.history
    assert len(hist) >= 2  # reached on a schedule, not in one step
    budgets = [h["latency_budget"] for h in hist]
    assert all(b2 <= b1 + 1e-12 for b1, b2 in zip(budgets, budgets[1:]))
    for h in hist:
        assert h["latency_fraction"] <= h["latency_budget"] + 1e-9
    assert hist[-1]["latency_fraction"] <= 0.7 + 1e-9
    pruned = kt.prune(gated)
    assert table.predict(pruned) <= 0.7 * table.full_ms + 1e-6
    if multiple:
        graph = kt.analyze(gated)
        for row in selection.alignment_report(graph, pruner.removed, multiple):
            assert row.aligned, row


def test_cli_latency_table_and_prune_flags(tmp_path, monkeypatch, capsys):
    from keras_taylor import cli

    monkeypatch.setenv("KERAS_TAYLOR_CACHE", str(tmp_path / "cache"))
    path = str(tmp_path / "m.keras")
    tiny().save(path)
    out = str(tmp_path / "table.json")
    assert cli.main(["latency-table", path, "--runtime", "tf", "--output", out]) == 0
    table = kt.LatencyTable.load(out)
    assert set(table.layers) == {"c0", "c1", "head"} and table.runtime == "tf"
    assert "latency ms" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["prune", path, "--data", "x.npz", "--epochs", "1",
                                       "--target-flops", "0.5", "--target-latency", "0.5"])
    args = cli.build_parser().parse_args(["prune", path, "--data", "x.npz", "--epochs", "1", "--target-latency", "0.5"])
    assert args.target_latency == 0.5 and args.target_flops is None and args.runtime == "tflite"


def _true_ms(table, model, coef):
    """A fake runtime: latency = a0 + a1·Σ segments + a2·Σ residual Melements."""
    graph = kt.analyze(model, on_unknown="freeze")
    seg, res = table.features(graph, graph.alive_ids(()))
    return coef[0] + coef[1] * seg + coef[2] * res


def test_calibration_recovers_known_coefficients():
    model = make("residual")
    table = synthetic_table(model)
    graph = kt.analyze(model)
    assert lt._residual_terms(graph)  # the residual model's Adds are outside every segment
    coef = (3.0, 0.25, 40.0)
    seen = []

    def fake(models):
        seen.append(sorted(models))
        return {k: _true_ms(table, m, coef) for k, m in models.items()}

    cal = table.calibrate(model, 6, fake, seed=1)
    assert len(seen) == 1 and seen[0][0] == "c0" and "dense" in seen[0]  # one measurement, all models together
    np.testing.assert_allclose(cal["coef"], coef, rtol=1e-6)
    assert cal["fit_worst_abs_err"] < 1e-9
    # The calibrated prediction is the fake runtime on models it did not see.
    removed = selection.random_flops_removal(graph, 0.5, np.random.default_rng(99))
    assert lt.removal_key(removed) not in {p["removed_key"] for p in cal["points"]}
    pruned = kt.apply_plan(model, kt.PruningPlan.from_groups(graph, removed))
    assert table.predict(pruned) == pytest.approx(_true_ms(table, pruned, coef))
    # ... and the knapsack's additive terms say the same on the dense graph.
    assert table.cost_terms(graph).evaluate(graph.alive_ids(removed)) == pytest.approx(table.predict(pruned))
    # Round trip keeps the calibration.
    again = kt.LatencyTable.from_dict(json.loads(json.dumps(table.to_dict())))
    assert again.calibration == table.calibration and again.predict(pruned) == pytest.approx(table.predict(pruned))
    # profile sums to the same total (the Adds get rows of their own).
    prof = kt.profile(pruned, latency=table)
    assert prof.latency_ms == pytest.approx(table.predict(pruned))
    with pytest.raises(ValueError, match="n to be an integer"):
        table.calibrate(model, 1, fake)
    with pytest.raises(ValueError, match="measure"):
        table.calibrate(model, 3, {"dense": 1.0})


def test_measure_calibrates_and_caches_the_calibration(tmp_path, monkeypatch):
    model = tiny()
    table = kt.LatencyTable.measure(model, runtime="tf", rounds=2, calibrate=2, cache_dir=str(tmp_path), verbose=0)
    cal = table.calibration
    assert cal is not None and len(cal["coef"]) == 3 and all(c >= 0 for c in cal["coef"])
    assert [p["name"] for p in cal["points"]] == ["dense", "c0", "c1"]
    calls = []
    monkeypatch.setattr(kt.LatencyTable, "calibrate", lambda *a, **k: calls.append(1))
    again = kt.LatencyTable.measure(model, runtime="tf", rounds=2, calibrate=2, cache_dir=str(tmp_path), verbose=0)
    assert calls == [] and again.to_dict() == table.to_dict()
    assert kt.LatencyTable.measure(model, runtime="tf", rounds=2, calibrate=0, cache_dir=str(tmp_path), verbose=0).calibration is None
    table.save(str(tmp_path / "t.json"))
    assert kt.LatencyTable.load(str(tmp_path / "t.json")).calibration == cal
    # Another whole-model statistic is another measurement: the calibration is not reused.
    monkeypatch.setattr(lt, "WHOLE_MODEL_STAT", "other")
    kt.LatencyTable.measure(model, runtime="tf", rounds=2, calibrate=2, cache_dir=str(tmp_path), verbose=0)
    assert calls == [1]
    with pytest.raises(ValueError, match="calibrate"):
        kt.LatencyTable.measure(model, calibrate=-1, cache_dir=str(tmp_path))


@pytest.mark.parametrize("name,target", [("plain", 0.5), ("residual", 0.65)])
def test_closed_loop_converges_on_a_fake_runtime(name, target):
    model = make(name)
    table = synthetic_table(model)
    # The runtime disagrees with the table: half its segment cost, plus a large fixed cost.
    coef = (0.15 * table.full_ms, 0.6, 0.0)
    calls = []

    def fake(models):
        calls.append(sorted(models))
        return {k: _true_ms(table, m, coef) for k, m in models.items()}

    graph = kt.analyze(model)
    scores = np.random.default_rng(0).uniform(size=graph.num_groups)
    plan, history = kt.plan_for_latency(model, scores, table, target, measure=fake, tolerance=0.02, iterations=6)
    assert 1 < len(history) <= 6 and len(calls) == len(history)
    assert abs(history[0]["measured_fraction"] - target) > 0.02  # the table alone misses...
    pruned = kt.apply_plan(model, plan)
    measured = _true_ms(table, pruned, coef) / _true_ms(table, model, coef)
    assert abs(measured - target) <= 0.02  # ... the loop does not
    assert measured == pytest.approx(history[-1]["measured_fraction"])  # it stops at the first plan within tolerance
    with pytest.raises(ValueError, match="target"):
        kt.plan_for_latency(model, scores, table, 1.5, measure=fake)
    with pytest.raises(ValueError, match="LatencyTable"):
        kt.plan_for_latency(model, scores, "flops", 0.5, measure=fake)
    with pytest.raises(ValueError, match="measure"):
        kt.plan_for_latency(model, scores, table, 0.5, measure="tflite")


def test_calibration_keeps_a_negative_intercept_when_it_predicts_better():
    # A runtime where the isolated segments overcount a per-call cost: a0 < 0.
    model = make("residual")
    table = synthetic_table(model)
    graph = kt.analyze(model)
    floor = table.floor_ms(graph)
    assert 0 < floor < table.features(graph, graph.alive_ids(()))[0]
    coef = (-0.8 * 1.4 * floor, 1.4, 20.0)  # cancels 80% of the segments' unremovable part

    def fake(models):
        return {k: _true_ms(table, m, coef) for k, m in models.items()}

    cal = table.calibrate(model, 6, fake, seed=1)
    assert cal["intercept"] == "floor" and cal["loo_median_abs_err"]["floor"] < cal["loo_median_abs_err"]["nonnegative"]
    np.testing.assert_allclose(cal["coef"], coef, rtol=1e-6)
    removed = selection.random_flops_removal(graph, 0.5, np.random.default_rng(99))
    pruned = kt.apply_plan(model, kt.PruningPlan.from_groups(graph, removed))
    assert table.predict(pruned) == pytest.approx(_true_ms(table, pruned, coef))
    # With fewer than 5 points there is no leave-one-out: the intercept stays >= 0.
    few = table.calibrate(model, 3, fake, seed=1)
    assert few["intercept"] == "nonnegative" and few["loo_median_abs_err"] is None and few["coef"][0] >= 0
    # A larger negative intercept than the floor allows is not followed: the
    # prediction of the narrowest model stays >= 0.
    cal = table.calibrate(model, 6, lambda models: {k: _true_ms(table, m, (-1.5 * 1.4 * floor, 1.4, 20.0)) for k, m in models.items()}, seed=1)
    assert cal["coef"][0] >= -cal["coef"][1] * floor - 1e-9
    # A runtime with a positive fixed cost keeps a0 >= 0 and recovers it.
    pos = (5.0, 0.8, 10.0)
    cal = table.calibrate(model, 6, lambda models: {k: _true_ms(table, m, pos) for k, m in models.items()}, seed=2)
    np.testing.assert_allclose(cal["coef"], pos, rtol=1e-6)


def test_closed_loop_steps_along_the_measurements():
    # The runtime has a floor the table does not know: measured = 0.5 + 0.5 · predicted
    # fraction, so the target 0.7 needs a predicted 0.4. Scaling the budget by measured ÷
    # predicted creeps down (0.7, 0.58, 0.51, 0.47…); the secant through the two measured
    # plans lands on the target with the third.
    inp = keras.Input((8, 8, 3))
    x = inp
    for i in range(3):
        x = keras.layers.Conv2D(48, 3, padding="same", name=f"c{i}")(x)
    model = keras.Model(inp, keras.layers.Dense(3, name="head")(keras.layers.GlobalAveragePooling2D()(x)))
    table = synthetic_table(model)
    graph = kt.analyze(model)
    dense_pred = table.predict(model)

    def fake(models):
        return {k: 10.0 * (0.5 + 0.5 * table.predict(m) / dense_pred) for k, m in models.items()}

    scores = np.random.default_rng(0).uniform(size=graph.num_groups)
    plan, history = kt.plan_for_latency(model, scores, table, 0.7, measure=fake, tolerance=0.02, iterations=6)
    steps = [(round(h["budget_fraction"], 3), round(h["measured_fraction"], 3)) for h in history]
    assert history[0]["measured_fraction"] > 0.8 and len(history) <= 3, steps  # far off first, then 2 steps
    measured = 0.5 + 0.5 * table.predict(kt.apply_plan(model, plan)) / dense_pred
    assert abs(measured - 0.7) <= 0.02 and measured == pytest.approx(history[-1]["measured_fraction"])


def test_closed_loop_says_when_the_target_is_out_of_reach():
    # A runtime whose per-call cost dominates: even the narrowest plan measures >= 0.6.
    model = make("plain")
    table = synthetic_table(model)
    dense_pred = table.predict(model)

    def fake(models):
        return {k: 10.0 * (0.6 + 0.4 * table.predict(m) / dense_pred) for k, m in models.items()}

    scores = np.random.default_rng(0).uniform(size=kt.analyze(model).num_groups)
    with pytest.warns(UserWarning, match=r"missed its target.*target=0.3.*cheapest plan measured"):
        plan, history = kt.plan_for_latency(model, scores, table, 0.3, measure=fake, tolerance=0.02, iterations=4)
    assert min(h["measured_fraction"] for h in history) > 0.32
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a reachable target: no warning
        kt.plan_for_latency(model, scores, table, 0.8, measure=fake, tolerance=0.02, iterations=6)


def test_paired_times_follow_same_round_ratios():
    from keras_taylor import latency

    # The machine slows down 2x halfway; "p" is always 0.5x the dense model of its round.
    dense = [10.0, 10.0, 10.0, 20.0, 20.0, 20.0, 20.0]
    rounds = {"dense": dense, "p": [0.5 * d for d in dense], "q": [6.0, 6.0, 6.0, 6.0, 6.0, 6.0, 30.0]}
    out = latency.paired_ms(rounds, "dense")
    assert out["dense"] == pytest.approx(10.0)
    assert out["p"] / out["dense"] == pytest.approx(0.5)
    # q: ratios 0.6 (x3), 0.3 (x3), 1.5 -> median 0.6 although its minimum is 6 of a 10 ms round.
    assert out["q"] / out["dense"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="reference"):
        latency.paired_ms(rounds, "nope")
    with pytest.raises(ValueError, match="rounds"):
        latency.paired_ms({"dense": dense, "p": [1.0]}, "dense")
    with pytest.raises(ValueError, match="positive"):
        latency.paired_ms({"dense": [0.0, 1.0]}, "dense")


def test_whole_model_timer_pairs_to_the_dense_model(monkeypatch):
    from keras_taylor import latency

    per_round = {"dense": [2.0, 4.0, 4.0], "m": [1.5, 1.0, 1.0], "a": [1.0, 3.0, 2.0]}

    def fake_time_callables(runners, rounds, target_ms, seed):
        return {k: {"min_ms": min(per_round[k]), "per_round_ms": per_round[k]} for k in runners}

    monkeypatch.setattr(latency, "time_callables", fake_time_callables)
    monkeypatch.setattr(lt, "_runner", lambda *a, **k: (lambda: None))
    timer = lt._runtime_timer("tf", 1, None, 3, np.random.default_rng(0))
    paired = timer({"dense": object(), "m": object()})
    assert paired["m"] / paired["dense"] == pytest.approx(0.25)  # median of 0.75, 0.25, 0.25
    plain = timer({"a": object(), "m": object()})  # no dense model: minima
    assert plain == {"a": 1.0, "m": 1.0}
