"""keras.applications models: gate, prune ~30% of channel groups, surgery equals masking.

A fast subset runs in the default suite; every constructor runs with
`pytest -m exhaustive tests/test_applications.py` (≈15 min on 2 cores), and
`benchmarks/applications_sweep.py` writes the same check as a JSON survey.
"""

import keras
import pytest

from keras_taylor.testing import application_constructors, prune_application

SUBSET = ["ConvNeXtTiny", "DenseNet121", "EfficientNetB0", "InceptionResNetV2", "MobileNetV2", "MobileNetV3Small", "ResNet50", "Xception"]
ALL = sorted(application_constructors())


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
    keras.backend.clear_session()


def check(name):
    rec = prune_application(getattr(keras.applications, name))
    assert rec["pruned_dtype"] == "float64"
    assert rec["removed_groups"] > 0
    assert rec["rel_err"] <= 1e-9, rec
    # Pruning changed the function (the check above is not vacuous) ...
    assert rec["change_vs_unpruned"] > 1e-4, rec
    # ... and made the model smaller, with counts that agree with Keras.
    assert rec["flops_after"] < rec["flops_before"]
    assert rec["params_after"] == rec["params_keras_after"] < rec["params_before"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SUBSET)
def test_application_surgery_equals_masking(name, float64):
    check(name)


@pytest.mark.exhaustive
@pytest.mark.parametrize("name", ALL)
def test_every_application(name, float64):
    check(name)


def test_the_sweep_covers_every_constructor():
    assert len(ALL) >= 40 and set(SUBSET) <= set(ALL)
