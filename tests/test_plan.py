"""Tests for `keras_taylor.plan.PruningPlan`: plain data, JSON round trip, validation."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

import keras_taylor as kt
from keras_taylor.plan import FORMAT, PruningPlan


def _residual_model() -> keras.Model:
    """conv a -> BN; conv b -> BN, added to a's stream (a and b tied); conv c."""
    inputs = keras.Input((8, 8, 3))
    a = keras.layers.BatchNormalization(name="bn_a")(keras.layers.Conv2D(6, 3, padding="same", name="a")(inputs))
    b = keras.layers.BatchNormalization(name="bn_b")(keras.layers.Conv2D(6, 3, padding="same", name="b")(a))
    x = keras.layers.Add(name="add")([a, b])
    x = keras.layers.ReLU()(x)
    c = keras.layers.BatchNormalization(name="bn_c")(keras.layers.Conv2D(5, 3, name="c")(x))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(c))
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(x), name="res")


@pytest.fixture(scope="module")
def graph():
    return kt.analyze(_residual_model())


def test_from_groups_lists_every_member_of_a_tied_group(graph):
    # The residual stream (a, b) is one set of groups spanning two gate sites.
    labels = graph.group_labels()
    tied = [g for g, label in enumerate(labels) if label == "a+b"]
    assert len(tied) == 6
    plan = PruningPlan.from_groups(graph, tied[:2])
    sites = {name for name in plan.removed}
    assert len(sites) >= 2  # both gate sites of the stream name the channels
    assert all(len(v) == 2 for v in plan.removed.values())
    assert plan.removed_groups(graph) == set(tied[:2])
    assert plan.model_name == "res"
    assert plan.num_removed == sum(len(v) for v in plan.removed.values())


def test_json_round_trip(graph, tmp_path):
    groups = [0, 3, graph.num_groups - 1]
    plan = PruningPlan.from_groups(graph, groups)
    text = plan.to_json()
    data = json.loads(text)
    assert data["format"] == FORMAT and data["model_name"] == "res"
    again = PruningPlan.from_json(text)
    assert again == plan
    assert again.removed_groups(graph) == set(groups)
    path = tmp_path / "plan.json"
    plan.save(str(path))
    assert PruningPlan.load(str(path)) == plan
    assert PruningPlan.from_dict(plan.to_dict()) == plan


def test_indices_are_sorted_plain_ints():
    plan = PruningPlan({"bn_a": [np.int64(3), 1, np.int32(2)]})
    assert plan.removed == {"bn_a": [1, 2, 3]}
    assert all(type(i) is int for i in plan.removed["bn_a"])
    json.dumps(plan.to_dict())  # JSON-able


@pytest.mark.parametrize(
    "removed, match",
    [
        (["bn_a"], "map layer names"),
        ({"bn_a": "12"}, "map layer names"),
        ({"bn_a": [1.5]}, "integer channel indices for layer 'bn_a'"),
        ({"bn_a": [True]}, "integer channel indices for layer 'bn_a'"),
        ({3: [1]}, "map layer names"),
    ],
)
def test_constructor_validation(removed, match):
    with pytest.raises(ValueError, match=match):
        PruningPlan(removed)


def test_removed_groups_validation(graph):
    with pytest.raises(ValueError, match="Received: a plan that prunes layer 'nope'"):
        PruningPlan({"nope": [0]}).removed_groups(graph)
    site = graph.gate_sites[0]
    n = len(graph.groups_of_layer_output(site))
    with pytest.raises(ValueError, match=rf"channel indices of layer '{site}' in \[0, {n}\)"):
        PruningPlan({site: [n]}).removed_groups(graph)
    with pytest.raises(ValueError, match="in \\[0"):
        PruningPlan({site: [-1]}).removed_groups(graph)


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "does not parse"),
        ('{"removed": {}}', "format="),
        (json.dumps({"format": "other/1", "removed": {}}), "format="),
        (json.dumps({"format": FORMAT, "removed": []}), "'removed' to map"),
        (json.dumps({"format": FORMAT, "removed": {"bn_a": [0.5]}}), "'removed' to map"),
    ],
)
def test_from_json_validation(text, match):
    with pytest.raises(ValueError, match=match):
        PruningPlan.from_json(text)


def test_load_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("[]")
    with pytest.raises(ValueError, match="broken.json"):
        PruningPlan.load(str(path))


def test_from_gates_matches_the_gates():
    model = _residual_model()
    gated = kt.add_gates(model)
    graph = kt.analyze(gated)
    layer = next(l for l in gated.layers if getattr(l, "is_channel_gate", False) and l.name == "bn_c")
    values = np.ones(5, "float32")
    values[[1, 4]] = 0.0
    layer.gate.assign(values)
    plan = PruningPlan.from_gates(gated)
    assert plan.removed == {"bn_c": [1, 4]}
    assert len(plan.removed_groups(graph)) == 2
