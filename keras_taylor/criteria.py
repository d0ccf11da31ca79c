"""Importance criteria: how a minibatch's gate gradients become channel scores.

A criterion turns the gradient of the loss w.r.t. each channel group's shared
gate, `dL/dm` summed over the group's members, into that minibatch's score.
Scores are averaged over the minibatches between pruning steps by the scorer
(`scoring.py`), and smoothed across steps by the callback.
"""

from __future__ import annotations

import keras
from keras import ops


class Criterion:
    """Base class: `batch_score(group_grad) -> score per group` (backend ops only)."""

    name = "criterion"

    def batch_score(self, group_grad):  # pragma: no cover - interface
        raise NotImplementedError

    def get_config(self) -> dict:
        return {}


@keras.saving.register_keras_serializable(package="keras_taylor")
class TaylorFOBN(Criterion):
    """Taylor-FO on a gate after BN (Molchanov et al., CVPR 2019, Eq. 8 with gates).

    Per minibatch, `s = (dL/dm)^2 = (sum_{b,h,w} a * dL/da)^2`, where `m` is the
    gate on a channel's output after its BatchNormalization. For a channel
    group (residual add, shared gate) `dL/dm` is the sum of the members' gate
    gradients, so the score is the exact shared-gate score
    `(sum_members dL/dm_member)^2`.

    References:
        Molchanov, Mallya, Tyree, Frosio, Kautz. "Importance Estimation for
        Neural Network Pruning". CVPR 2019.
    """

    name = "taylor_fo_bn"

    def batch_score(self, group_grad):
        return ops.square(group_grad)


_CRITERIA = {TaylorFOBN.name: TaylorFOBN}


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
        f"Expected a criterion id in {sorted(_CRITERIA)} or a "
        f"keras_taylor.criteria.Criterion. Received: criterion={identifier!r}"
    )
