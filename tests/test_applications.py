"""keras.applications models: gate, prune ~30% of channel groups, surgery equals masking.

A fast subset runs here; `benchmarks/applications_sweep.py` runs every constructor.
"""

import inspect

import keras
import numpy as np
import pytest

import keras_taylor as kt
from keras_taylor.testing import lively_statistics, preprocessed
from conftest import rel_err

SUBSET = {
    "MobileNetV2": 32,
    "MobileNetV3Small": 32,
    "ResNet50": 32,
    "DenseNet121": 32,
    "EfficientNetB0": 32,
    "Xception": 71,
    "ConvNeXtTiny": 32,
    "InceptionResNetV2": 75,
}


@pytest.fixture
def float64():
    """Deep nets accumulate float32 rounding past 1e-5; check equivalence in float64."""
    # Keras caches a global dtype policy derived from floatx: restore both.
    old_floatx, old_policy = keras.config.floatx(), keras.config.dtype_policy().name
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx(old_floatx)
    keras.config.set_dtype_policy(old_policy)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SUBSET))
def test_application_surgery_equals_masking(name, float64):
    size = SUBSET[name]
    fn = getattr(keras.applications, name)
    kwargs = dict(weights=None, input_shape=(size, size, 3), classes=10)
    if "classifier_activation" in inspect.signature(fn).parameters:
        kwargs["classifier_activation"] = None
    keras.utils.set_random_seed(0)
    model = fn(**kwargs)
    lively_statistics(model)
    gated = kt.add_gates(model)
    graph = kt.analyze(gated)
    assert graph.num_groups > 0
    rng = np.random.default_rng(0)
    removed = set(rng.choice(graph.num_groups, size=int(0.3 * graph.num_groups), replace=False).tolist())
    removed = {g for g in removed if min(graph.layer_channel_counts({g}).values()) > 0}
    for layer in gated.layers:
        if isinstance(layer, kt.ChannelGate):
            of = graph.groups_of_layer_output(layer.name)
            layer.gate.assign(np.where(np.isin(of, list(removed)), 0.0, 1.0).astype("float32"))
    pruned = kt.prune(gated)
    x = preprocessed(fn, rng.uniform(0, 255, (2, size, size, 3)))
    masked = gated(x, training=False)
    assert pruned.dtype == "float64"
    assert rel_err(pruned(x, training=False), masked) <= 1e-9
    # Pruning changed the function (the check above is not vacuous) ...
    assert rel_err(model(x, training=False), masked) > 1e-4
    # ... and made the model smaller.
    p_before, p_after = kt.profile(model), kt.profile(pruned)
    assert p_after.flops < p_before.flops and p_after.params == pruned.count_params() < model.count_params()
