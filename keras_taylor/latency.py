"""CPU/GPU inference latency, measured the way noisy shared machines need.

Models are timed in interleaved rounds (A, B, A, B, ... in a shuffled order
per round) so that drifts in machine load hit every model alike; the result
holds each model's median and the median, min and max of per-round ratios.
"""

from __future__ import annotations

import time
from typing import Mapping

import keras
import numpy as np

from keras_taylor import _compat


def _compiled_forward(model: keras.Model):
    tf = _compat.import_tensorflow("keras_taylor.latency.measure_latency")
    return tf.function(lambda x: model(x, training=False), reduce_retracing=True)


def measure_latency(
    models: Mapping[str, keras.Model],
    batch_size: int = 1,
    rounds: int = 15,
    calls_per_round: int = 20,
    warmup: int = 5,
    reference: str | None = None,
    seed: int = 0,
) -> dict:
    """Measures inference latency of several models, interleaved.

    Each model runs as a `tf.function` (graph mode) on the same random batch.
    In every round the models run in a fresh random order, `calls_per_round`
    calls each; a round's time per call is the mean over its calls.

    Args:
        models: `{name: model}`; all take the same input shape.
        batch_size: batch size. Defaults to `1`.
        rounds: number of interleaved rounds. Defaults to `15`.
        calls_per_round: calls per model per round. Defaults to `20`.
        warmup: untimed calls per model before timing. Defaults to `5`.
        reference: the model that ratios are taken against. Defaults to the
            first model.
        seed: seed for the input batch and round orders. Defaults to `0`.

    Returns:
        `{name: {"median_ms", "min_ms", "max_ms", "ratio_median", "ratio_min",
        "ratio_max"}}`, ratios being this model's time ÷ the reference's in
        the same round.

    Raises:
        ValueError: if `models` is empty or `reference` is not one of them.
    """
    if not isinstance(models, dict):
        raise ValueError(
            "Expected models to be a {name: keras.Model} mapping. Received: "
            f"models={str(models)[:200]}"
        )
    if not models:
        raise ValueError("Expected at least one model. Received: models={}")
    for name, m in models.items():
        if not isinstance(m, keras.Model):
            raise ValueError(
                f"Expected every value of models to be a keras.Model. Received: "
                f"models[{name!r}]={str(m)[:100]!r} of class {type(m).__name__}."
            )
    names = list(models)
    reference = reference or names[0]
    if reference not in models:
        raise ValueError(f"Expected reference in {names}. Received: reference={reference!r}")
    rng = np.random.default_rng(seed)
    shape = tuple(models[names[0]].inputs[0].shape[1:])
    x = keras.ops.convert_to_tensor(rng.uniform(0, 1, (batch_size, *shape)).astype("float32"))
    fns = {n: _compiled_forward(m) for n, m in models.items()}
    for n in names:
        for _ in range(warmup):
            fns[n](x).numpy()
    times = {n: [] for n in names}
    for _ in range(rounds):
        for n in rng.permutation(names).tolist():
            fn = fns[n]
            start = time.perf_counter()
            for _ in range(calls_per_round):
                out = fn(x)
            out.numpy()
            times[n].append((time.perf_counter() - start) / calls_per_round * 1e3)
    result = {}
    ref = np.array(times[reference])
    for n in names:
        t = np.array(times[n])
        ratios = t / ref
        result[n] = {
            "median_ms": float(np.median(t)),
            "min_ms": float(t.min()),
            "max_ms": float(t.max()),
            "ratio_median": float(np.median(ratios)),
            "ratio_min": float(ratios.min()),
            "ratio_max": float(ratios.max()),
        }
    return result


def time_callables(
    fns: Mapping,
    rounds: int = 7,
    warmup: int = 3,
    target_ms: float = 5.0,
    max_calls: int = 50,
    seed: int = 0,
) -> dict:
    """Times no-argument callables in interleaved rounds (any runtime).

    Like `measure_latency`: every round runs every callable in a fresh
    random order, a block of calls each, and records the mean time per call
    of the block. The block size is set per callable after the warm-up so a
    block lasts about `target_ms` (1 to `max_calls` calls), which keeps timer
    resolution out of microsecond-scale callables without spending seconds on
    slow ones.

    Returns:
        `{name: {"median_ms", "min_ms", "q25_ms", "calls"}}`; `q25_ms` (the
        25th percentile over rounds) is the statistic latency tables use:
        robust to load spikes, less optimistic than the minimum.
    """
    if not fns:
        raise ValueError("Expected at least one callable. Received: fns={}")
    rng = np.random.default_rng(seed)
    names = list(fns)
    calls = {}
    for n in names:
        for _ in range(warmup):
            fns[n]()
        start = time.perf_counter()
        fns[n]()
        once = (time.perf_counter() - start) * 1e3
        calls[n] = int(min(max_calls, max(1, round(target_ms / max(once, 1e-3)))))
    times = {n: [] for n in names}
    for _ in range(rounds):
        for i in rng.permutation(len(names)).tolist():
            n = names[i]
            fn = fns[n]
            start = time.perf_counter()
            for _ in range(calls[n]):
                fn()
            times[n].append((time.perf_counter() - start) / calls[n] * 1e3)
    return {
        n: {
            "median_ms": float(np.median(t)),
            "min_ms": float(np.min(t)),
            "q25_ms": float(np.quantile(t, 0.25)),
            "calls": calls[n],
        }
        for n, t in times.items()
    }
