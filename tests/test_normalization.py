"""Score normalisation before the global ranking: none (CVPR'19), per-layer L2
(ICLR'17), per-group mean (Torch-Pruning), on hand-made score arrays."""

import keras
import numpy as np
import pytest
from conftest import images, make

import keras_taylor as kt
from keras_taylor import criteria
from keras_taylor.oracle import group_labels

LABELS = np.array(["a", "a", "b", "b", "b", "c"])
SCORES = np.array([3.0, 4.0, 1.0, 2.0, 3.0, 0.0])


def test_none_is_identity():
    np.testing.assert_array_equal(criteria.normalize_scores(SCORES, LABELS, "none"), SCORES)


def test_l2_layer_hand_made():
    out = criteria.normalize_scores(SCORES, LABELS, "l2_layer")
    np.testing.assert_allclose(out, [3 / 5, 4 / 5, 1 / 14**0.5, 2 / 14**0.5, 3 / 14**0.5, 0.0])


def test_mean_group_hand_made():
    out = criteria.normalize_scores(SCORES, LABELS, "mean_group")
    np.testing.assert_allclose(out, [3 / 3.5, 4 / 3.5, 0.5, 1.0, 1.5, 0.0])  # "c": mean 0, left as is


def test_live_mask_and_nan_are_left_out_of_the_divisor():
    scores = SCORES.copy()
    scores[3] = np.nan
    live = np.array([True, False, True, True, True, True])
    out = criteria.normalize_scores(scores, LABELS, "mean_group", live)
    # "a": only group 0 is live -> mean 3; "b": NaN left out -> mean (1 + 3) / 2
    np.testing.assert_allclose(out[[0, 1, 2, 4]], [1.0, 4 / 3, 0.5, 1.5])
    assert np.isnan(out[3])
    out = criteria.normalize_scores(scores, LABELS, "l2_layer", live)
    np.testing.assert_allclose(out[[0, 1, 2, 4]], [1.0, 4 / 3, 1 / 10**0.5, 3 / 10**0.5])


def test_mean_group_matches_torch_pruning_mean_normalizer():
    """Torch-Pruning's `_normalize(imp, "mean")` is `imp / imp.mean()` over one
    dependency group's channels; groups of one label are that vector."""
    rng = np.random.default_rng(0)
    scores = rng.gamma(2.0, size=12)
    labels = np.array(["s0"] * 5 + ["s1"] * 7)
    out = criteria.normalize_scores(scores, labels, "mean_group")
    for lab in ("s0", "s1"):
        v = scores[labels == lab]
        np.testing.assert_allclose(out[labels == lab], v / v.mean())


def test_bad_normalization_raises():
    with pytest.raises(ValueError, match=r"normalization.*'l2'"):
        criteria.normalize_scores(SCORES, LABELS, "l2")
    with pytest.raises(ValueError, match=r"normalization.*'mean'"):
        kt.TaylorPruning(normalization="mean")
    with pytest.raises(ValueError, match="one layer label per group"):
        criteria.normalize_scores(SCORES, LABELS[:3], "l2_layer")


# ---- through Criterion.rank ---------------------------------------------------------
def test_criterion_defaults_and_override():
    ctx = criteria.RankingContext(LABELS)
    np.testing.assert_array_equal(criteria.TaylorFOBN().rank(SCORES, ctx), SCORES)  # CVPR'19: raw
    l2 = criteria.normalize_scores(SCORES, LABELS, "l2_layer")
    np.testing.assert_allclose(criteria.ICLR17Taylor().rank(SCORES, ctx), l2)  # ICLR'17: its L2
    np.testing.assert_array_equal(criteria.ICLR17Taylor(normalize=False).rank(SCORES, ctx), SCORES)
    ctx = criteria.RankingContext(LABELS, normalization="mean_group")
    mean = criteria.normalize_scores(SCORES, LABELS, "mean_group")
    np.testing.assert_allclose(criteria.TaylorFOBN().rank(SCORES, ctx), mean)
    np.testing.assert_allclose(criteria.ICLR17Taylor().rank(SCORES, ctx), mean)  # explicit wins
    ctx = criteria.RankingContext(LABELS, normalization="none")
    np.testing.assert_array_equal(criteria.ICLR17Taylor().rank(SCORES, ctx), SCORES)
    ctx.removed = {0}
    ctx.normalization = "l2_layer"
    np.testing.assert_allclose(criteria.TaylorFOBN().rank(SCORES, ctx)[:2], [3 / 4, 1.0])


def test_bn_scale_normalised_then_nan_without_bn():
    ctx = criteria.RankingContext(LABELS, bn_groups=[True] * 5 + [False], normalization="mean_group")
    out = criteria.BNScale().rank(SCORES, ctx)
    np.testing.assert_allclose(out[:5], [3 / 3.5, 4 / 3.5, 0.5, 1.0, 1.5])
    assert np.isnan(out[5])


def test_callback_ranks_by_the_normalised_ema():
    """One pruning step of the callback removes the lowest groups of the
    mean_group-normalised EMA (not of the raw one)."""
    model = make("residual", 0)
    gated = kt.add_gates(model)
    gated.compile(optimizer=keras.optimizers.SGD(0.0), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = images(32, 0), np.random.default_rng(1).integers(0, 5, 32)
    pruner = kt.TaylorPruning(target=0.05, prune_every=4, channels_per_step=3, normalization="mean_group")
    gated.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[pruner])
    assert len(pruner.history) == 1 and len(pruner.removed) == 3
    labels = group_labels(kt.analyze(gated))
    expected = np.argsort(criteria.normalize_scores(pruner.ema, labels, "mean_group"), kind="stable")[:3]
    assert sorted(pruner.removed) == sorted(expected.tolist())
    raw = np.argsort(pruner.ema, kind="stable")[:3]
    assert sorted(raw.tolist()) != sorted(expected.tolist())  # the normalisation changed the choice
