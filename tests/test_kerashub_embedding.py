"""Embedding (residual-stream) width pruning on KerasHub's ViT family, with
`kt.attention.prune_embedding()` on: the patch embedding
(`ViTPatchingAndEmbedding`, `DeiTEmbeddings`: `attention.PatchEmbeddingHandler`),
every LayerNormalization, residual add, attention and MLP of the traced
encoder, and the pooled class token (`x[:, 0]`, `handlers.GetItemOpHandler`)
form one channel group; heads and MLP units prune with it."""

import keras
import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

import keras_taylor as kt  # noqa: E402
from keras_taylor import testing  # noqa: E402
from tests import kerashub_zoo as zoo  # noqa: E402


@pytest.fixture
def embedding():
    kt.attention.prune_embedding()
    try:
        yield
    finally:
        kt.attention.prune_embedding(False)


def _classifier(name):
    backbone = zoo.MODELS[name]()
    if name == "vit":
        return keras_hub.models.ViTImageClassifier(backbone=backbone, num_classes=3)
    if name == "deit":
        return keras_hub.models.DeiTImageClassifier(backbone=backbone, num_classes=3)
    inputs = keras.Input(zoo.SIZE)  # DINOv2: the class token into a Dense head
    return keras.Model(inputs, keras.layers.Dense(3, name="predictions")(backbone(inputs)[:, 0]))


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


EMBED = {"vit": "vit_patching_and_embedding", "deit": "deit_patching_and_embedding", "dinov2": "embeddings"}
EMBED_CLASS = {"vit": "ViTPatchingAndEmbedding", "deit": "DeiTEmbeddings", "dinov2": "DINOV2Embedding"}
# KerasHub layers the pruned model still holds (registered serializables:
# reloading needs `import keras_hub`, no custom_objects).
KERASHUB_LEFT = {
    "vit": ["ViTPatchingAndEmbedding"],
    "deit": ["DeiTEmbeddings"],
    "dinov2": ["DINOV2Embedding", "DINOV2LayerScale"],
}


@pytest.mark.parametrize("name", ["vit", "deit", "dinov2"])
def test_kerashub_vit_embedding_is_one_group_and_prunes_exactly(embedding, name, tmp_path):
    model = _classifier(name)
    gated = kt.add_gates(model)
    graph = kt.analyze(gated)
    emb = graph.groups_of_layer_output(EMBED[name])
    assert len(emb) == 16 and (emb >= 0).all() and len(set(emb.tolist())) == 16
    norms = [l for l in gated.layers if isinstance(l, kt.attention.NormGate)]
    assert len(norms) == 5  # 2 per block + the final LayerNormalization
    for layer in norms:
        np.testing.assert_array_equal(graph.groups_of_layer_output(layer.name), emb)
    heads = [l for l in gated.layers if isinstance(l, kt.attention.HeadGate)]
    assert len(heads) == 2
    scales = [l for l in gated.layers if type(l).__name__ == "DINOV2LayerScale"]
    assert len(scales) == (4 if name == "dinov2" else 0)
    for layer in scales:  # per-channel lambda1 on each residual branch: in the group
        np.testing.assert_array_equal(graph.group_of_comp[graph.comp_of[graph.first_node(layer.name).out_maps[0]]], emb)
    # One group of 16 embedding channels, 2×(1 free head + 32 MLP units).
    assert graph.num_groups == 16 + 2 * (1 + 32)

    rng = np.random.default_rng(0)
    removed = set(rng.choice(emb, size=5, replace=False).tolist())
    removed |= testing.random_groups(graph, 0.3, rng) - set(emb.tolist())
    for h in heads:  # one head of each attention layer goes
        g = graph.groups_of_layer_output(h.name)[:2]
        removed.add(int(g[g >= 0][0]))
    for layer in kt.gates.gate_layers(gated):
        g = graph.groups_of_layer_output(layer.name)
        layer.gate.assign(np.where((g >= 0) & np.isin(g, list(removed)), 0.0, 1.0).astype("float32"))
    pruned = kt.apply_plan(gated, kt.PruningPlan.from_groups(graph, removed))
    x = np.random.default_rng(1).normal(size=(2, *zoo.SIZE)).astype("float32")
    want, got, dense = (np.asarray(m(x, training=False)) for m in (gated, pruned, model))
    assert _rel(got, want) <= 1e-5
    assert _rel(want, dense) > 1e-3  # not vacuous

    width = 16 - 5
    embed = pruned.get_layer(EMBED[name])
    assert type(embed).__name__ == EMBED_CLASS[name] and embed.hidden_dim == width
    assert all(w.shape[-1] == width for w in embed.weights)
    assert pruned.get_layer("predictions").kernel.shape[0] == width
    assert [l.num_heads for l in pruned.layers if isinstance(l, keras.layers.MultiHeadAttention)] == [1, 1]
    assert all(l.gamma.shape == (width,) for l in pruned.layers if isinstance(l, keras.layers.LayerNormalization))
    assert kt.profile(pruned).params == pruned.count_params()
    assert kt.profile(pruned).flops < kt.profile(model).flops
    # The patch embedding's MACs by hand: 16 patches × (8·8·3) inputs × width filters.
    assert kt.profile(pruned).by_name()[EMBED[name]].flops == 16 * 8 * 8 * 3 * width
    assert kt.profile(model).by_name()[EMBED[name]].flops == 16 * 8 * 8 * 3 * 16

    left = sorted({type(l).__name__ for l in pruned.layers if type(l).__module__.startswith("keras_hub")})
    assert left == KERASHUB_LEFT[name]
    assert all(type(l).__module__.split(".")[0] in ("keras", "keras_hub") for l in pruned.layers)
    if name == "dinov2":
        assert all(l.lambda1.shape == (width,) for l in pruned.layers if type(l).__name__ == "DINOV2LayerScale")
    path = str(tmp_path / f"{name}_embedding.keras")
    pruned.save(path)
    if name == "dinov2":
        loaded = keras.saving.load_model(path)  # no custom_objects: keras_hub is imported
        assert _rel(loaded(x, training=False), got) <= 1e-6
    else:
        # KerasHub's own ViTPatchingAndEmbedding/DeiTEmbeddings config lists
        # num_patches/num_positions, which its __init__ refuses: any model
        # holding the layer fails so, pruned or not (docs/kerashub.md §5).
        with pytest.raises(TypeError, match="num_patches"):
            keras.saving.load_model(path)


def test_prune_embedding_off_leaves_kerashub_patch_embedding_unknown():
    kt.attention.prune_embedding()
    kt.attention.prune_embedding(False)
    graph = kt.analyze(zoo.vit(), on_unknown="freeze")
    assert graph.unknown_layers == ["vit_patching_and_embedding"]


def test_kerashub_vit_embedding_is_scored_and_pruned_by_taylor_pruning(embedding):
    """The patch embedding's parameter-side gate (class token, patch conv,
    position Embedding) gets gradient scores in a real train step, and
    TaylorPruning removes embedding channels along with heads/MLP units."""
    model = _classifier("vit")
    gated = kt.add_gates(model)
    gated.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, *zoo.SIZE)).astype("float32")
    y = rng.integers(0, 3, 16)
    embed = gated.get_layer(EMBED["vit"])
    assert isinstance(embed, kt.ChannelGate)
    cb = kt.TaylorPruning(target=0.5, prune_every=2, channels_per_step=8, criterion=kt.attention.PerFlop())
    gated.fit(x, y, batch_size=4, epochs=2, callbacks=[cb], verbose=0)
    assert cb.history and cb.history[-1]["flops_fraction"] < 1.0
    assert np.isfinite(np.asarray(embed.score)).all()
    pruned = kt.prune(gated)
    want = np.asarray(gated(x[:2], training=False))
    assert _rel(pruned(x[:2], training=False), want) <= 1e-5
    assert kt.profile(pruned).flops < kt.profile(model).flops


@pytest.mark.parametrize("name", ["vit", "deit", "dinov2"])
def test_kerashub_patch_embedding_gate_zeroes_its_channels_exactly(embedding, name):
    """The gate scales every weight of the embedding layer (tokens, patch
    conv, positions, also a sublayer's): a channel at gate 0 is exactly 0
    (on every token), the others are unchanged."""
    gated = kt.add_gates(_classifier(name))
    embed = gated.get_layer(EMBED[name])
    assert isinstance(embed, kt.ChannelGate) and embed.mode == "params"
    probe = keras.Model(gated.inputs, embed.output)
    x = np.random.default_rng(2).normal(size=(2, *zoo.SIZE)).astype("float32")
    before = np.asarray(probe(x, training=False))
    gate = np.ones(16, "float32")
    gate[[3, 9]] = 0.0
    embed.gate.assign(gate)
    after = np.asarray(probe(x, training=False))
    assert np.all(np.abs(before[..., [3, 9]]) > 0)
    assert np.all(after[..., [3, 9]] == 0.0)
    np.testing.assert_array_equal(np.delete(after, [3, 9], axis=-1), np.delete(before, [3, 9], axis=-1))
