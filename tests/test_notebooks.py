"""The Colab notebooks' code runs end to end at smoke size."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["quickstart.ipynb"])
def test_notebook_runs_at_smoke_size(name, tmp_path):
    nb = json.load(open(os.path.join(ROOT, "colab", name)))
    code = "\n\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert "SMOKE = False" in code
    script = tmp_path / "nb.py"
    script.write_text(code.replace("SMOKE = False", "SMOKE = True"))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_TAYLOR_REPO=str(tmp_path / "absent"))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FLOPs" in proc.stdout and "max_abs_diff" in proc.stdout
