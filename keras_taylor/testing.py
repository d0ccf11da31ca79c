"""Helpers for checking pruning on keras.applications-style models.

Used by the test suite and `benchmarks/applications_sweep.py`.
"""

from __future__ import annotations

import importlib

import keras
import numpy as np


def preprocessed(fn, x):
    """Applies the family's own `preprocess_input` (MobileNet expects [-1, 1])."""
    module = importlib.import_module(fn.__module__)
    pre = getattr(module, "preprocess_input", None)
    return np.asarray(pre(x.copy())) if pre is not None else x


def lively_statistics(model, seed=0):
    """Makes a freshly initialised model's channels carry signal, so that pruning
    them visibly changes the output and the equality check is not vacuous.

    ConvNeXt's LayerScale starts at 1e-6 (set to 1), and BN at init lets
    MobileNet's signal die out (give it trained-looking statistics).
    """
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if type(layer).__name__ == "LayerScale":
            layer.set_weights([np.ones_like(w) for w in layer.get_weights()])
        elif isinstance(layer, keras.layers.BatchNormalization):
            new = []
            for v in layer.weights:
                shape = tuple(v.shape)
                if "gamma" in v.name or "variance" in v.name:
                    new.append(rng.uniform(0.5, 1.5, shape))
                else:
                    new.append(rng.normal(0.0, 0.3, shape))
            layer.set_weights(new)
