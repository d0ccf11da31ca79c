"""Importance criteria: how one minibatch becomes a score per channel group.

Every criterion runs inside the compiled train step (`scoring.py`): it reads
the per-group quantities it needs from a `Signals` object and returns that
minibatch's score per group (higher = more important). The scorer averages
the scores over the `K` minibatches between pruning steps, the callback
smooths them across steps (EMA) and, before the global ranking, passes them
through `Criterion.rank` (per-layer normalisation, FLOPs regularisation).

Signals are computed lazily, so a criterion pays only for what it reads.
The Taylor-FO-BN default reads the gate gradients only (no activation-sized
work); criteria that need per-example gate gradients or activation
statistics make the train step keep the gated activations and their
gradients from the same tape (no extra forward or backward pass, but
activation-sized elementwise work; see README, "Criteria").

Notation (docs/DESIGN.md §1): `a` = a channel's output after its BatchNorm (the
gate's output), `g = ∂L/∂a`, `m` = the channel's gate, `E_b = Σ_{h,w} a·g` for
example `b` (the per-example gate gradient), `M` = spatial positions. A group
(channels tied by residual adds, depthwise convs, ...) is one shared gate:
its gate gradient is the sum of its members'.

| id | paper | per-minibatch score of a group |
|----|-------|--------------------------------|
| `taylor_fo_bn` | CVPR'19 Taylor-FO, gate after BN (Table 2 best) | `(Σ_b E_b)²` = `(∂L/∂m)²` |
| `taylor_fo_weight` | CVPR'19 Taylor-FO on weights | `(Σ_{filter} w·∂L/∂w)²` |
| `taylor_fo_fg` | CVPR'19 Taylor-FO-FG (full gradient) | `Σ_b E_b²` |
| `taylor_so` | CVPR'19 Taylor-SO, diagonal Hessian | `(−∂L/∂m + ½ H_mm)²`, `H_mm ≈ B·Σ_b E_b²` (empirical Fisher) |
| `iclr17_taylor` | ICLR'17 Eq. 7 (paper) | `(1/B) Σ_b |(1/M) Σ_{h,w} a·g|` + per-layer L2 normalisation |
| `iclr17_taylor_nvlabs` | ICLR'17 as in NVlabs' code | `(1/B) Σ_b (1/M) Σ_{h,w} |a·g|` + per-layer L2 normalisation |
| `bn_scale` | CVPR'19 baseline (BN scale) | `Σ_members |γ|` |
| `weight_l1` / `weight_l2` | ICLR'17/CVPR'19 baselines | `Σ |w|` / `(Σ w²)^½` over the group's filters |
| `activation_mean` / `activation_std` | ICLR'17 baselines | mean / std of `relu(a)` over batch and positions |
| `apoz` | ICLR'17 baseline (Hu et al. 2016) | `1 − APoZ`, the fraction of positive `a` |
| `random` | baseline | uniform in [0, 1) |
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops


# ---- normalisation before the global ranking ---------------------------------------------
NORMALIZATIONS = ("none", "l2_layer", "mean_group")


def check_normalization(normalization):
    """Returns `normalization` if it is `None` or one of `NORMALIZATIONS`, else raises."""
    if normalization is not None and normalization not in NORMALIZATIONS:
        raise ValueError(
            f"Expected normalization to be None (the criterion's own) or one of {NORMALIZATIONS}. "
            f"Received: normalization={normalization!r}"
        )
    return normalization


def _per_label(scores, labels, live, divisor) -> np.ndarray:
    """Divides each label's scores by `divisor(live finite scores of the label)`
    (left as they are when the divisor is not a positive finite number)."""
    out = np.asarray(scores, dtype="float64").copy()
    labels = np.asarray(labels)
    if labels.shape != out.shape:
        raise ValueError(f"Expected one layer label per group ({out.shape}). Received: {labels.shape} labels.")
    live = np.ones(out.shape, dtype=bool) if live is None else np.asarray(live, dtype=bool)
    for label in np.unique(labels):
        rows = labels == label
        use = rows & live & np.isfinite(out)
        d = divisor(out[use]) if use.any() else 0.0
        if np.isfinite(d) and d > 0:
            out[rows] = out[rows] / d
    return out


def l2_layer(scores, labels, live=None) -> np.ndarray:
    """ICLR'17 §2.2 per-layer L2 normalisation: `Θ / ||Θ_layer||_2`.

    The norm of a layer is taken over its live groups with finite scores.
    """
    return _per_label(scores, labels, live, lambda v: float(np.sqrt(np.sum(v**2))))


def mean_group(scores, labels, live=None) -> np.ndarray:
    """Torch-Pruning's default `normalizer="mean"`: `Θ / mean(Θ_group)`.

    Torch-Pruning (`pruner/importance.py`, `GroupMagnitudeImportance._normalize`,
    used by `GroupTaylorImportance`) divides the importance vector of one
    dependency group — every channel index of a set of coupled layers, e.g.
    all the convs feeding one residual stream — by its mean, over the
    channels that still exist. A keras_taylor group is one channel index of
    such a set, and groups of the same set share a layer label, so the mean
    is over the live groups with finite scores of the same label.
    """
    return _per_label(scores, labels, live, lambda v: float(np.mean(v)))


def normalize_scores(scores, labels, normalization: str, live=None) -> np.ndarray:
    """Applies one of `NORMALIZATIONS` per layer label (pure function).

    Args:
        scores: one score per channel group.
        labels: one layer label per group (`oracle.group_labels`).
        normalization: `"none"` (CVPR'19: the raw scores, ranked globally),
            `"l2_layer"` (ICLR'17: divided by the layer's L2 norm) or
            `"mean_group"` (Torch-Pruning: divided by the coupled group's mean).
        live: optional boolean mask of the groups not yet removed; the norm
            or mean is over those only (removed groups are scaled alike).

    Returns:
        A float64 array, the same shape as `scores`.
    """
    check_normalization(normalization)
    if normalization in (None, "none"):
        return np.asarray(scores, dtype="float64")
    return (l2_layer if normalization == "l2_layer" else mean_group)(scores, labels, live)


def _live(context):
    """The context's live-group mask, or None for a context without one."""
    live = getattr(context, "live", None)
    return live() if callable(live) else None


class Criterion:
    """Base class for importance criteria.

    Subclasses implement `batch_score(signals)` with backend ops (it runs
    inside the compiled train step) and may override `rank(scores, context)`
    (host side, numpy) to transform the smoothed scores before the global
    ranking.

    Attributes:
        name: the string id.
        uses_activations: the criterion reads per-example gate gradients or
            activation statistics, so the train step must keep the gated
            activations and their gradients.
    """

    name = "criterion"
    uses_activations = False
    default_normalization = "none"

    def build(self, num_groups: int) -> None:
        """Creates any state the criterion needs, eagerly, before tracing."""

    def batch_score(self, signals):  # pragma: no cover - interface
        raise NotImplementedError

    def normalization(self, context) -> str:
        """The normalisation in effect: the context's (`TaylorPruning(normalization=)`)
        when set, else the criterion's own `default_normalization`."""
        chosen = getattr(context, "normalization", None)
        return chosen if chosen is not None else self.default_normalization

    def rank(self, scores: np.ndarray, context) -> np.ndarray:
        """Scores used for the global ranking: the scores, normalised per layer
        label as `self.normalization(context)` says (default: not at all)."""
        method = self.normalization(context)
        if method == "none":
            return scores
        return normalize_scores(scores, context.layer_labels, method, _live(context))

    def get_config(self) -> dict:
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class RankingContext:
    """What `Criterion.rank` may need about the model, computed on demand.

    Args:
        layer_labels: per group, the label of the layer(s) whose output
            channels it holds (groups of one residual stream share a label).
        group_flops: callable returning, per group, the FLOPs of keeping it
            (the FLOPs its removal saves in the unpruned model).
        bn_groups: per group, whether a BatchNormalization channel is among
            its members.
        normalization: one of `NORMALIZATIONS`, or `None` for each
            criterion's own (`Criterion.default_normalization`).

    Attributes:
        removed: the groups removed so far (set by the caller before each
            ranking); per-layer norms and means are over the others.
    """

    def __init__(self, layer_labels, group_flops=None, bn_groups=None, normalization=None):
        self.layer_labels = np.asarray(layer_labels)
        self._group_flops = group_flops
        self._flops = None
        self.bn_groups = None if bn_groups is None else np.asarray(bn_groups, dtype=bool)
        self.normalization = check_normalization(normalization)
        self.removed = ()

    def live(self) -> np.ndarray:
        """Per group, whether it is not in `removed`."""
        live = np.ones(len(self.layer_labels), dtype=bool)
        removed = np.fromiter((int(g) for g in self.removed), dtype=np.int64)
        live[removed] = False
        return live

    def group_flops(self) -> np.ndarray:
        """Per-group FLOPs, normalised by the largest (in (0, 1])."""
        if self._flops is None:
            if self._group_flops is None:
                raise ValueError("This ranking context has no FLOPs model.")
            flops = np.asarray(self._group_flops(), dtype="float64")
            top = flops.max() if flops.size else 0.0
            self._flops = flops / top if top > 0 else flops
        return self._flops


_CRITERIA: dict = {}


def register(cls):
    """Class decorator: registers a criterion under `cls.name` (and for saving)."""
    _CRITERIA[cls.name] = cls
    return keras.saving.register_keras_serializable(package="keras_taylor")(cls)


# ---- CVPR'19 --------------------------------------------------------------------
@register
class TaylorFOBN(Criterion):
    """Taylor-FO on a gate after BN (Molchanov et al., CVPR 2019, Eq. 8 with gates).

    Per minibatch, `s = (dL/dm)^2 = (sum_{b,h,w} a * dL/da)^2`, where `m` is the
    gate on a channel's output after its BatchNormalization. For a channel
    group (residual add, shared gate) `dL/dm` is the sum of the members' gate
    gradients, so the score is the exact shared-gate score
    `(sum_members dL/dm_member)^2`. Costs a C-sized multiply per gated layer.

    References:
        Molchanov, Mallya, Tyree, Frosio, Kautz. "Importance Estimation for
        Neural Network Pruning". CVPR 2019.
    """

    name = "taylor_fo_bn"

    def batch_score(self, signals):
        return ops.square(signals.group_grad)


@register
class TaylorFOWeight(Criterion):
    """Taylor-FO on the weights (CVPR'19, "Weight" rows of Tables 1-2; NVlabs method 0).

    `s = (sum_{s in filter} w_s * dL/dw_s)^2`, over every weight that makes the
    group's channels (kernel slice and bias of each Conv/Dense writing to the
    group). For a conv followed by a BatchNorm in training mode this is close
    to 0: BN makes the loss invariant to the filter's scale, so
    `sum w * dL/dw` vanishes up to BN's epsilon. The paper's finding that
    gates after BN score better comes from this.
    """

    name = "taylor_fo_weight"

    def batch_score(self, signals):
        return ops.square(signals.filter_grad)


@register
class TaylorFOFG(Criterion):
    """Taylor-FO with the full (per-example) gradient (CVPR'19 "FO-FG"; NVlabs method 23).

    `s = sum_b (sum_{h,w} a_b * g_b)^2`: the per-example gate gradients are
    squared before they are summed over the minibatch.
    """

    name = "taylor_fo_fg"
    uses_activations = True

    def batch_score(self, signals):
        return signals.example_grad_sq


@register
class TaylorSO(Criterion):
    """Second-order Taylor on the gate (CVPR'19 Eq. 5; NVlabs method 11).

    `s = (-m * dL/dm + 1/2 * m^2 * H_mm)^2` at `m = 1`: the loss change of
    setting the gate to 0 under a quadratic model. NVlabs compute `H_mm` from
    the full Hessian of each gate layer; here the diagonal is the empirical
    Fisher of the gates, `H_mm ≈ (1/B) sum_b (d l_b / dm)^2 = B * sum_b E_b^2`
    (`l_b` the per-example loss, `L = mean_b l_b`, `E_b = (1/B) d l_b / dm`),
    which costs no extra backward pass: the same per-example gate gradients as
    `taylor_fo_fg`.
    """

    name = "taylor_so"
    uses_activations = True

    def batch_score(self, signals):
        hessian = signals.examples * signals.example_grad_sq
        return ops.square(-signals.group_grad + 0.5 * hessian)


# ---- ICLR'17 ------------------------------------------------------------------------
class _LayerNormalized(Criterion):
    """Per-layer L2 normalisation and optional FLOPs regularisation (ICLR'17 §2.2-2.3).

    Before the global ranking, each layer's scores are divided by their L2
    norm, `Θ / ||Θ_layer||_2`; with `flops_regularization = λ > 0` the score
    becomes `Θ − λ · FLOPs_g`, where `FLOPs_g` is the cost of keeping one
    channel of the group's layer(s), normalised by the largest one (so in
    (0, 1]; the paper uses λ = 1e-3). A "layer" is the set of Conv/Dense
    layers that write a group's channels: the groups of one residual stream
    are normalised together.
    """

    def __init__(self, flops_regularization: float = 0.0, normalize: bool = True):
        if isinstance(flops_regularization, bool) or not isinstance(flops_regularization, (int, float)) or flops_regularization < 0:
            raise ValueError(
                "Expected flops_regularization to be a number >= 0. "
                f"Received: flops_regularization={flops_regularization!r}"
            )
        if not isinstance(normalize, bool):
            raise ValueError(f"Expected normalize to be a bool. Received: normalize={normalize!r}")
        self.flops_regularization = float(flops_regularization)
        self.normalize = normalize

    @property
    def default_normalization(self):
        return "l2_layer" if self.normalize else "none"

    def rank(self, scores, context):
        out = normalize_scores(scores, context.layer_labels, self.normalization(context), _live(context))
        if self.flops_regularization > 0:
            out = out - self.flops_regularization * context.group_flops()
        return out

    def get_config(self):
        return {"flops_regularization": self.flops_regularization, "normalize": self.normalize}


@register
class ICLR17Taylor(_LayerNormalized):
    """ICLR'17 Taylor criterion as the paper writes it (Molchanov et al. 2017, Eq. 7).

    `Θ = (1/B) sum_b |(1/M) sum_{h,w} a_b * g_b|`: the absolute value of each
    example's spatially averaged `a·g`, averaged over examples; then per-layer
    L2 normalisation (and optional FLOPs regularisation) before ranking.

    References:
        Molchanov, Tyree, Karras, Aila, Kautz. "Pruning Convolutional Neural
        Networks for Resource Efficient Inference". ICLR 2017.
    """

    name = "iclr17_taylor"
    uses_activations = True

    def batch_score(self, signals):
        return signals.example_mean_abs / signals.examples


@register
class ICLR17TaylorNVlabs(_LayerNormalized):
    """The ICLR'17 criterion as NVlabs' `Taylor_pruning` code computes it (method 6).

    `Θ = mean_{b,h,w} |a * g|`: the absolute value is taken *inside* the
    mean (per position), not of the spatial mean; then per-layer L2
    normalisation. For a group, the members' values are summed.
    """

    name = "iclr17_taylor_nvlabs"
    uses_activations = True

    def batch_score(self, signals):
        return signals.product_abs_mean / signals.examples


# ---- baselines ----------------------------------------------------------------------
@register
class BNScale(Criterion):
    """BatchNorm scale `|γ|` (CVPR'19 Table 2 "BN scale"; Liu et al. 2017).

    Summed over the group's BN channels. Groups without a BatchNormalization
    (a gate right after a conv) rank as NaN and are never removed.
    """

    name = "bn_scale"

    def batch_score(self, signals):
        return signals.bn_scale

    def rank(self, scores, context):
        scores = super().rank(scores, context)
        if context.bn_groups is None:
            return scores
        return np.where(context.bn_groups, scores, np.nan)


@register
class WeightL1(Criterion):
    """L1 norm of the filters that make the group's channels (Li et al. 2017)."""

    name = "weight_l1"

    def batch_score(self, signals):
        return signals.filter_l1


@register
class WeightL2(Criterion):
    """L2 norm of the filters that make the group's channels ("weight magnitude")."""

    name = "weight_l2"

    def batch_score(self, signals):
        return ops.sqrt(signals.filter_sq)


@register
class ActivationMean(Criterion):
    """Mean of `relu(a)` over the minibatch and positions (ICLR'17 baseline).

    Read on `relu(a)` because the ICLR'17 baselines rank feature maps after
    ReLU; for channels a ReLU follows (the usual conv-BN-ReLU) this is exactly
    what the next layer reads.
    """

    name = "activation_mean"
    uses_activations = True

    def batch_score(self, signals):
        return signals.activation_mean


@register
class ActivationStd(Criterion):
    """Standard deviation of `relu(a)` over the minibatch and positions (ICLR'17 baseline)."""

    name = "activation_std"
    uses_activations = True

    def batch_score(self, signals):
        return signals.activation_std


@register
class APoZ(Criterion):
    """Average Percentage of Zeros (Hu et al. 2016; ICLR'17 baseline).

    The score is `1 − APoZ`, the fraction of positions where `relu(a) > 0`,
    so that channels that are mostly zero rank lowest.
    """

    name = "apoz"
    uses_activations = True

    def batch_score(self, signals):
        return 1.0 - signals.zero_fraction


@register
class Random(Criterion):
    """Uniform random scores in [0, 1), drawn in the train step (baseline).

    Args:
        seed: seed of the criterion's `keras.random.SeedGenerator`.
    """

    name = "random"

    def __init__(self, seed: int | None = None):
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"Expected seed to be an int or None. Received: seed={seed!r}")
        self.seed = seed
        self._generator = None

    def build(self, num_groups):
        if self._generator is None:
            self._generator = keras.random.SeedGenerator(self.seed)

    def batch_score(self, signals):
        return keras.random.uniform((signals.num_groups,), seed=self._generator)

    def get_config(self):
        return {"seed": self.seed}


def names() -> list:
    """The registered criterion ids."""
    return sorted(_CRITERIA)


def get(identifier) -> Criterion:
    """Returns a criterion from its string id (`"taylor_fo_bn"`) or instance.

    Raises:
        ValueError: for an unknown id.
    """
    if isinstance(identifier, Criterion):
        return identifier
    if isinstance(identifier, str) and identifier in _CRITERIA:
        return _CRITERIA[identifier]()
    raise ValueError(
        f"Expected a criterion id in {names()} or a "
        f"keras_taylor.criteria.Criterion. Received: criterion={identifier!r}"
    )
