"""Scoring and pruning under `tf.distribute`.

Both checks run `tests/distribute_worker.py` in fresh interpreters: logical
CPU devices and the multi-worker collective runtime must be configured before
TensorFlow initialises its devices, which the pytest process has already done.

MirroredStrategy (2 logical CPU devices, 2 replicas, global batch 8 = 2 x 4):
Keras divides each replica's loss by the number of replicas
(`scale_loss_for_distribution`), and `TaylorScorer.accumulate` all-reduces
(SUM) each replica's per-group gate gradients *before* squaring them, so the
summed gradient is that of the mean loss over the global batch and the score
is the one-device score of the same global batch.

BatchNormalization: Keras BN is not synchronised across replicas by default.
Each replica then normalises with the statistics of its own 4 examples, not of
the global 8, so the model computes a different function and its gate
gradients differ (the worker measures about 5% relative difference in the
scores of this tiny model, far above 1e-5). The exact comparison therefore uses
`BatchNormalization(synchronized=True)`, whose statistics are all-reduced over
the global batch (in the one-device run the same layer uses the one-replica
default context, so both runs compute the same function). The unsynchronised
case is measured too and must differ, which shows the comparison is not
vacuous and documents why SyncBN is needed for exact agreement; pruning itself
works with either (the scores are then those of the per-replica-BN model).

The 2-replica run is also checked while training (lr > 0: same loss, same
scores) and with a LossScaleOptimizer (the scale is undone, the all-reduced
overflow check skips nothing). Not covered: `steps_per_execution > 1` and
`jit_compile=True` under MirroredStrategy, which fail in this Keras 3.15 /
TF 2.21 stack on 2 logical CPUs for a plain, ungated model too.

MultiWorkerMirroredStrategy: 2 worker processes on localhost with TF_CONFIG,
each a short pruning run (3 pruning events, then fine-tuning) on the same
data; the scores are all-reduced in the train step and every worker ranks and
sets its gates on the host from its own copy of the accumulators, so both
workers must reach the same plan and gates. Keras 3 `fit` itself needs two
workarounds under this strategy (keras-team/keras#20585), applied in the
worker script only.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("distribute_worker.py")
ROOT = WORKER.parent.parent
TIMEOUT = 240  # s: a hung collective fails the test instead of hanging CI


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env["KERAS_BACKEND"] = "tensorflow"
    env["CUDA_VISIBLE_DEVICES"] = "-1"  # CPU devices only, wherever CI runs
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def _free_ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("localhost", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _spawn(args, env, log):
    """Starts the worker script; its output goes to `log` (a pipe could fill and block it)."""
    with open(log, "w") as f:
        return subprocess.Popen(
            [sys.executable, str(WORKER), *args], env=env, cwd=str(ROOT), stdout=f, stderr=subprocess.STDOUT
        )


def _wait_all(procs, logs, timeout=TIMEOUT):
    """Waits for every process; kills them all if one fails or time runs out."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            codes = [p.poll() for p in procs]
            for code, log in zip(codes, logs):
                if code not in (None, 0):
                    raise AssertionError(f"{log.name} exited with {code}:\n{log.read_text()[-4000:]}")
            if all(c == 0 for c in codes):
                return
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {l.name}\n{l.read_text()[-2000:]}" for l in logs)
                raise AssertionError(f"timed out after {timeout} s (a hung collective?)\n{tails}")
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


@pytest.mark.slow
def test_mirrored_two_replicas_score_like_one_device(tmp_path):
    out, log = tmp_path / "mirrored.json", tmp_path / "mirrored.log"
    _wait_all([_spawn(["mirrored", str(out)], _env(), log)], [log])
    r = json.loads(out.read_text())
    assert r["replicas"] == 2
    sync = r["sync_bn"]
    assert sync["steps_one"] == sync["steps_two"] == 6
    assert sync["max_score"] > 0
    # The accumulator is float32; errors are relative to the largest score.
    assert sync["rel_one_vs_ref"] <= 1e-5
    assert sync["rel_two_vs_ref"] <= 1e-5
    assert sync["rel_two_vs_one"] <= 1e-5
    assert sync["rel_two_vs_one_per_group"] <= 1e-4
    # With per-replica (unsynchronised) BN the function, hence the scores,
    # differ: why the exact check needs SyncBN.
    local = r["local_bn"]
    assert local["rel_one_vs_ref"] <= 1e-5
    assert local["rel_two_vs_one"] > 1e-3
    # Training (lr > 0): both runs take the same steps and keep scoring alike.
    train = r["training"]
    assert train["rel_two_vs_one"] <= 1e-5
    assert abs(train["loss_two"][0] - train["loss_one"][0]) <= 1e-5 * abs(train["loss_one"][0])
    # With a LossScaleOptimizer (scale 1024) the 2-replica scores are unchanged.
    assert r["loss_scale"]["steps_two"] == 6
    assert r["loss_scale"]["rel_two_vs_one"] <= 1e-5
    # Every kind of criterion scores the global batch across replicas.
    for name, c in r["criteria"].items():
        assert c["steps_two"] == 6 and c["max"] > 0, name
        assert c["rel_two_vs_one"] <= (1e-3 if name == "taylor_fo_weight" else 1e-5), (name, c)


@pytest.mark.slow
def test_multi_worker_mirrored_workers_agree_on_the_plan(tmp_path):
    ports = _free_ports(2)
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    procs, logs = [], [tmp_path / f"worker{i}.log" for i in range(2)]
    for i in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
        procs.append(_spawn(["worker", str(tmp_path / f"worker{i}.json")], _env(TF_CONFIG=tf_config), logs[i]))
    _wait_all(procs, logs)
    r0, r1 = (json.loads((tmp_path / f"worker{i}.json").read_text()) for i in range(2))
    assert (r0["task"], r1["task"]) == (0, 1)
    assert r0["replicas"] == r1["replicas"] == 2
    # A real pruning run: several events, channels removed.
    assert r0["done"] and r1["done"]
    assert len(r0["history"]) >= 2 and r0["removed"]
    assert any(r0["plan"]["removed"].values())
    assert r0["plan"] == r0["plan_from_gates"] and r1["plan"] == r1["plan_from_gates"]
    # Both workers made the same decisions.
    assert r0["plan"] == r1["plan"]
    assert r0["removed"] == r1["removed"]
    assert r0["history"] == r1["history"]
    assert r0["gates"] == r1["gates"]
    assert r0["ema"] == pytest.approx(r1["ema"], rel=1e-6)
