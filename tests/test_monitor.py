"""PruningTensorBoard summaries (read back with TensorBoard's loader) and the PNG charts."""

import glob
import os
import sys

import keras
import numpy as np
import pytest

import keras_taylor as kt
from conftest import images, make
from keras_taylor.monitor import PruningTensorBoard, plot_channels, plot_history

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_events(run_dir):
    """`{tag: [(step, value array)]}` of every tensor summary under `run_dir`.

    Uses TensorBoard's own `EventAccumulator` (scalars and histograms written
    with `tf.summary` land in its tensors); without the tensorboard package,
    reads the event files with TensorFlow's `summary_iterator`.
    """
    import tensorflow as tf

    try:
        from tensorboard.backend.event_processing import event_accumulator as ea
    except ImportError:
        ea = None
    out = {}
    if ea is not None:
        acc = ea.EventAccumulator(run_dir, size_guidance={ea.TENSORS: 0, ea.SCALARS: 0, ea.HISTOGRAMS: 0})
        acc.Reload()
        for tag in acc.Tags()["tensors"]:
            out[tag] = [(e.step, tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]
        for tag in acc.Tags()["scalars"]:  # TF1-style simple values, should there be any
            out.setdefault(tag, []).extend((e.step, np.asarray(e.value)) for e in acc.Scalars(tag))
        return out
    for path in sorted(glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                value = tf.make_ndarray(v.tensor) if v.HasField("tensor") else np.asarray(v.simple_value)
                out.setdefault(v.tag, []).append((event.step, value))
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("monitor")
    model = make("plain")
    gated = kt.add_gates(model)
    gated.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    x = images(48, seed=0)
    y = np.random.default_rng(0).integers(0, 5, 48)
    pruner = kt.TaylorPruning(target=0.5, prune_every=2, channels_per_step=2)
    board = PruningTensorBoard(pruner, log_dir=tmp)
    calls = []
    original = board._write_pending
    board._write_pending = lambda: (calls.append(len(pruner.history)), original())[1]
    hist = gated.fit(
        x, y, batch_size=8, epochs=3, validation_data=(x[:16], y[:16]), callbacks=[pruner, board], verbose=0
    )
    return {
        "tmp": tmp, "model": model, "gated": gated, "pruner": pruner, "board": board,
        "hist": hist, "events": read_events(board.run_dir), "calls": calls,
    }


def test_run_dir_is_beside_keras_tensorboard_runs(run):
    assert run["board"].run_dir == os.path.join(str(run["tmp"]), "keras_taylor")
    assert glob.glob(os.path.join(run["board"].run_dir, "events.out.tfevents.*"))


def test_fraction_series_match_history(run):
    history, events = run["pruner"].history, run["events"]
    assert len(history) >= 2 and run["pruner"].done
    for key in ("flops_fraction", "params_fraction", "channels_fraction", "removed_total"):
        series = events[f"keras_taylor/{key}"]
        assert [s for s, _ in series] == [r["step"] for r in history]
        np.testing.assert_allclose([float(v) for _, v in series], [r[key] for r in history], rtol=0, atol=1e-6)
    flops = [float(v) for _, v in events["keras_taylor/flops_fraction"]]
    assert all(b <= a + 1e-9 for a, b in zip(flops, flops[1:]))
    assert flops[-1] <= 0.5 + 1e-6


def test_written_once_per_pruning_step(run):
    # Only the minibatches that pruned trigger a write (a len() check otherwise).
    assert run["calls"] == list(range(1, len(run["pruner"].history) + 1))


def test_per_layer_channels_end_at_pruned_counts(run):
    pruner, events = run["pruner"], run["events"]
    expected = kt.analyze(run["gated"]).layer_channel_counts(pruner.removed)
    small = kt.prune(run["gated"])
    assert set(expected) == {"c1", "c2", "c3", "fc", "out"}
    for name, count in expected.items():
        series = events[f"keras_taylor/channels/{name}"]
        assert len(series) == len(pruner.history)
        assert int(series[-1][1]) == count
        config = small.get_layer(name).get_config()
        assert count == config.get("filters", config.get("units"))
    assert int(events["keras_taylor/channels/out"][-1][1]) == 5  # the logits are never pruned
    assert sum(int(v) for _, v in [events[f"keras_taylor/channels/{n}"][0] for n in expected]) < 35


def test_score_statistics(run):
    pruner, events = run["pruner"], run["events"]
    lo, med, hi = (float(events[f"keras_taylor/score/{k}"][-1][1]) for k in ("min", "median", "max"))
    assert lo <= med <= hi
    alive = np.setdiff1d(np.arange(kt.analyze(run["gated"]).num_groups), pruner.removed)
    np.testing.assert_allclose([lo, med, hi], [f(pruner.ema[alive]) for f in (np.min, np.median, np.max)], rtol=1e-6)
    step, table = events["keras_taylor/score/log10_ema"][-1]
    assert step == pruner.history[-1]["step"] and table.shape[1] == 3
    assert table[:, 2].sum() == np.count_nonzero(pruner.ema[alive] > 0)


def _assert_png(path):
    assert os.path.isfile(path)
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    assert os.path.getsize(path) > 5_000


def test_plots(run):
    pytest.importorskip("matplotlib")
    tmp = run["tmp"]
    small = kt.prune(run["gated"])
    p1 = plot_channels(run["model"], small, tmp / "channels.png")
    p2 = plot_channels(run["model"], run["gated"], tmp / "channels_gated.png")  # live gates counted
    p3 = plot_history(run["pruner"], run["hist"], tmp / "history.png")
    p4 = plot_history(run["pruner"], None, tmp / "history_only_pruning.png")
    for p in (p1, p2, p3, p4):
        _assert_png(p)


def test_plots_without_matplotlib_say_so(run, monkeypatch, tmp_path):
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_history(run["pruner"], run["hist"], tmp_path / "x.png")


def test_rejects_non_pruner(tmp_path):
    with pytest.raises(TypeError, match="TaylorPruning"):
        PruningTensorBoard(object(), log_dir=tmp_path)
