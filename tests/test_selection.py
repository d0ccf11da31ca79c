"""keras_taylor.selection: greedy, random and knapsack selection of channel groups."""

import itertools

import keras
import numpy as np
import pytest

import keras_taylor as kt
from keras_taylor import selection


def _mlp(widths=(6, 5), residual=False):
    x = inp = keras.Input((4,))
    outs = []
    for i, w in enumerate(widths):
        x = keras.layers.Dense(w, name=f"d{i}")(x if not residual or i == 0 else inp)
        outs.append(x)
    if residual:
        x = keras.layers.Add(name="add")(outs)
        x = keras.layers.Dense(3, name="mid")(x)
    out = keras.layers.Dense(2, name="head")(x)
    return keras.Model(inp, out)


def _table_terms(graph, tables):
    """A separable cost: one term per layer, f(cout) read from a table (can go down)."""
    terms = []
    for name, out_map in graph.creating_layers().items():
        if name in tables:
            t = np.asarray(tables[name], dtype=float)
            terms.append((name, None, out_map, lambda cin, cout, t=t: t[np.asarray(cout)]))
    return selection.CostTerms(terms, constant=1.0)


def _widths(graph, removed):
    return graph.layer_channel_counts(removed)


def _brute_force(graph, scores, terms, budget, min_channels=1, multiple=1):
    """Best kept value over every subset of groups obeying the rules."""
    index = graph.group_index
    best = -np.inf
    n = graph.num_groups
    for bits in itertools.product([False, True], repeat=n):
        removed = {g for g in range(n) if bits[g]}
        ok = True
        for i, name in enumerate(index.names):
            groups = index.groups[i].tolist()
            kept = [g for g in groups if g not in removed]
            order = sorted(groups, key=lambda g: (-scores[g], g))
            if set(kept) != set(order[: len(kept)]):
                ok = False  # not a prefix of the layer's importance order
                break
            w = index.fixed[i] + sum(c for g, c in zip(groups, index.counts[i].tolist()) if g not in removed)
            if removed & set(groups) and w < min_channels:
                ok = False
                break
            if multiple > 1 and not (w == index.full[i] or (w > 0 and w % multiple == 0)):
                ok = False
                break
        if not ok:
            continue
        if terms.evaluate(graph.alive_ids(removed)) > budget + 1e-9:
            continue
        best = max(best, sum(scores[g] for g in range(n) if g not in removed))
    return best


def _value(scores, removed):
    return sum(scores[g] for g in range(len(scores)) if g not in removed)


def _is_prefix(graph, scores, removed):
    index = graph.group_index
    for i in range(len(index.names)):
        groups = index.groups[i].tolist()
        order = sorted(groups, key=lambda g: (-scores[g], g))
        kept = [g for g in groups if g not in removed]
        if set(kept) != set(order[: len(kept)]):
            return False
    return True


TABLES = {
    "d0": [0, 5, 9, 8, 14, 20, 19],  # negative increments at 3 and 6 channels
    "d1": [0, 4, 7, 11, 10, 16],
}


@pytest.mark.parametrize("budget", [12.0, 20.0, 27.5, 33.0, 40.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_knapsack_equals_brute_force(budget, seed):
    graph = kt.analyze(_mlp())
    assert graph.num_groups == 11
    scores = np.random.default_rng(seed).uniform(0, 1, graph.num_groups).round(3)
    terms = _table_terms(graph, TABLES)
    removed = selection.knapsack_removal(graph, scores, terms, budget, resolution=4000)
    assert terms.evaluate(graph.alive_ids(removed)) <= budget + 1e-9
    assert _is_prefix(graph, scores, removed)
    assert _value(scores, removed) == pytest.approx(_brute_force(graph, scores, terms, budget))


@pytest.mark.parametrize("budget", [18.0, 22.0, 30.0])
def test_knapsack_alignment_and_min_channels_match_brute_force(budget):
    graph = kt.analyze(_mlp())
    scores = np.random.default_rng(3).uniform(0, 1, graph.num_groups).round(3)
    terms = _table_terms(graph, TABLES)
    removed = selection.knapsack_removal(graph, scores, terms, budget, channel_multiple=2, min_channels=2, resolution=4000)
    widths = _widths(graph, removed)
    assert widths["d0"] in (2, 4, 6) and widths["d1"] in (2, 4, 5)
    assert _value(scores, removed) == pytest.approx(
        _brute_force(graph, scores, terms, budget, min_channels=2, multiple=2)
    )


def test_knapsack_group_spanning_layers_pays_every_member():
    # d0 and d1 are added: one residual stream, every group holds a channel of both.
    graph = kt.analyze(_mlp(widths=(5, 5), residual=True))
    index = graph.group_index
    stream = [g for g in range(graph.num_groups) if len(index.of_group[g]) == 2]
    assert len(stream) == 5
    tables = {"d0": [0, 3, 6, 9, 12, 15], "d1": [0, 3, 6, 9, 12, 15], "mid": [0, 1, 2, 3]}
    terms = _table_terms(graph, tables)
    scores = np.linspace(1, 2, graph.num_groups)
    # Full cost 1 + 15 + 15 + 3 = 34. A stream channel costs 6, not 3.
    removed = selection.knapsack_removal(graph, scores, terms, 28.0)
    assert _widths(graph, removed)["d0"] == _widths(graph, removed)["d1"] == 4
    assert terms.evaluate(graph.alive_ids(removed)) == pytest.approx(28.0)
    assert _value(scores, removed) == pytest.approx(_brute_force(graph, scores, terms, 28.0))


def test_knapsack_keeps_already_removed_and_nonfinite():
    graph = kt.analyze(_mlp())
    terms = _table_terms(graph, TABLES)
    scores = np.random.default_rng(0).uniform(0, 1, graph.num_groups)
    low = int(np.argmin(scores))
    scores[np.argmax(scores)] = np.nan
    keep = int(np.flatnonzero(np.isnan(scores))[0])
    removed = selection.knapsack_removal(graph, scores, terms, 10.0, removed={low})
    assert low in removed and keep not in removed
    assert terms.evaluate(graph.alive_ids(removed)) <= 10.0


def test_knapsack_flops_conv_model_fits_budget_and_plan():
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(16, 3, padding="same", name="c0")(inp)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    y = keras.layers.Conv2D(16, 3, padding="same", name="c1")(x)
    x = keras.layers.Add()([x, y])
    x = keras.layers.Conv2D(24, 1, name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, keras.layers.Dense(3)(x))
    graph = kt.analyze(model)
    scores = np.random.default_rng(0).uniform(0, 1, graph.num_groups)
    full = selection.cost_terms(graph, "flops").evaluate(graph.alive_ids(()))
    assert full == pytest.approx(kt.profile(model).flops)
    for frac in (0.8, 0.5, 0.3):
        plan = selection.knapsack_plan(graph, scores, "flops", frac * full, channel_multiple=4)
        assert isinstance(plan, kt.PruningPlan)
        removed = plan.removed_groups(graph)
        assert _is_prefix(graph, scores, removed)
        pruned = kt.apply_plan(model, plan)
        assert kt.profile(pruned).flops <= frac * full
        for name, w in _widths(graph, removed).items():
            assert w % 4 == 0 or w == graph.group_index.full[graph.group_index.names.index(name)], (name, w)


def test_knapsack_bad_input():
    graph = kt.analyze(_mlp())
    scores = np.ones(graph.num_groups)
    with pytest.raises(ValueError, match="scores of shape"):
        selection.knapsack_removal(graph, scores[:3], "flops", 10.0)
    with pytest.raises(ValueError, match="cost"):
        selection.knapsack_removal(graph, scores, "latency", 10.0)
    with pytest.raises(ValueError, match="budget"):
        selection.knapsack_removal(graph, scores, "flops", float("nan"))
    with pytest.raises(ValueError, match="channel_multiple"):
        selection.knapsack_removal(graph, scores, "flops", 10.0, channel_multiple=0)


def test_greedy_min_channels_limit_and_stop():
    graph = kt.analyze(_mlp())
    scores = np.arange(graph.num_groups, dtype=float)
    taken, stopped = selection.greedy_removal(graph, scores, min_channels=2)
    assert not stopped
    assert set(_widths(graph, set(taken)).values()) == {2}
    assert taken == sorted(taken)  # ascending score order
    taken, _ = selection.greedy_removal(graph, scores, limit=3)
    assert taken == [0, 1, 2]
    taken, stopped = selection.greedy_removal(graph, scores, stop=lambda r: len(r) >= 4, removed={10})
    assert stopped and taken == [0, 1, 2]
    scores[1] = np.inf
    assert 1 not in selection.greedy_removal(graph, scores)[0]


def test_random_removal_keeps_a_channel_everywhere():
    graph = kt.analyze(_mlp())
    for seed in range(5):
        removed = selection.random_removal(graph, 0.9, np.random.default_rng(seed))
        assert min(_widths(graph, removed).values()) >= 1
        assert len(removed) >= 1


def test_random_flops_removal_lands_at_or_under_the_target():
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(32, 3, padding="same", name="c0")(inp)
    x = keras.layers.Conv2D(24, 3, padding="same", name="c1")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, keras.layers.Dense(3)(x))
    graph = kt.analyze(model)
    terms = selection.cost_terms(graph, "flops")
    full = terms.evaluate(graph.alive_ids(()))
    for seed, target in enumerate((0.9, 0.6, 0.3)):
        removed = selection.random_flops_removal(graph, target, np.random.default_rng(seed))
        got = terms.evaluate(graph.alive_ids(removed)) / full
        assert got <= target and got > target - 0.1  # the shortest prefix at or under: close to it
        aligned = selection.random_flops_removal(graph, target, np.random.default_rng(seed), multiple=8)
        assert terms.evaluate(graph.alive_ids(aligned)) / full <= target
        widths = _widths(graph, aligned)
        assert widths["c0"] % 8 == 0 and widths["c1"] % 8 == 0, widths
    # Different seeds give different prunings; the same seed the same one.
    a, b = (selection.random_flops_removal(graph, 0.5, np.random.default_rng(s)) for s in (1, 2))
    assert a != b and a == selection.random_flops_removal(graph, 0.5, np.random.default_rng(1))
    with pytest.raises(ValueError, match="target"):
        selection.random_flops_removal(graph, 0.0, np.random.default_rng(0))


def test_group_index_matches_graph():
    graph = kt.analyze(_mlp(widths=(5, 5), residual=True))
    index = graph.group_index
    assert index is graph.group_index  # built once
    assert index.names == list(graph.creating_layers())
    for g in range(graph.num_groups):
        names = {n for n, _ in index.layer_counts(g)}
        assert names == {n for n, m in graph.creating_layers().items() if g in graph.group_of_comp[graph.comp_of[m]]}


def test_knapsack_unreachable_budget_warns_and_returns_cheapest():
    graph = kt.analyze(_mlp())
    terms = _table_terms(graph, TABLES)
    scores = np.ones(graph.num_groups)
    with pytest.warns(UserWarning, match="cannot bring the cost"):
        removed = selection.knapsack_removal(graph, scores, terms, 14.0, channel_multiple=2, min_channels=2)
    assert terms.evaluate(graph.alive_ids(removed)) == pytest.approx(17.0)  # 1 + d0 at 2 (9) + d1 at 2 (7)
