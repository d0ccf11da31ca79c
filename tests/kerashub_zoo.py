"""Small KerasHub vision models built offline from their constructors (random
weights), for the KerasHub sweep (tests/test_kerashub.py,
benchmarks/kerashub_sweep.py). Configs follow keras-hub's own unit tests,
narrowed; every image input leaves H/W unknown (`(None, None, 3)`, KerasHub's
default) unless a model needs a fixed size, and `SIZE` is where it is read."""

from __future__ import annotations

SIZE = (32, 32, 3)


def _hub():
    import keras_hub

    return keras_hub


def resnet(version="v1", block="basic_block"):
    hub = _hub()
    return hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 16], stackwise_num_blocks=[2, 1], stackwise_num_strides=[1, 2],
        block_type=block, use_pre_activation=(version == "v2"),
    )


def resnet_vd():
    hub = _hub()
    return hub.models.ResNetBackbone(
        input_conv_filters=[8, 8, 8], input_conv_kernel_sizes=[3, 3, 3],
        stackwise_num_filters=[64, 16], stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2],
        block_type="bottleneck_block_vd",
    )


def resnet_classifier():
    hub = _hub()
    return hub.models.ResNetImageClassifier(backbone=resnet("v1", "bottleneck_block"), num_classes=5)


def vgg():
    hub = _hub()
    return hub.models.VGGBackbone(stackwise_num_repeats=[1, 2], stackwise_num_filters=[8, 16])


def densenet():
    hub = _hub()
    return hub.models.DenseNetBackbone(stackwise_num_repeats=[2, 2], growth_rate=8)


def cspnet():
    hub = _hub()
    return hub.models.CSPNetBackbone(
        stem_filters=8, stem_kernel_size=3, stem_strides=1, stackwise_strides=2,
        stackwise_depth=[1, 2], stackwise_num_filters=[8, 16], down_growth=True,
        bottle_ratio=(0.5,) + (1.0,), block_ratio=(1.0,) + (0.5,), expand_ratio=(2.0,) + (1.0,),
        block_type="dark_block", stage_type="csp", stem_padding="same",
    )


def mobilenet_v3():
    hub = _hub()
    return hub.models.MobileNetBackbone(
        stackwise_expansion=[[16, 24], [32, 48]], stackwise_num_blocks=[2, 2],
        stackwise_num_filters=[[8, 8], [16, 16]], stackwise_kernel_size=[[3, 3], [5, 5]],
        stackwise_num_strides=[[2, 1], [2, 1]], stackwise_se_ratio=[[None, None], [0.25, 0.25]],
        stackwise_activation=[["relu", "relu"], ["hard_swish", "hard_swish"], ["hard_swish"]],
        stackwise_padding=[[1, 1], [2, 2]], output_num_filters=64, input_activation="hard_swish",
        output_activation="hard_swish", input_num_filters=8, depthwise_filters=8, depthwise_stride=2,
        depthwise_residual=False, squeeze_and_excite=0.5, last_layer_filter=48,
    )


def efficientnet(kind="v2"):
    hub = _hub()
    if kind == "v1":
        types, se = ["v1"] * 3, [0.25] * 3
    else:
        types, se = ["fused", "fused", "unfused"], [0.0, 0.0, 0.25]
    return hub.models.EfficientNetBackbone(
        stackwise_kernel_sizes=[3, 3, 3], stackwise_num_repeats=[1, 2, 2],
        stackwise_input_filters=[8, 8, 16], stackwise_output_filters=[8, 16, 24],
        stackwise_expansion_ratios=[1, 4, 4], stackwise_squeeze_and_excite_ratios=se,
        stackwise_strides=[1, 2, 2], stackwise_block_types=types,
        stackwise_force_input_filters=[0] * 3, stackwise_nores_option=[False] * 3,
        width_coefficient=1.0, depth_coefficient=1.0, num_features=64, min_depth=8 if kind != "v1" else None,
        **({"use_depth_divisor_as_min_depth": True, "cap_round_filter_decrease": True} if kind == "v1" else {}),
    )


def hgnetv2():
    hub = _hub()
    stage = [[16, 8, 32, 1, 1, 3], [32, 16, 48, 1, 1, 3]]
    return hub.models.HGNetV2Backbone(
        embedding_size=16, stem_channels=[3, 8, 16], hidden_act="relu", use_learnable_affine_block=False,
        depths=[1, 1], hidden_sizes=[32, 48], stackwise_stage_filters=stage,
        apply_downsample=[False, True], use_lightweight_conv_block=[False, True], image_shape=(None, None, 3),
    )


def mobilenet_v5():
    hub = _hub()
    return hub.models.MobileNetV5Backbone(
        stackwise_block_types=[["er"], ["uir", "uir"]], stackwise_num_blocks=[1, 2],
        stackwise_num_filters=[[16], [24, 24]], stackwise_strides=[[2], [2, 1]],
        stackwise_act_layers=[["relu"], ["relu", "relu"]], stackwise_exp_ratios=[[4.0], [4.0, 4.0]],
        stackwise_se_ratios=[[0.0], [0.0, 0.0]], stackwise_dw_kernel_sizes=[[0], [5, 5]],
        stackwise_dw_start_kernel_sizes=[[0], [0, 0]], stackwise_dw_end_kernel_sizes=[[0], [0, 0]],
        stackwise_exp_kernel_sizes=[[3], [0, 0]], stackwise_pw_kernel_sizes=[[1], [0, 0]],
        stackwise_num_heads=[[0], [0, 0]], stackwise_key_dims=[[0], [0, 0]], stackwise_value_dims=[[0], [0, 0]],
        stackwise_kv_strides=[[0], [0, 0]], stackwise_use_cpe=[[False], [False, False]],
        stem_size=8, use_msfa=False,
    )


def vit():
    hub = _hub()
    return hub.models.ViTBackbone(image_shape=SIZE, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)


def deeplab():
    hub = _hub()
    bb = hub.models.DeepLabV3Backbone(
        image_encoder=resnet("v2", "basic_block"), spatial_pyramid_pooling_key="P3",
        upsampling_size=2, dilation_rates=[1, 2], low_level_feature_key="P2", projection_filters=8,
    )
    return hub.models.DeepLabV3ImageSegmenter(backbone=bb, num_classes=3)


def xception():
    hub = _hub()
    return hub.models.XceptionBackbone(
        stackwise_conv_filters=[[8, 16], [16, 32], [32, 32]],
        stackwise_pooling=[True, True, False],
    )


def retinanet():
    hub = _hub()
    return hub.models.RetinaNetBackbone(image_encoder=resnet("v1", "basic_block"), min_level=3, max_level=4, use_p5=False)


def basnet():
    hub = _hub()
    encoder = hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 16, 16, 16],
        stackwise_num_blocks=[1, 1, 1, 1], stackwise_num_strides=[1, 2, 2, 2], block_type="basic_block",
    )
    bb = hub.models.BASNetBackbone(image_encoder=encoder, num_classes=1, image_shape=(None, None, 3))
    return hub.models.BASNetImageSegmenter(backbone=bb, num_classes=1)


def mit():
    hub = _hub()
    return hub.models.MiTBackbone(
        layerwise_depths=[1, 1], num_layers=2, layerwise_num_heads=[1, 2], layerwise_sr_ratios=[4, 2],
        max_drop_path_rate=0.0, layerwise_patch_sizes=[7, 3], layerwise_strides=[4, 2], hidden_dims=[8, 16],
        image_shape=SIZE,
    )


def segformer():
    hub = _hub()
    bb = hub.models.SegFormerBackbone(image_encoder=mit(), projection_filters=8)
    return hub.models.SegFormerImageSegmenter(backbone=bb, num_classes=3)


def deit():
    hub = _hub()
    return hub.models.DeiTBackbone(image_shape=SIZE, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32)


def dinov2():
    hub = _hub()
    return hub.models.DINOV2Backbone(
        patch_size=8, num_layers=2, hidden_dim=16, num_heads=2, intermediate_dim=32,
        image_shape=SIZE, position_embedding_shape=SIZE,
    )


def mobilenet_classifier():
    hub = _hub()
    return hub.models.MobileNetImageClassifier(backbone=mobilenet_v3(), num_classes=5)


def efficientnet_classifier():
    hub = _hub()
    return hub.models.EfficientNetImageClassifier(backbone=efficientnet("v2"), num_classes=5)


MODELS = {
    "resnet_v1_basic": lambda: resnet("v1", "basic_block"),
    "resnet_v1_bottleneck": lambda: resnet("v1", "bottleneck_block"),
    "resnet_v2_basic": lambda: resnet("v2", "basic_block"),
    "resnet_v2_bottleneck": lambda: resnet("v2", "bottleneck_block"),
    "resnet_vd": resnet_vd,
    "resnet_classifier": resnet_classifier,
    "vgg": vgg,
    "densenet": densenet,
    "cspnet": cspnet,
    "mobilenet_v3": mobilenet_v3,
    "efficientnet_v1": lambda: efficientnet("v1"),
    "efficientnet_v2": lambda: efficientnet("v2"),
    "hgnetv2": hgnetv2,
    "mobilenet_v5": mobilenet_v5,
    "vit": vit,
    "deeplab_v3": deeplab,
    "xception": xception,
    "retinanet_backbone": retinanet,
    "basnet": basnet,
    "mit": mit,
    "segformer": segformer,
    "deit": deit,
    "dinov2": dinov2,
    "mobilenet_classifier": mobilenet_classifier,
    "efficientnet_classifier": efficientnet_classifier,
}


# Models built at a fixed size (`SIZE`): KerasHub 0.32 cannot build them with
# `image_shape=(None, None, 3)`; their TaylorPruning steps run at `SIZE`.
FIXED_SIZE = {
    "vit": "ViTBackbone refuses image_shape=(None, None, 3) ('Image shape must have defined height and width'): "
    "its position embedding has one row per patch",
    "deit": "DeiTBackbone refuses image_shape=(None, None, 3) ('Image shape must have defined height and width')",
    "dinov2": "DINOV2Backbone cannot be built with image_shape=(None, None, 3) (TypeError in int(None): the "
    "position-embedding grid is computed from the image size)",
    "mit": "MiTBackbone cannot be built with image_shape=(None, None, 3) (TypeError: None / int, the patch "
    "grid is computed from the image size)",
    "segformer": "built on MiT (see 'mit')",
}


def prunable_mac_share(graph, cost) -> float:
    """Share of the Conv/Dense MACs (at the graph's input size) spent in
    calls whose input or output channels hold a prunable group."""
    import numpy as np

    total = prunable = 0.0
    for node in graph.nodes:
        if node.handler is None:
            continue
        macs = node.handler.macs(node.inner, node.in_shapes, node.out_shapes)
        cin = len(node.in_maps[0]) if node.in_maps else 0
        value = macs.total(cin, len(node.out_maps[0]))
        if not value:
            continue
        total += value
        ids = np.concatenate([node.in_maps[0], node.out_maps[0]]) if node.in_maps else node.out_maps[0]
        if (graph.group_of_comp[graph.comp_of[ids]] >= 0).any():
            prunable += value
    return prunable / total if total else 0.0


def taylor_steps(model, size=SIZE, steps=3, seed=0) -> dict:
    """A few TaylorPruning steps on `model` (its input H/W unknown): the
    size FLOPs are counted at comes from the data."""
    import keras
    import numpy as np

    import keras_taylor as kt

    gated = kt.add_gates(model, on_unknown="freeze")
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2 * steps, *size)).astype("float32")
    out = gated.predict(x[:2], verbose=0)
    if not isinstance(out, (dict, list, tuple)) and out.ndim == 2:  # a classifier's logits
        y = rng.integers(0, out.shape[-1], len(x))
        gated.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=[])
    else:
        y = keras.tree.map_structure(lambda t: np.zeros((len(x), *t.shape[1:]), "float32"), out)
        gated.compile(optimizer="sgd", loss="mse", metrics=[])
    cb = kt.TaylorPruning(target=0.99, prune_every=1, channels_per_step=1)
    gated.fit(x, y, batch_size=2, epochs=1, callbacks=[cb], verbose=0)
    return {"taylor_input_shapes": [list(s) for s in cb.input_shapes], "taylor_steps": len(cb.history),
            "taylor_flops": cb.history[-1]["flops_fraction"] if cb.history else 1.0}


def _reload_failure(e, model) -> str:
    """Why `load_model` failed: the KerasHub layers `model` still holds (one
    of them has a config that does not reload) and the innermost message."""
    import re

    text = str(e)
    hub = sorted({type(l).__name__ for l in model.layers if type(l).__module__.startswith("keras_hub")})
    inner = [m for m in re.findall(r"Exception encountered: ([^\n]+)", text) if "could not be deserialized" not in m]
    return f"{', '.join(hub) or 'no KerasHub layer'}: {(inner[-1] if inner else text.splitlines()[0])[:200]}"


def sweep_one(name, fraction=0.3, seed=0, tmpdir=None, size=SIZE, taylor=True):
    """Gate `name`, remove a random `fraction` of its channel groups, prune,
    and measure. Returns a dict (see benchmarks/kerashub_sweep.py)."""
    import os
    import tempfile
    import warnings

    import keras
    import numpy as np

    import keras_taylor as kt
    from keras_taylor.flops import CostModel

    model = MODELS[name]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            gated = kt.add_gates(model, on_unknown="freeze")
        except ValueError as e:  # nothing prunable: add_gates says why
            if "Expected a model with prunable channels" not in str(e):
                raise
            untraced = sorted({str(w.message).split("'")[1] for w in caught if "Cannot trace layer" in str(w.message)})
            return {"model": name, "class": type(model).__name__, "groups": 0, "unknown_layers": [],
                    "untraced": untraced, "prunable_mac_share": 0.0, "pruned": False, "reason": str(e)[:300]}
    untraced = sorted({str(w.message).split("'")[1] for w in caught if "Cannot trace layer" in str(w.message)})
    graph = kt.analyze(gated, on_unknown="freeze", input_shape=size)
    row = {"model": name, "class": type(model).__name__, "groups": graph.num_groups,
           "unknown_layers": sorted({type(n.inner).__name__ for n in graph.nodes if n.handler is None}),
           "untraced": untraced}
    row["prunable_mac_share"] = prunable_mac_share(graph, CostModel(graph))
    if graph.num_groups == 0:
        row.update(pruned=False, reason="no prunable channel group")
        return row
    rng = np.random.default_rng(seed)
    removed = set(rng.choice(graph.num_groups, max(1, int(round(fraction * graph.num_groups))), replace=False).tolist())
    # Keep at least one channel in every Conv/Dense layer.
    for lname, ids in graph.creating_layers().items():
        groups = graph.group_of_comp[graph.comp_of[ids]]
        if groups.size and np.all(np.isin(groups, list(removed))):
            removed.discard(int(groups[0]))
    for layer in kt.gates.gate_layers(gated):
        g = graph.groups_of_layer_output(layer.name)
        layer.gate.assign(np.where((g >= 0) & np.isin(g, list(removed)), 0.0, 1.0).astype("float32"))
    pruned = kt.prune(gated, on_unknown="freeze")
    x = rng.normal(size=(2, *size)).astype("float32")
    want = [np.asarray(a) for a in keras.tree.flatten(gated(x, training=False))]
    got = [np.asarray(a) for a in keras.tree.flatten(pruned(x, training=False))]
    err = max(float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), 1e-12)) for a, b in zip(want, got))
    before = kt.profile(model, input_shape=size)
    after = kt.profile(pruned, input_shape=size)
    tmp = tmpdir or tempfile.mkdtemp()
    path = os.path.join(tmp, f"{name}.keras")
    pruned.save(path)
    try:
        reloaded = keras.saving.load_model(path)
    except Exception as e:  # noqa: BLE001 - a library layer's config: reported in the row
        reload_err, row["reload_error"] = None, _reload_failure(e, pruned)
    else:
        back = [np.asarray(a) for a in keras.tree.flatten(reloaded(x, training=False))]
        reload_err = max(float(np.max(np.abs(a - b))) for a, b in zip(got, back))
    row.update(
        pruned=True, removed_groups=len(removed), max_rel_error=err, reload_max_abs_diff=reload_err,
        flops_ratio=after.flops / before.flops, params_ratio=after.params / before.params,
        flops_before=before.flops, params_before=before.params,
        pruned_class=type(pruned).__name__, input_shape=list(size),
    )
    heads = [l for l in gated.layers if isinstance(l, kt.attention.HeadGate)]
    row["head_gates"] = len(heads)
    row["dynamic_input"] = name not in FIXED_SIZE
    if taylor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row.update(taylor_steps(model, size=size, seed=seed))
    return row
