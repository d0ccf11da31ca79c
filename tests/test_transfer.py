"""Transfer-learning notebook and examples/papers_datasets.py, offline at smoke size.

The notebook runs the way tests/test_notebooks.py runs the quickstart (code cells
concatenated, SMOKE = True). The example runs on tfds.testing.mock_data for two
datasets, concurrently with the offline-error run (each is mostly single-threaded
graph tracing, so the three overlap well on 2 cores).
"""

import json
import os
import re
import socket
import subprocess
import sys

import pytest

from conftest import run_notebook

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "papers_datasets.py")


def _env(**extra):
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **extra)


def _reachable(host):
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


def _flops(stdout):
    m = re.search(r"^FLOPs \(MACs\)\s+([\d,]+)\s+([\d,]+)", stdout, re.M)
    assert m, stdout[-3000:]
    return int(m.group(1).replace(",", "")), int(m.group(2).replace(",", ""))


@pytest.mark.slow
def test_transfer_notebook_runs_at_smoke_size(tmp_path, monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    monkeypatch.setenv("KERAS_TAYLOR_REPO", str(tmp_path / "absent"))
    text = run_notebook(os.path.join(ROOT, "colab", "transfer_learning.ipynb"), tmp_path)
    m = re.search(r"^FLOPs\s+([\d,]+) -> ([\d,]+)", text, re.M)
    assert m and int(m.group(2).replace(",", "")) < int(m.group(1).replace(",", "")), text[-3000:]
    assert (tmp_path / "channels.png").stat().st_size > 0


@pytest.mark.slow
def test_papers_datasets_mock_runs_and_offline_error(tmp_path):
    tiny = ["--mock", "--mock_examples", "16", "--image_size", "32", "--batch_size", "8", "--steps", "2",
            "--head_epochs", "1", "--epochs", "0", "--prune_epochs", "1", "--prune_every", "1",
            "--channels_per_step", "400", "--weights", "none"]
    procs = {}
    for name in ("cifar10", "oxford_flowers102"):
        cmd = [sys.executable, EXAMPLE, "--dataset", name, "--output_dir", str(tmp_path / name)] + tiny
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path)
    empty = tmp_path / "tfds_empty"
    empty.mkdir()
    # Offline (CI) this exercises the real path: tfds finds nothing and the host is unreachable.
    # Where the download host answers, --nodownload keeps the test from fetching 330 MB.
    online = _reachable("www.robots.ox.ac.uk")
    offline = subprocess.Popen(
        [sys.executable, EXAMPLE, "--dataset", "oxford_flowers102", "--output_dir", str(tmp_path / "offline")]
        + (["--nodownload"] if online else []),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(TFDS_DATA_DIR=str(empty)), cwd=tmp_path,
    )
    out, err = offline.communicate(timeout=300)
    results = {name: p.communicate(timeout=600) + (p.returncode,) for name, p in procs.items()}

    # Offline, nothing prepared: one clear line, non-zero exit, no training.
    assert offline.returncode != 0, out[-2000:] + err[-2000:]
    line = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(line) == 1, err[-2000:]
    assert "'oxford_flowers102'" in line[0] and str(empty) in line[0] and "tfds build oxford_flowers102" in line[0]
    assert "Before / after" not in out

    for name, (stdout, stderr, rc) in results.items():
        assert rc == 0, f"{name}: {stdout[-3000:]}\n{stderr[-3000:]}"
        assert f"{name} (mock)" in stdout
        flops_before, flops_after = _flops(stdout)
        assert flops_after < flops_before, stdout[-2000:]
        saved = json.load(open(tmp_path / name / "results.json"))
        assert saved["flops_after"] == flops_after and saved["mock"] is True
