"""The Colab notebooks run end to end at smoke size, in a real Jupyter kernel (nbclient)."""

import os

import pytest

from conftest import run_notebook

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["quickstart.ipynb"])
def test_notebook_runs_at_smoke_size(name, tmp_path, monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    monkeypatch.setenv("KERAS_TAYLOR_REPO", str(tmp_path / "absent"))
    text = run_notebook(os.path.join(ROOT, "colab", name), tmp_path)
    assert "FLOPs" in text and "max_abs_diff" in text
