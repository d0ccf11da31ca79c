"""Channel alignment (`keras_taylor.align`): every channel-creating layer keeps a
multiple of 8/16 channels (or all of them), rounding by score, residual streams
together, and the aligned plan goes through surgery."""

import keras
import numpy as np
import pytest
from keras import layers

import keras_taylor as kt
from conftest import images, randomize_bn, rel_err
from keras_taylor import align, selection
from keras_taylor import models as kt_models
from keras_taylor.flops import CostModel
from keras_taylor.testing import random_groups

# Wider versions of conftest's tiny models (24–40 channels, 8×8 inputs), so that
# multiples of 8 and 16 leave room to round both ways.
SHAPE = (8, 8, 3)


def plain_wide():
    inputs = keras.Input(SHAPE)
    x = layers.Conv2D(24, 3, padding="same", name="c1")(inputs)
    x = layers.BatchNormalization(name="b1")(x)
    x = layers.ReLU()(x)
    x = layers.Conv2D(40, 3, strides=2, activation="relu", name="c2")(x)
    x = layers.Conv2D(32, 1, use_bias=False, name="c3")(x)
    x = layers.BatchNormalization(name="b3")(x)
    x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(36, activation="relu", name="fc")(x)
    return keras.Model(inputs, layers.Dense(5, name="out")(x), name="plain_wide")


def residual_wide():
    return kt_models.resnet(input_shape=SHAPE, num_classes=5, widths=(24, 40), blocks_per_stage=2, name="res_wide")


def concat_wide():
    """A conv added to a concatenation of two convs: layers share some groups."""
    inputs = keras.Input(SHAPE)
    a = layers.Conv2D(20, 3, padding="same", name="a")(inputs)
    a = layers.BatchNormalization(name="a_bn")(a)
    b = layers.Conv2D(13, 1, padding="same", name="b")(inputs)
    b = layers.ReLU(name="b_relu")(b)
    x = layers.Concatenate(name="cat")([a, b])
    c = layers.Conv2D(33, 3, padding="same", name="c")(x)
    c = layers.BatchNormalization(name="c_bn")(c)
    x = layers.Add(name="add")([x, c])
    x = layers.Conv2D(28, 1, activation="relu", name="d")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(4, name="out")(x), name="concat_wide")


def depthwise_wide():
    """MobileNetV2-style: expand, depthwise (multiplier 2), project into a residual stream."""
    inputs = keras.Input(SHAPE)
    x = layers.Conv2D(24, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(6.0)(x)
    y = layers.Conv2D(40, 1, name="expand")(x)
    y = layers.ReLU()(y)
    y = layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw")(y)
    y = layers.BatchNormalization(name="dw_bn")(y)
    y = layers.ReLU()(y)
    y = layers.Conv2D(24, 1, name="project")(y)
    y = layers.BatchNormalization(name="project_bn")(y)
    x = layers.Add(name="add")([x, y])
    x = layers.SeparableConv2D(32, 3, padding="same", activation="relu", name="sep")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(3, name="out")(x), name="depthwise_wide")


def grouped_wide():
    """A groups=2 conv ties channel j across its groups: 2 channels per group there."""
    inputs = keras.Input(SHAPE)
    x = layers.Conv2D(32, 3, padding="same", name="c")(inputs)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.ReLU()(x)
    x = layers.Conv2D(40, 3, padding="same", groups=2, name="grp")(x)
    x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(2, name="out")(x), name="grouped_wide")


WIDE = {"plain": plain_wide, "residual": residual_wide, "concat": concat_wide, "depthwise": depthwise_wide, "grouped": grouped_wide}
# Models where every group lies in layers that all hold the same groups, so each
# layer is rounded once, in one direction (concat's layers overlap partly).
SIMPLE = ("plain", "residual", "depthwise")

_CACHE = {}


def setup(name):
    """(model, graph) for a wide factory, built once per test session."""
    if name not in _CACHE:
        keras.utils.set_random_seed(0)
        model = randomize_bn(WIDE[name]())
        _CACHE[name] = (model, kt.analyze(model))
    return _CACHE[name]


def random_case(graph, seed, fraction=0.3):
    rng = np.random.default_rng(seed)
    return random_groups(graph, fraction, rng), rng.random(graph.num_groups)


def kept_counts(graph, removed):
    return graph.layer_channel_counts(removed)


def full_counts(graph):
    return {name: len(m) for name, m in graph.creating_layers().items()}


def assert_aligned(graph, removed, multiple):
    full = full_counts(graph)
    for name, k in kept_counts(graph, removed).items():
        assert k > 0, name
        assert k % multiple == 0 or k == full[name], (name, k, full[name], multiple)
    report = align.alignment_report(graph, removed, multiple)
    assert [r.name for r in report] == list(full) and all(r.aligned for r in report)


@pytest.mark.parametrize("name", sorted(WIDE))
@pytest.mark.parametrize("multiple", [8, 16])
@pytest.mark.parametrize("mode", ["nearest", "up", "down"])
def test_every_creating_layer_is_a_multiple_or_full(name, multiple, mode):
    _, graph = setup(name)
    for seed in range(3):
        removed, scores = random_case(graph, seed)
        before = set(removed)
        aligned = align.align_removed(graph, removed, scores, multiple, mode=mode)
        assert removed == before  # the input is not modified
        assert_aligned(graph, aligned, multiple)
        if mode == "up":
            assert aligned <= removed
        if mode == "down" and name in SIMPLE:  # restores only where a layer cannot go down
            before_k, after_k = kept_counts(graph, removed), kept_counts(graph, aligned)
            for layer, k in before_k.items():
                assert after_k[layer] <= k or k < multiple, (layer, k, after_k[layer])
        # Deterministic: the same arguments give the same set, in any iteration order.
        assert align.align_removed(graph, sorted(removed, reverse=True), scores, multiple, mode=mode) == aligned


@pytest.mark.parametrize("name", sorted(WIDE))
def test_nothing_removed_stays_nothing_and_multiple_one_is_identity(name):
    _, graph = setup(name)
    removed, scores = random_case(graph, 0)
    assert align.align_removed(graph, set(), scores, 8) == set()
    assert align.align_removed(graph, [], scores, 16, mode="down") == set()
    assert align.align_removed(graph, removed, scores, 1) == removed


@pytest.mark.parametrize("name", SIMPLE)
@pytest.mark.parametrize("multiple", [8, 16])
def test_rounds_to_the_nearest_multiple_by_score(name, multiple):
    """Per layer: the count moves to the nearest multiple (or full width), restored
    groups are the highest-scored removed ones, newly removed groups the
    lowest-scored kept ones."""
    _, graph = setup(name)
    full = full_counts(graph)
    creating = graph.creating_layers()
    for seed in range(4):
        removed, scores = random_case(graph, seed)
        aligned = align.align_removed(graph, removed, scores, multiple)
        before, after = kept_counts(graph, removed), kept_counts(graph, aligned)
        restored, dropped = removed - aligned, aligned - removed
        assert restored or dropped  # random sets are rarely aligned already
        for layer, k in before.items():
            down, up = (k // multiple) * multiple, min(-(-k // multiple) * multiple, full[layer])
            if k == full[layer] or k % multiple == 0:
                assert after[layer] == k, layer
                continue
            choices = [c for c in (down, up) if c > 0]
            best = min(abs(c - k) for c in choices)
            assert after[layer] in choices and abs(after[layer] - k) == best, (layer, k, after[layer])
            groups = set(graph.group_of_comp[graph.comp_of[creating[layer]]].tolist()) - {-1}
            still_removed = [scores[g] for g in groups if g in aligned]
            still_kept = [scores[g] for g in groups if g not in aligned]
            if groups & restored:
                assert min(scores[g] for g in groups & restored) >= max(still_removed, default=-np.inf)
            if groups & dropped:
                assert max(scores[g] for g in groups & dropped) <= min(still_kept, default=np.inf)


def test_ties_alternate_and_min_channels_is_respected():
    _, graph = setup("plain")
    creating = graph.creating_layers()
    scores = np.arange(graph.num_groups, dtype=float)
    # c1 keeps 20 (halfway between 16 and 24), c2 keeps 36 (halfway between 32 and 40).
    removed = set()
    for layer, n in (("c1", 4), ("c2", 4)):
        g = graph.group_of_comp[graph.comp_of[creating[layer]]]
        removed.update(g[:n].tolist())
    aligned = align.align_removed(graph, removed, scores, 8)
    after = kept_counts(graph, aligned)
    assert (after["c1"], after["c2"]) == (24, 32)  # first tie up, the next one down
    # min_channels forbids rounding c1 (kept 3) down to 0 and c2 (kept 9) down to 8.
    removed = set()
    for layer, n in (("c1", 21), ("c2", 31)):
        g = graph.group_of_comp[graph.comp_of[creating[layer]]]
        removed.update(g[:n].tolist())
    after = kept_counts(graph, align.align_removed(graph, removed, scores, 8, min_channels=9))
    assert (after["c1"], after["c2"]) == (8, 16)
    after = kept_counts(graph, align.align_removed(graph, removed, scores, 8, min_channels=1))
    assert (after["c1"], after["c2"]) == (8, 8)


@pytest.mark.parametrize("name", sorted(WIDE))
@pytest.mark.parametrize("multiple", [8, 16])
def test_aligned_plan_goes_through_surgery(name, multiple):
    """Residual streams stay consistent: surgery accepts the plan, the pruned
    model's filters are multiples (or full), and it equals the masked model."""
    model, graph = setup(name)
    removed, scores = random_case(graph, 1, fraction=0.4)
    aligned = align.align_removed(graph, removed, scores, multiple)
    pruned = kt.apply_plan(model, kt.PruningPlan.from_groups(graph, aligned))
    full = full_counts(graph)
    for layer in pruned.layers:
        width = getattr(layer, "filters", None) or getattr(layer, "units", None)
        if width is not None and layer.name in full:
            assert width % multiple == 0 or width == full[layer.name], (layer.name, width)
        if isinstance(layer, layers.DepthwiseConv2D) and not isinstance(layer, layers.SeparableConv2D):
            assert layer.output.shape[-1] % multiple == 0
    assert kept_counts(kt.analyze(pruned), ()) == kept_counts(graph, aligned)
    # Same output as the gated model with those groups' gates at 0.
    gated = kt.add_gates(model)
    for layer in gated.layers:
        if isinstance(layer, kt.ChannelGate):
            of = graph.groups_of_layer_output(layer.name)
            layer.gate.assign(np.where(np.isin(of, list(aligned)), 0.0, 1.0).astype("float32"))
    x = images(4, shape=SHAPE)
    assert rel_err(pruned(x, training=False), gated(x, training=False)) < 1e-5


def test_residual_stream_layers_move_together():
    _, graph = setup("residual")
    creating = graph.creating_layers()
    stream = ["s1b0_conv2", "s1b0_proj", "s1b1_conv2"]  # all add into stage 1's stream
    sets = [set(graph.group_of_comp[graph.comp_of[creating[n]]].tolist()) for n in stream]
    assert sets[0] == sets[1] == sets[2]
    for seed in range(4):
        removed, scores = random_case(graph, seed, fraction=0.5)
        after = kept_counts(graph, align.align_removed(graph, removed, scores, 16))
        assert len({after[n] for n in stream}) == 1 and after[stream[0]] % 16 == 0


def test_fallback_rounds_up_only_and_still_aligns():
    """With no passes allowed, only the restore-only fallback runs: a subset of
    the input, every layer aligned (the concat model's layers overlap)."""
    _, graph = setup("concat")
    for seed in range(3):
        removed, scores = random_case(graph, seed, fraction=0.5)
        aligned = align.align_removed(graph, removed, scores, 8, max_passes=0)
        assert aligned <= removed
        assert_aligned(graph, aligned, 8)


@pytest.mark.parametrize("name", ["residual", "depthwise"])
def test_align_to_target_lands_at_or_under_the_target(name):
    model, graph = setup(name)
    cost = CostModel(graph)
    dense = cost.evaluate(graph.alive_ids(()))[0]
    fraction = lambda r: cost.evaluate(graph.alive_ids(r))[0] / dense
    for seed in range(3):
        rng = np.random.default_rng(seed)
        scores = rng.random(graph.num_groups)
        removed = set()  # global ranking, lowest first, until FLOPs <= 0.6
        for g in np.argsort(scores).tolist():
            trial = removed | {g}
            if min(kept_counts(graph, trial).values()) < 1:
                continue
            removed = trial
            if fraction(removed) <= 0.6:
                break
        aligned = selection.align_to_target(graph, removed, scores, 8, fraction, 0.6)
        assert fraction(aligned) <= 0.6
        assert_aligned(graph, aligned, 8)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"multiple": 0},
        {"multiple": -8},
        {"multiple": 2.5},
        {"multiple": 8.0},
        {"multiple": "8"},
        {"multiple": True},
        {"multiple": None},
        {"min_channels": 0},
        {"mode": "round"},
        {"max_passes": -1},
        {"scores": np.zeros(3)},
        {"removed": {10**6}},
        {"removed": {-1}},
    ],
)
def test_bad_arguments_raise(kwargs):
    _, graph = setup("plain")
    args = {"removed": {0}, "scores": np.zeros(graph.num_groups), "multiple": 8}
    args.update(kwargs)
    with pytest.raises(ValueError, match="Expected"):
        align.align_removed(graph, args.pop("removed"), args.pop("scores"), args.pop("multiple"), **args)
    if "multiple" in kwargs:
        with pytest.raises(ValueError, match="multiple"):
            align.alignment_report(graph, {0}, kwargs["multiple"])
    with pytest.raises(ValueError, match="target"):
        selection.align_to_target(graph, {0}, np.zeros(graph.num_groups), 8, lambda r: 1.0, 1.5)
    with pytest.raises(ValueError, match="callable"):
        selection.align_to_target(graph, {0}, np.zeros(graph.num_groups), 8, 0.5, 0.5)


@pytest.mark.parametrize("name", ["plain", "residual"])
def test_callback_channel_multiple_aligns_the_last_step_under_the_target(name):
    """`TaylorPruning(channel_multiple=8)`: every layer of the pruned model is a
    multiple of 8 (or full), FLOPs stay at or under the target, the gates match
    the callback's plan, and surgery equals the gated model."""
    keras.utils.set_random_seed(0)
    model = randomize_bn(WIDE[name]())
    gated = kt.add_gates(model)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (64, *SHAPE)).astype("float32")
    y = rng.integers(0, 5, 64)
    gated.compile(optimizer=keras.optimizers.SGD(0.01), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    pruner = kt.TaylorPruning(target=0.6, prune_every=2, channels_per_step=8, channel_multiple=8)
    gated.fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0, callbacks=[pruner])
    assert pruner.done and pruner.history[-1]["aligned_to"] == 8
    assert pruner.history[-1]["flops_fraction"] <= 0.6
    graph = kt.analyze(gated)
    assert_aligned(graph, set(pruner.removed), 8)
    assert kt.PruningPlan.from_gates(gated).removed_groups(graph) == set(pruner.removed)
    small = kt.prune(gated)
    assert kt.profile(small).flops <= 0.6 * kt.profile(model).flops
    np.testing.assert_allclose(small.predict(x[:8], verbose=0), gated.predict(x[:8], verbose=0), rtol=1e-4, atol=1e-5)


def test_callback_rejects_a_bad_channel_multiple():
    with pytest.raises(ValueError, match="channel_multiple=0"):
        kt.TaylorPruning(channel_multiple=0)
