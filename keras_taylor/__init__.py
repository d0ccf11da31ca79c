"""keras_taylor: Taylor-expansion channel pruning for Keras 3 CNNs.

Typical use::

    gated = keras_taylor.add_gates(model)
    gated.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    gated.fit(data, epochs=4, callbacks=[keras_taylor.TaylorPruning(target=0.5)])
    small = keras_taylor.prune(gated)      # stock Keras layers, filters removed

References:
    Molchanov et al., "Pruning Convolutional Neural Networks for Resource
    Efficient Inference", ICLR 2017.
    Molchanov et al., "Importance Estimation for Neural Network Pruning",
    CVPR 2019.
"""

from keras_taylor import attention, criteria, selection
from keras_taylor.criteria import Criterion, TaylorFOBN
from keras_taylor.flops import Profile, profile
from keras_taylor.gates import ChannelGate, add_gates, gate_values, is_gated, strip_gates
from keras_taylor.graph import ChannelGraph, analyze
from keras_taylor.handlers import Cost, LayerHandler, register_handler
from keras_taylor.plan import PruningPlan
from keras_taylor.latency_table import LatencyTable, plan_for_latency
from keras_taylor.surgery import apply_plan, prune
from keras_taylor.nesting import inline_nested_models
from keras_taylor.plotting import plot_channels, plot_history

__version__ = "0.1.0"

# Loaded on first use: these need TensorFlow (the scoring train step, the
# oracle, TensorBoard summaries, the exporters), which `import keras_taylor`
# does not, so that analysis, plans and surgery work with any Keras backend.
_LAZY = {
    "TaylorPruning": "keras_taylor.callbacks",
    "TaylorScorer": "keras_taylor.scoring",
    "fit_prune": "keras_taylor.finetune",
    "PruningTensorBoard": "keras_taylor.monitor",
    "oracle_deltas": "keras_taylor.oracle",
    "plot_correlations": "keras_taylor.oracle",
    "rank_correlations": "keras_taylor.oracle",
}
_LAZY_SUBMODULES = ("export", "oracle", "monitor", "scoring", "callbacks", "latency")


def __getattr__(name):
    import importlib

    if name in _LAZY_SUBMODULES:
        value = importlib.import_module(f"keras_taylor.{name}")
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:
        raise AttributeError(f"module 'keras_taylor' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_LAZY_SUBMODULES))


__all__ = [
    "ChannelGate",
    "ChannelGraph",
    "Cost",
    "Criterion",
    "LatencyTable",
    "LayerHandler",
    "Profile",
    "PruningPlan",
    "PruningTensorBoard",
    "TaylorFOBN",
    "TaylorPruning",
    "TaylorScorer",
    "add_gates",
    "attention",
    "analyze",
    "apply_plan",
    "criteria",
    "export",
    "fit_prune",
    "gate_values",
    "inline_nested_models",
    "is_gated",
    "plot_channels",
    "oracle",
    "oracle_deltas",
    "plan_for_latency",
    "plot_correlations",
    "plot_history",
    "profile",
    "prune",
    "rank_correlations",
    "selection",
    "register_handler",
    "strip_gates",
]
