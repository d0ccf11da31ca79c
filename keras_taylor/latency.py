"""CPU/GPU inference latency, measured the way noisy shared machines need.

Models are timed in interleaved rounds (A, B, A, B, ... in a shuffled order
per round) so that drifts in machine load hit every model alike; the result
holds each model's median and the median, min and max of per-round ratios.

`interleaved`, `summarize` and `calls_for` are the one timing loop of the
repository: `measure_latency` runs Keras models through them, and the
scripts of benchmarks/ use them through `benchmarks/_harness.py`, which loads
this file by path so that the side environments (tfmot, PyTorch) can use it
without Keras. This module therefore imports only numpy and the standard
library at import time; Keras and TensorFlow are imported by
`measure_latency`.
"""

from __future__ import annotations

import time
from typing import Callable, Mapping

import numpy as np


def interleaved(
    runs: Mapping[str, Callable],
    rounds: int,
    calls: int | Mapping[str, int],
    rng: np.random.Generator | int = 0,
    finish: Callable | None = None,
) -> dict:
    """Times zero-argument callables in interleaved rounds.

    In every round each of `runs` is called `calls` times (an int, or one
    count per name), the runs in a fresh random order; a round's time is the mean over its calls. When `finish` is
    given, it is called on the last call's return value before the clock
    stops (e.g. `lambda y: y.numpy()` to wait for an asynchronous device).

    Returns:
        `{name: [milliseconds per call, one per round]}`.
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    names = list(runs)
    times = {n: [] for n in names}
    for _ in range(rounds):
        for i in rng.permutation(len(names)).tolist():
            n = names[i]
            run = runs[n]
            k = calls[n] if isinstance(calls, Mapping) else calls
            start = time.perf_counter()
            for _ in range(k):
                out = run()
            if finish is not None:
                finish(out)
            times[n].append((time.perf_counter() - start) / k * 1e3)
    return times


def summarize(times: Mapping[str, list], reference: str, per_round: bool = False) -> dict:
    """Per name: median/min/max ms and the median/min/max of the per-round
    ratios against `reference` (the same round's time); with `per_round`,
    also the per-round times (`"per_round_ms"`, rounded to 3 decimals)."""
    ref = np.asarray(times[reference], dtype=np.float64)
    out = {}
    for n, t in times.items():
        t = np.asarray(t, dtype=np.float64)
        r = t / ref
        out[n] = {
            "median_ms": float(np.median(t)), "min_ms": float(t.min()), "max_ms": float(t.max()),
            "ratio_median": float(np.median(r)), "ratio_min": float(r.min()), "ratio_max": float(r.max()),
        }
        if per_round:
            out[n]["per_round_ms"] = [round(float(v), 3) for v in t]
    return out


def calls_for(run: Callable, round_s: float, most: int = 50) -> int:
    """Calls of `run` (already warm) that take about `round_s` seconds, 1 to `most`."""
    n, start = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - start < min(round_s, 0.5):
        run()
        n += 1
        if time.perf_counter() - start > 3 * round_s:
            break
    per_call = (time.perf_counter() - start) / n
    return int(np.clip(round(round_s / per_call), 1, most))


def _compiled_forward(model):
    from keras_taylor import _compat

    tf = _compat.import_tensorflow("keras_taylor.latency.measure_latency")
    return tf.function(lambda x: model(x, training=False), reduce_retracing=True)


def measure_latency(
    models: Mapping[str, "keras.Model"],
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
    import keras

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
    runs = {n: (lambda fn=fn: fn(x)) for n, fn in fns.items()}
    times = interleaved(runs, rounds, calls_per_round, rng, finish=lambda y: y.numpy())
    return summarize(times, reference)


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
    random order (`interleaved`), a block of calls each, and records the mean
    time per call of the block. The block size is set per callable after the
    warm-up (`calls_for`) so a block lasts about `target_ms` (1 to
    `max_calls` calls), which keeps timer resolution out of
    microsecond-scale callables without spending seconds on slow ones.

    Returns:
        `{name: {"median_ms", "min_ms", "q25_ms", "calls", "per_round_ms"}}`;
        `q25_ms` is the 25th percentile over rounds; `per_round_ms` the
        per-round means in round order (rounds are paired across names:
        round `r` of every callable ran in the same interleaved round).
    """
    if not fns:
        raise ValueError("Expected at least one callable. Received: fns={}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    calls = {n: calls_for(fn, target_ms / 1e3, max_calls) for n, fn in fns.items()}
    times = interleaved(fns, rounds, calls, seed)
    return {
        n: {
            "median_ms": float(np.median(t)),
            "min_ms": float(np.min(t)),
            "q25_ms": float(np.quantile(t, 0.25)),
            "calls": calls[n],
            "per_round_ms": [float(v) for v in t],
        }
        for n, t in times.items()
    }


def paired_ms(per_round: Mapping[str, list], reference: str) -> dict:
    """Paired (anchored) per-call times: the reference's minimum over rounds
    times each callable's *median per-round ratio* to the reference (same
    round). The ratio of two results is then a median of paired ratios,
    which a drift of the machine during the rounds moves far less than a
    ratio of two minima taken in different rounds.

    Args:
        per_round: `{name: [ms per round]}`, rounds paired across names (as
            `interleaved` returns them).
        reference: the name the ratios are taken against.

    Raises:
        ValueError: if `reference` is missing, the round counts differ, or a
            reference round is not positive.
    """
    if reference not in per_round:
        raise ValueError(f"Expected reference in {sorted(per_round)}. Received: reference={reference!r}")
    ref = np.asarray(per_round[reference], dtype=np.float64)
    if ref.size == 0 or (ref <= 0).any():
        raise ValueError(f"Expected positive reference times. Received: {ref.tolist()[:10]}")
    out = {}
    for n, t in per_round.items():
        t = np.asarray(t, dtype=np.float64)
        if t.shape != ref.shape:
            raise ValueError(f"Expected {ref.size} rounds for every name. Received: {t.size} for {n!r}")
        out[n] = float(ref.min() * np.median(t / ref))
    return out
