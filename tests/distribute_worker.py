"""Subprocess half of tests/test_distribute.py (run with `python distribute_worker.py MODE OUT`).

`tf.distribute` needs its devices set up before TensorFlow initialises them
(2 logical CPUs for MirroredStrategy, TF_CONFIG and the collective runtime for
MultiWorkerMirroredStrategy), which the pytest process has long done. So each
check runs in a fresh interpreter and writes its results as JSON to OUT.

Modes:
    mirrored OUT   2 logical CPU devices; accumulated scores of a 2-replica
                   MirroredStrategy run vs a one-device run with the same
                   global batch vs an independent GradientTape reference.
    worker OUT     one worker of a MultiWorkerMirroredStrategy cluster
                   (TF_CONFIG set by the caller): a short pruning run; writes
                   its plan and gates.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

MODE, OUT = sys.argv[1], sys.argv[2]

if MODE == "mirrored":
    # Before anything initialises the devices.
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )
    STRATEGY = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
elif MODE == "worker":
    # Must be built before any other TF op runs in this process.
    STRATEGY = tf.distribute.MultiWorkerMirroredStrategy()
    # Keras 3 `fit` under MultiWorkerMirroredStrategy is broken upstream
    # (keras-team/keras#20585): `reduce_per_replica` reduces scalar metrics
    # with `strategy.reduce("MEAN", v, axis=0)` (invalid axis), and
    # `_maybe_symbolic_build` reduces the input batch through the collective
    # (PerReplica conversion error). Work around both here, in the test only:
    # reduce step outputs over this worker's replicas (they are only logged
    # metrics; the gradients and scores are all-reduced by the train step), and
    # build the model, loss and optimizer before `fit` (see `run_worker`).
    from keras.src.backend.tensorflow import trainer as _tf_trainer

    _tf_trainer._collective_all_reduce_multi_worker = lambda strategy: False
else:
    raise SystemExit(f"unknown mode {MODE!r}")

import keras  # noqa: E402
from keras import layers  # noqa: E402

import keras_taylor as kt  # noqa: E402

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
GLOBAL_BATCH = 8


def base_model(sync_bn=True, seed=0):
    """A tiny seeded residual CNN: conv-BN-ReLU stem, one residual block
    (two convs + BN, added to the stem), a strided conv, GAP, Dense.

    `sync_bn`: BatchNormalization(synchronized=True), whose batch statistics
    are those of the global batch under a strategy (see the test docstring).
    """
    keras.utils.set_random_seed(seed)

    def bn(name):
        return layers.BatchNormalization(synchronized=sync_bn, name=name)

    inputs = keras.Input((12, 12, 3))
    x = layers.Conv2D(6, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = layers.ReLU()(bn("stem_bn")(x))
    y = layers.Conv2D(5, 3, padding="same", name="c1")(x)
    y = layers.ReLU()(bn("c1_bn")(y))
    y = layers.Conv2D(6, 3, padding="same", use_bias=False, name="c2")(y)
    y = bn("c2_bn")(y)
    x = layers.ReLU()(layers.Add()([x, y]))
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="c3")(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(4, name="out")(x)
    model = keras.Model(inputs, outputs, name="tiny")
    # Non-trivial BN parameters, so gamma/beta gradients differ per channel.
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, layer.gamma.shape).astype("float32"),
                    rng.normal(0.0, 0.5, layer.beta.shape).astype("float32"),
                    layer.moving_mean.numpy(),
                    layer.moving_variance.numpy(),
                ]
            )
    return model


def data(n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, 12, 12, 3)).astype("float32")
    y = rng.integers(0, 4, n)
    return x, y


def reference_scores(gated, x, y, batch):
    """(sum over a group's members of dL/dm)^2, averaged over global batches,
    from a plain eager GradientTape outside any strategy."""
    from keras_taylor import testing

    return testing.reference_scores(gated, x, y, batch, LOSS)


def score_run(base, strategy, x, y, lr, loss_scale=None, criterion="taylor_fo_bn"):
    """Fits a gated copy of `base` for one epoch, scoring only; returns
    (gated model, mean scores per group, minibatches, loss history)."""
    scope = strategy.scope() if strategy is not None else tf.distribute.get_strategy().scope()
    with scope:
        gated = kt.add_gates(base)
        optimizer = keras.optimizers.SGD(lr)
        if loss_scale is not None:
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=loss_scale)
        gated.compile(optimizer=optimizer, loss=LOSS)
    pruner = kt.TaylorPruning(target=0.5, prune_every=10_000, criterion=criterion)
    hist = gated.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[pruner])
    scores, steps = pruner.scorer.read()
    return gated, scores, steps, hist.history["loss"]


def rel_err(a, b):
    a, b = np.asarray(a, "float64"), np.asarray(b, "float64")
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def run_mirrored():
    assert STRATEGY.num_replicas_in_sync == 2, STRATEGY.num_replicas_in_sync
    x, y = data(48)
    out = {"replicas": STRATEGY.num_replicas_in_sync}
    for sync_bn in (True, False):
        base = base_model(sync_bn=sync_bn)
        one, s1, n1, _ = score_run(base, None, x, y, lr=0.0)
        _, s2, n2, _ = score_run(base, STRATEGY, x, y, lr=0.0)
        ref = reference_scores(one, x, y, GLOBAL_BATCH)
        tag = "sync_bn" if sync_bn else "local_bn"
        big = s1 > 1e-3 * s1.max()
        out[tag] = {
            "rel_two_vs_one_per_group": float(np.max(np.abs(s2[big] - s1[big]) / s1[big])),
            "steps_one": n1,
            "steps_two": n2,
            "num_groups": len(s1),
            "rel_two_vs_one": rel_err(s2, s1),
            "rel_one_vs_ref": rel_err(s1, ref),
            "rel_two_vs_ref": rel_err(s2, ref),
            "min_score": float(np.min(s1)),
            "max_score": float(np.max(s1)),
        }
    # Training (lr > 0): the two runs stay in step, so do their scores.
    base = base_model(sync_bn=True)
    _, s1, _, l1 = score_run(base, None, x, y, lr=0.05)
    _, s2, _, l2 = score_run(base, STRATEGY, x, y, lr=0.05)
    out["training"] = {"rel_two_vs_one": rel_err(s2, s1), "loss_one": l1, "loss_two": l2}
    # A LossScaleOptimizer: the scale is undone and the all-reduced
    # "any replica overflowed" check keeps every step.
    _, s3, n3, _ = score_run(base, STRATEGY, x, y, lr=0.0, loss_scale=1024.0)
    _, s0, _, _ = score_run(base, None, x, y, lr=0.0)
    out["loss_scale"] = {"steps_two": n3, "rel_two_vs_one": rel_err(s3, s0)}
    # Criteria reading per-example gradients, activation statistics and
    # weight gradients: the global batch's score on 2 replicas as on one.
    out["criteria"] = {}
    for criterion in ("taylor_fo_fg", "taylor_so", "iclr17_taylor", "activation_std", "taylor_fo_weight"):
        _, c1, _, _ = score_run(base, None, x, y, lr=0.0, criterion=criterion)
        _, c2, m2, _ = score_run(base, STRATEGY, x, y, lr=0.0, criterion=criterion)
        out["criteria"][criterion] = {"steps_two": m2, "rel_two_vs_one": rel_err(c2, c1), "max": float(np.max(c1))}
    return out


def run_worker():
    resolver = STRATEGY.cluster_resolver
    task = resolver.task_id
    x, y = data(64)
    base = base_model(sync_bn=True)
    with STRATEGY.scope():
        gated = kt.add_gates(base)
        gated.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss=LOSS)
        gated._symbolic_build(data_batch=(x[:GLOBAL_BATCH], y[:GLOBAL_BATCH]))
    gated._maybe_symbolic_build = lambda *args, **kwargs: None  # keras-team/keras#20585
    pruner = kt.TaylorPruning(target=0.5, prune_every=2, channels_per_step=2, min_channels=1)
    gated.fit(x, y, batch_size=GLOBAL_BATCH, epochs=2, shuffle=False, verbose=0, callbacks=[pruner])
    return {
        "task": task,
        "replicas": STRATEGY.num_replicas_in_sync,
        "plan": json.loads(pruner.plan.to_json()),
        "plan_from_gates": kt.PruningPlan.from_gates(gated).to_dict(),
        "removed": [int(g) for g in pruner.removed],
        "history": pruner.history,
        "done": bool(pruner.done),
        "ema": [float(v) for v in pruner.ema],
        "gates": {k: v.tolist() for k, v in kt.gate_values(gated).items()},
    }


if __name__ == "__main__":
    result = run_mirrored() if MODE == "mirrored" else run_worker()
    with open(OUT, "w") as f:
        json.dump(result, f, indent=1)
