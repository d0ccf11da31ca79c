"""benchmarks/_harness.py: the step-time log shared by transfer_study.py and
torch_pruning_compare.py, and the JSON helpers every benchmark writes with."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import images, make

import keras_taylor as kt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import _harness  # noqa: E402


def test_step_timer_logs_both_models_of_fit_prune():
    gated = kt.add_gates(make("residual", 0))
    gated.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    x, y = images(48, 0), np.random.default_rng(1).integers(0, 5, 48)
    pruning = kt.TaylorPruning(target=0.7, prune_every=2, channels_per_step=50)
    timer = _harness.StepTimer(pruning)
    t0 = _harness.time.perf_counter()
    small, history = kt.fit_prune(gated, x, y, batch_size=8, epochs=2, pruning=pruning, callbacks=[timer], verbose=0)
    t1 = _harness.time.perf_counter()
    epoch, batches = history.switched_at
    switched = epoch * 6 + batches  # minibatches trained by the gated model
    assert 0 < switched < 12
    assert [s[2] for s in timer.steps] == [0] * switched + [1] * (12 - switched)
    assert timer.models[0] is gated and timer.models[1] is small
    assert len(timer.scoring) == switched and len(timer.after) == 12 - switched  # `done` flips at the switch
    ph = timer.phases(t0, t1)
    assert (ph["gated_steps"], ph["pruned_steps"]) == (switched, 12 - switched)
    assert ph["switch"] > 0 and ph["other"] > 0
    total = ph["gated_first_step"] + ph["gated_other_steps"] + ph["pruned_first_step"] + ph["pruned_other_steps"]
    assert total + ph["switch"] + ph["other"] == pytest.approx(t1 - t0)
    parts = ph["before_train_begin"], ph["last_epoch_end_to_train_end"], ph["after_train_end"]
    assert all(p >= 0 for p in parts) and sum(parts) < ph["other"]
    log = timer.log()
    assert len(log["step_ms"]) == 12 and log["model"] == [s[2] for s in timer.steps]
    assert [r["epoch"] for r in timer.rows] == [0, 1]
    assert timer.rows[-1]["params"] == small.count_params() < timer.rows[0]["params_begin"]


def test_step_timer_pause_trace_logs_stack_of_a_pause_after_train_end(tmp_path):
    """--trace_pauses: a pause between on_train_end and `fit` returning leaves
    the main thread's Python stack (file:line) in the log; none once cancelled."""
    model = make("residual", 0)
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    log = str(tmp_path / "pauses.log")
    timer = _harness.StepTimer(pause_log=log)

    class SlowEnd(keras.callbacks.Callback):  # after the timer's on_train_end: a 1.6 s pause inside `fit`
        def on_train_end(self, logs=None):
            _harness.time.sleep(1.6)

    x, y = images(8, 0), np.zeros(8, "int32")
    try:
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[timer, SlowEnd()])
    finally:
        timer.stop_pause_trace()
    timer.stop_pause_trace()  # a second call is a no-op
    text = open(log).read()
    assert text.startswith("== on_train_end") and text.rstrip().splitlines()[-1].startswith("== fit returned")
    assert "Timeout (0:00:01)!" in text and "in on_train_end" in text and "test_benchmark_harness.py" in text
    _harness.time.sleep(1.2)  # cancelled: nothing more is written
    assert open(log).read() == text


def test_json_helpers(tmp_path):
    path = str(tmp_path / "sub" / "r.json")
    a = _harness.read_json(path, lambda: {"cells": {}})
    b = _harness.read_json(path, lambda: {"cells": {}})
    assert a == {"cells": {}} and a is not b  # a fresh default per call
    assert _harness.read_json(path) is None
    _harness.write_json({"x": [1, 2]}, path)
    assert _harness.read_json(path, {}) == {"x": [1, 2]}
    assert os.listdir(tmp_path / "sub") == ["r.json"]  # the temporary file was renamed
    with open(path) as f:
        assert json.load(f) == {"x": [1, 2]}


def test_keras_phase_ds_without_autotune_yields_the_same_minibatches():
    """torch_pruning_compare's Keras pipeline: tf.data autotuning off by
    default (its end-of-`fit` pauses), the same minibatches in the same order."""
    import torch_pruning_compare as tpc

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (50, 4, 4)).astype("uint8"), rng.integers(0, 10, 50).astype("uint8")
    orders = np.stack([rng.permutation(50) for _ in range(2)]).astype("int32")
    plain, tuned = tpc.keras_phase_ds(x, y, orders, 16, autotune=False), tpc.keras_phase_ds(x, y, orders, 16, autotune=True)
    assert plain.options().autotune.enabled is False and tuned.options().autotune.enabled is not False
    got, ref = list(plain.as_numpy_iterator()), list(tuned.as_numpy_iterator())
    assert len(got) == len(ref) == 8  # 4 minibatches per epoch (16, 16, 16, 2)
    for (a, b), (c, d) in zip(got, ref):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
    np.testing.assert_allclose(got[0][0][..., 0], x[orders[0][:16]] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(got[4][1], y[orders[1][:16]])


def test_plot_step_logs_draws_one_panel_per_seed(tmp_path):
    """torch_pruning_compare --plot: a PNG from both sides' step logs (the
    switch / target marked by the model index and the `pruned` flags)."""
    pytest.importorskip("matplotlib")
    import torch_pruning_compare as tpc

    def run(seed):
        return {"seed": seed,
                "keras": {"step_log": {"step_ms": [900.0] + [80.0] * 9 + [60.0] * 10, "model": [0] * 10 + [1] * 10},
                          "prune_and_finetune_seconds": 2.3},
                "torch": {"step_log": {"step_ms": [90.0] * 8 + [70.0] * 12, "pruned": [False] * 8 + [True] * 12},
                          "prune_and_finetune_seconds": 1.6}}

    path = tpc.plot_step_logs({"runs": [run(0), run(1), {"seed": 2, "keras": {}}]}, str(tmp_path / "p" / "s.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    width, height = Image.open(path).size
    assert height > width * 0.6  # two panels stacked (the run without both sides is left out)


TORCH_PY = os.path.join(ROOT, ".venv-torch", "bin", "python")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(TORCH_PY), reason="needs .venv-torch (benchmarks/torch_pruning_compare.py creates it)")
def test_torch_pruning_compare_quick_fit_prune(tmp_path):
    """--quick --shared_dense with kt.fit_prune: both sides' step-time logs and
    the phase times that make the prune-and-fine-tune seconds comparable."""
    out = tmp_path / "r.json"
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "torch_pruning_compare.py"), "--quick", "--shared_dense",
           f"--output={out}", f"--work_dir={tmp_path / 'w'}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())["shared_dense_start_fit_prune"]
    (run,) = result["runs"]
    k, t = run["keras"], run["torch"]
    assert k["path"] == "fit_prune" and k["pruning_done"] and k["surgery_seconds"] is None
    steps = 2 * run["steps_per_epoch"]
    assert len(k["step_log"]["step_ms"]) == steps == len(t["step_log"]["step_ms"])
    ph = k["phases"]
    assert ph["gated_steps"] + ph["pruned_steps"] == steps and ph["pruned_steps"] > 0
    assert k["params_after"] < k["params_before"] and k["epochs"][-1]["params"] == k["params_after"]
    assert 0 < k["prune_and_finetune_seconds"] and 0 < t["prune_and_finetune_seconds"]
    ratio = result["summary"]["prune_and_finetune_seconds_keras_over_torch"]["per_seed"]
    assert ratio == [k["prune_and_finetune_seconds"] / t["prune_and_finetune_seconds"]]
