"""keras_taylor: Taylor-expansion channel pruning for Keras 3 CNNs.

Typical use::

    gated = keras_taylor.add_gates(model)
    gated.compile(...)
    gated.fit(data, epochs=..., callbacks=[keras_taylor.TaylorPruning(target=0.5)])
    small = keras_taylor.prune(gated)      # stock Keras layers, filters removed

References:
    Molchanov et al., "Pruning Convolutional Neural Networks for Resource
    Efficient Inference", ICLR 2017.
    Molchanov et al., "Importance Estimation for Neural Network Pruning",
    CVPR 2019.
"""

from keras_taylor.callbacks import TaylorPruning
from keras_taylor import criteria, oracle
from keras_taylor.criteria import Criterion, TaylorFOBN
from keras_taylor.flops import Profile, profile
from keras_taylor.gates import ChannelGate, add_gates, gate_values, is_gated, strip_gates
from keras_taylor.graph import ChannelGraph, analyze
from keras_taylor.handlers import Cost, LayerHandler, register_handler
from keras_taylor.plan import PruningPlan
from keras_taylor.scoring import TaylorScorer
from keras_taylor.surgery import apply_plan, prune
from keras_taylor.nesting import inline_nested_models
from keras_taylor.monitor import PruningTensorBoard, plot_channels, plot_history
from keras_taylor.oracle import oracle_deltas, plot_correlations, rank_correlations
from keras_taylor.finetune import fit_prune

__version__ = "0.1.0"

__all__ = [
    "ChannelGate",
    "ChannelGraph",
    "Cost",
    "Criterion",
    "LayerHandler",
    "Profile",
    "PruningPlan",
    "PruningTensorBoard",
    "TaylorFOBN",
    "TaylorPruning",
    "TaylorScorer",
    "add_gates",
    "analyze",
    "apply_plan",
    "criteria",
    "fit_prune",
    "gate_values",
    "inline_nested_models",
    "is_gated",
    "plot_channels",
    "oracle",
    "oracle_deltas",
    "plot_correlations",
    "plot_history",
    "profile",
    "prune",
    "rank_correlations",
    "register_handler",
    "strip_gates",
]
