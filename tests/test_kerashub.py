"""KerasHub sweep: vision backbones and tasks built offline from their
constructors (small configs, random weights, H/W unknown like KerasHub's
default), gated, a random 30% of channel groups removed, pruned.

Each must prune exactly (surgery == masking), lose FLOPs, save and reload
with no custom objects, or be listed in `NOT_PRUNABLE` with the reason.
A fast subset runs by default; the full list is `-m exhaustive`."""

import keras
import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

import keras_taylor as kt  # noqa: E402
from tests import kerashub_zoo as zoo  # noqa: E402

FAST = ["resnet_v2_basic", "cspnet", "mobilenet_v3"]

# Models with no prunable group (add_gates refuses them, saying so), and why.
NOT_PRUNABLE = {
    "mobilenet_v5": "every conv feeds RmsNorm2d, which normalises over channels (removing one changes the others)",
}
# Models that prune exactly but whose pruned model does not reload, and the
# KerasHub layer whose config breaks it (any Functional model holding it
# fails so, pruned or not: docs/kerashub.md section 5).
RELOAD_FAILS = {
    "deeplab_v3": "SpatialPyramidPooling",
    "vit": "ViTPatchingAndEmbedding",
    "deit": "DeiTEmbeddings",
}
# Transformers: the MLPs (and keras.layers.MultiHeadAttention heads) prune;
# KerasHub's own attention/embedding layers stay fixed units.
PARTIAL = {"dinov2", "vit", "deit", "mit", "segformer"}
# Composite layers that cannot be traced (a fixed unit each), and why.
UNTRACEABLE = {"deeplab_v3": ["spatial_pyramid_pooling"]}  # makes a Resizing from ops.shape(x) inside call


def _check(name, tmp_path, taylor=True):
    row = zoo.sweep_one(name, tmpdir=str(tmp_path), taylor=taylor)
    if name in NOT_PRUNABLE:
        assert row["groups"] == 0
        return row
    assert row["groups"] > 0
    assert row["untraced"] == UNTRACEABLE.get(name, []), row
    if name not in PARTIAL and name not in UNTRACEABLE:
        assert row["unknown_layers"] == [], row
        assert row["prunable_mac_share"] >= 0.9, row
    assert row["max_rel_error"] <= 1e-5, row
    assert row["flops_ratio"] < 1.0 and row["params_ratio"] < 1.0
    if name in RELOAD_FAILS:
        assert RELOAD_FAILS[name] in row["reload_error"].split(":")[0], row
    else:
        assert "reload_error" not in row and row["reload_max_abs_diff"] <= 1e-6, row
    assert row["pruned_class"] == "Functional"
    if not taylor:
        return row
    # A few TaylorPruning steps, with image_shape=(None, None, 3) unless KerasHub
    # cannot build the model so (zoo.FIXED_SIZE): FLOPs counted at the data's size.
    assert row["dynamic_input"] == (name not in zoo.FIXED_SIZE)
    assert row["taylor_input_shapes"] == [list(zoo.SIZE)] and row["taylor_steps"] >= 1
    assert row["taylor_flops"] < 1.0
    return row


@pytest.mark.parametrize("name", FAST)
def test_kerashub_fast_subset_prunes_exactly(name, tmp_path):
    # TaylorPruning on a (None, None, 3) backbone: test_taylor_pruning_on_dynamic_kerashub_backbone.
    _check(name, tmp_path, taylor=False)


@pytest.mark.exhaustive
@pytest.mark.parametrize("name", [n for n in zoo.MODELS if n not in FAST])
def test_kerashub_sweep(name, tmp_path):
    _check(name, tmp_path)


@pytest.mark.parametrize("name", ["vit", "deit"])
def test_kerashub_vit_gets_head_and_mlp_gates_and_prunes_exactly(name):
    """ViT's and DeiT's encoders (whose configs cannot rebuild them; DeiT's
    blocks return `(output, None)`) are traced: their
    keras.layers.MultiHeadAttention gets head gates, their MLPs unit gates."""
    from keras_taylor import testing

    model = zoo.MODELS[name]()
    gated = kt.add_gates(model)
    graph = kt.analyze(gated)
    heads = [l for l in gated.layers if isinstance(l, kt.attention.HeadGate)]
    mlps = [l for l in kt.gates.gate_layers(gated) if isinstance(l.layer, keras.layers.Dense)]
    assert len(heads) == 2 and len(mlps) == 2
    assert all(len(graph.groups_of_layer_output(l.name)) == 2 for l in heads)
    assert all(len(graph.groups_of_layer_output(l.name)) == 32 for l in mlps)
    removed = testing.random_groups(graph, 0.4, np.random.default_rng(0))
    for h in heads:  # one head of each layer goes, one stays
        g = graph.groups_of_layer_output(h.name)
        removed.add(int(g[0]))
        removed.discard(int(g[1]))
    for layer in kt.gates.gate_layers(gated):
        g = graph.groups_of_layer_output(layer.name)
        layer.gate.assign(np.where((g >= 0) & np.isin(g, list(removed)), 0.0, 1.0).astype("float32"))
    pruned = kt.apply_plan(gated, kt.PruningPlan.from_groups(graph, removed))
    x = np.random.default_rng(1).normal(size=(2, *zoo.SIZE)).astype("float32")
    want, got, dense = (np.asarray(m(x, training=False)) for m in (gated, pruned, model))
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
    assert np.max(np.abs(want - dense)) > 1e-3 * np.max(np.abs(dense))  # the check is not vacuous
    assert [l.num_heads for l in pruned.layers if isinstance(l, keras.layers.MultiHeadAttention)] == [1, 1]
    assert kt.profile(pruned).flops < kt.profile(model).flops


def test_mobilenet_v3_blocks_are_traced_not_frozen():
    model = zoo.mobilenet_v3()
    flat = kt.tracing.inline_composite_layers(model)
    kinds = {type(l).__name__ for l in flat.layers}
    assert not kinds & {"ConvBnActBlock", "DepthwiseConvBlock", "InvertedResidualBlock"}
    assert type(flat) is not type(model) and isinstance(flat, keras.Model)
    x = np.random.default_rng(0).normal(size=(2, *zoo.SIZE)).astype("float32")
    np.testing.assert_allclose(flat(x), model(x), rtol=1e-5, atol=1e-5)
    # The user's model is untouched: its layers gained no nodes.
    assert all(len(l._inbound_nodes) <= 1 for l in model.layers)


def test_taylor_pruning_on_dynamic_kerashub_backbone():
    backbone = zoo.cspnet()
    assert backbone.input.shape[1] is None
    inputs = keras.Input((None, None, 3))
    x = keras.layers.GlobalAveragePooling2D()(backbone(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3)(x))
    gated = kt.add_gates(model)
    gated.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    cb = kt.TaylorPruning(target=0.8, prune_every=2, channels_per_step=4)
    gated.fit(rng.normal(size=(16, 32, 32, 3)).astype("float32"), rng.integers(0, 3, 16), batch_size=4, callbacks=[cb], verbose=0)
    assert cb.input_shapes == [(32, 32, 3)]
    assert cb.history and cb.history[-1]["flops_fraction"] < 1.0
    small = kt.prune(gated)
    assert kt.profile(small, input_shape=(32, 32, 3)).flops < kt.profile(model, input_shape=(32, 32, 3)).flops
