"""Surgery invariant: the pruned model equals the gated model with the removed
channels' gates at 0, for many architectures and channel sets."""

import json

import keras
import numpy as np
import pytest

import keras_taylor as kt
from conftest import FACTORIES, images, make, rel_err

CHANNEL_SETS = {"first": [0], "last": [-1], "one_two": [1, 2], "random30": "random30"}


def groups_for(graph, channel_set, seed=0):
    if channel_set == "random30":
        rng = np.random.default_rng(seed)
        return set(rng.choice(graph.num_groups, size=max(1, int(0.3 * graph.num_groups)), replace=False).tolist())
    groups = set()
    for name in graph.gate_sites:
        of = graph.groups_of_layer_output(name)
        for i in channel_set:
            if of[i] >= 0:
                groups.add(int(of[i]))
    return groups


def zero_gates(gated, graph, groups):
    for layer in [l for l in gated.layers if isinstance(l, kt.ChannelGate)]:
        of = graph.groups_of_layer_output(layer.name)
        layer.gate.assign(np.where(np.isin(of, list(groups)), 0.0, 1.0).astype("float32"))


@pytest.mark.parametrize("arch", sorted(FACTORIES))
@pytest.mark.parametrize("channel_set", sorted(CHANNEL_SETS))
def test_pruned_equals_gated_with_zero_gates(arch, channel_set):
    model = make(arch)
    before = [w.copy() for w in model.get_weights()]
    gated = kt.add_gates(model)
    graph = kt.analyze(gated)
    groups = groups_for(graph, CHANNEL_SETS[channel_set])
    assert groups, "the channel set must remove something"
    zero_gates(gated, graph, groups)

    pruned = kt.prune(gated)
    x = images(6)
    assert rel_err(pruned(x, training=False), gated(x, training=False)) <= 1e-5
    # Stock layers only, smaller, and consistent counts.
    assert not any(getattr(l, "is_channel_gate", False) for l in pruned.layers)
    assert type(pruned) is type(model)
    p_orig, p_pruned = kt.profile(model), kt.profile(pruned)
    assert p_pruned.flops < p_orig.flops
    assert p_pruned.params == pruned.count_params() < model.count_params()
    assert kt.profile(gated).flops == p_pruned.flops
    assert kt.profile(gated).params == p_pruned.params
    # The user's model is untouched.
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_filters_really_removed_and_consumers_sliced():
    model = make("vgg_sequential")
    gated = kt.add_gates(model)
    graph = kt.analyze(gated)
    plan = kt.PruningPlan(removed={"bn0a": [0, 2], "conv1b": [1], "fc1": [3, 4, 5]})
    pruned = kt.apply_plan(gated, plan)
    by_name = {l.name: l for l in pruned.layers}
    assert by_name["conv0a"].filters == 2 and by_name["conv0a"].kernel.shape == (3, 3, 3, 2)
    assert by_name["conv0b"].kernel.shape == (3, 3, 2, 4)
    assert by_name["conv1b"].filters == 7
    # Flatten -> Dense: 4x4 positions x 7 channels remain.
    assert by_name["fc1"].kernel.shape == (4 * 4 * 7, 5)
    assert by_name["logits"].kernel.shape == (5, 5)
    # Same function as zeroing those gates.
    zero_gates(gated, graph, plan.removed_groups(graph))
    x = images(4)
    assert rel_err(pruned(x), gated(x)) <= 1e-5


def test_kept_weights_are_the_original_weights():
    model = make("plain")
    plan = kt.PruningPlan(removed={"b1": [1, 5]})
    pruned = kt.apply_plan(model, plan)
    keep = [0, 2, 3, 4, 6, 7]
    src = {l.name: l for l in model.layers}
    dst = {l.name: l for l in pruned.layers}
    np.testing.assert_array_equal(dst["c1"].kernel.numpy(), src["c1"].kernel.numpy()[..., keep])
    np.testing.assert_array_equal(dst["b1"].moving_mean.numpy(), src["b1"].moving_mean.numpy()[keep])
    np.testing.assert_array_equal(dst["c2"].kernel.numpy(), src["c2"].kernel.numpy()[:, :, keep, :])


def test_residual_group_is_removed_together():
    model = make("residual")
    graph = kt.analyze(model)
    members = graph.group_members()
    stream = next(m for m in members if len(m) > 1)
    layers = {name for name, _ in stream}
    assert {"stem_bn", "s0b0_bn2", "s0b1_bn2"} <= layers
    # Naming one member in a plan removes the whole group.
    name, ch = stream[0]
    pruned = kt.apply_plan(model, kt.PruningPlan(removed={name: [ch]}))
    by_name = {l.name: l for l in pruned.layers}
    assert by_name["stem_conv"].filters == 3
    assert by_name["s0b0_conv2"].filters == 3
    assert by_name["s0b0_conv1"].filters == 4  # not in the stream group


def test_pruned_model_saves_and_loads_without_custom_objects(tmp_path):
    model = make("residual")
    gated = kt.add_gates(model)
    graph = kt.analyze(gated)
    zero_gates(gated, graph, groups_for(graph, "random30"))
    pruned = kt.prune(gated)
    path = str(tmp_path / "pruned.keras")
    pruned.save(path)
    with open(tmp_path / "cfg.json", "w") as f:
        json.dump(pruned.get_config(), f)
    assert "keras_taylor" not in (tmp_path / "cfg.json").read_text()
    reloaded = keras.models.load_model(path)
    x = images(3)
    np.testing.assert_allclose(reloaded(x), pruned(x), rtol=1e-6, atol=1e-6)


def test_plan_that_empties_a_layer_is_refused_and_model_untouched():
    model = make("plain")
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError, match="every output channel of layer 'c1'"):
        kt.apply_plan(model, kt.PruningPlan(removed={"b1": list(range(8))}))
    with pytest.raises(ValueError, match="'nope'"):
        kt.apply_plan(model, kt.PruningPlan(removed={"nope": [0]}))
    with pytest.raises(ValueError, match=r"in \[0, 8\)"):
        kt.apply_plan(model, kt.PruningPlan(removed={"b1": [8]}))
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_plan_json_round_trip(tmp_path):
    plan = kt.PruningPlan(removed={"b1": [3, 1], "fc": [0]}, model_name="plain")
    path = str(tmp_path / "plan.json")
    plan.save(path)
    again = kt.PruningPlan.load(path)
    assert again.removed == {"b1": [1, 3], "fc": [0]}
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="does not parse"):
        kt.PruningPlan.load(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="format"):
        kt.PruningPlan.from_dict({"removed": {}})
