"""Scoring keeps O(channels) persistent state (benchmarks/memory.py measures the RSS).

A regression that kept per-example or per-activation buffers (activations
cached for the score, a variable per minibatch, a history of scores) grows
with the batch, the input size or the number of steps; these checks bound the
pruning state by the number of channel groups and gated channels instead,
wherever it lives: variables the scorer holds, or state variables the
`ChannelGate` layers carry besides the gate.
"""

import keras
import numpy as np
import tensorflow as tf

import keras_taylor as kt
from conftest import images, make

BATCH = 8
CONSTANT_BYTES = 256


def _bytes(variables) -> int:
    """Total size of Keras or raw tf Variables (dtype a string or a tf.DType)."""
    return int(sum(int(np.prod(v.shape)) * tf.as_dtype(v.dtype).size for v in variables))


def _unique(variables) -> list:
    return list({id(getattr(v, "value", v) if isinstance(v, keras.Variable) else v): v for v in variables}.values())


def _held_variables(obj) -> list:
    found = []
    for value in vars(obj).values():
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
        found += [v for v in items if isinstance(v, (keras.Variable, tf.Variable))]
    return found


def _host_bytes(obj) -> int:
    total = 0
    for value in vars(obj).values():
        items = value if isinstance(value, (list, tuple)) else [value]
        total += sum(a.nbytes for a in items if isinstance(a, np.ndarray))
    return total


def _gate_state(model) -> list:
    """Each ChannelGate's own variables other than the gate."""
    out = []
    for g in kt.gates.gate_layers(model):
        inner = {id(v) for v in g.layer.variables}
        out += [v for v in g.variables if id(v) not in inner and v is not g.gate]
    return out


class _Recorder:
    """Records every tf.Variable made inside `with recorder:` (eagerly or while tracing)."""

    def __init__(self):
        self.created = []

    def _create(self, next_creator, **kwargs):
        v = next_creator(**kwargs)
        self.created.append(v)
        return v

    def __enter__(self):
        self._scope = tf.variable_creator_scope(self._create)
        self._scope.__enter__()
        return self

    def __exit__(self, *exc):
        return self._scope.__exit__(*exc)


def test_pruning_state_is_o_channels():
    with _Recorder() as probe:  # the recorder sees Keras variables
        keras.Variable(np.zeros(3, "float32"))
    assert len(probe.created) == 1

    x = images(16)
    y = np.random.default_rng(0).integers(0, 5, len(x))
    gated = kt.add_gates(make("residual"))
    gated.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    gated.optimizer.build(gated.trainable_variables)  # momentum slots now, not inside the recorder
    model_vars = list(gated.variables) + list(gated.optimizer.variables)
    before = (len(model_vars), _bytes(model_vars))

    pruner = kt.TaylorPruning(target=0.5, prune_every=10**9)
    with _Recorder() as rec:  # callback setup, install, trace and 4 scored minibatches
        gated.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[pruner])

    scorer = pruner.scorer
    gates = kt.gates.gate_layers(gated)
    groups = scorer.num_groups
    channels = sum(int(g.gate.shape[0]) for g in gates)
    assert 0 < groups <= channels
    steps = scorer.steps
    steps = steps.value if isinstance(steps, keras.Variable) else steps
    assert float(keras.ops.convert_to_numpy(steps)) == 2 * len(x) / BATCH
    assert not pruner.removed

    # Made during fit: at most a few per-group accumulators and scalars.
    made = _bytes(rec.created)
    assert made <= 8 * groups + CONSTANT_BYTES, [(v.name, tuple(v.shape)) for v in rec.created]
    # The model and optimizer gained no variable.
    model_vars = list(gated.variables) + list(gated.optimizer.variables)
    assert (len(model_vars), _bytes(model_vars)) == before

    # All pruning state, counted once: a few floats per gated channel and per
    # gate layer (per-channel score sum and EMA, run counters), nothing that
    # scales with batch x height x width.
    state = _unique(_held_variables(scorer) + _gate_state(gated))
    assert _bytes(state) <= 16 * channels + 64 * len(gates) + CONSTANT_BYTES, (
        _bytes(state), channels, len(gates), sorted({v.name for v in state}))

    # Host-side numpy state of the scorer and the callback: O(channels) too.
    host = _host_bytes(scorer) + _host_bytes(pruner)
    assert host <= 32 * (channels + groups) + CONSTANT_BYTES, (host, channels, groups)
