"""benchmarks/transfer_study.py --smoke: the whole pipeline at tiny sizes, and resuming."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(tmp_path, *extra):
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "transfer_study.py"), "--smoke",
           f"--output_dir={tmp_path / 'runs'}", f"--results={tmp_path / 'r.json'}", f"--plot={tmp_path / 'p.png'}", *extra]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "r.json") as f:
        return json.load(f), out.stdout


@pytest.mark.slow
def test_transfer_study_smoke_and_resume(tmp_path):
    results, _ = run(tmp_path, "--seeds=0,1", "--targets=0.5", "--criteria=taylor_fo_bn,random")
    cells = results["cells"]
    assert len(cells) == 4  # 2 criteria x 1 target x 2 seeds
    for cell in cells.values():
        assert cell["reached"] and cell["flops_fraction"] <= 0.5 + 1e-9
        assert 0.0 <= cell["top1"] <= 1.0
        assert len(cell["epochs"]) == 2  # prune_epochs + finetune_epochs in --smoke
        assert cell["epochs"][-1]["params"] < cell["epochs"][0]["params_begin"]  # fine-tuned the pruned model
        ph = cell["phases"]  # the step-time log: every minibatch of both models, the switch between them
        assert cell["switch"] == "step" and ph["gated_steps"] + ph["pruned_steps"] == 2 * 4  # 2 epochs x ceil(60 / 16) minibatches
        assert ph["pruned_steps"] > 0 and ph["switch"] > 0 and ph["other"] > 0
    summary = results["summary"]
    margin = summary["random|0.5"]["margin_vs_taylor_fo_bn"]
    assert margin["seeds"] == [0, 1] and margin["ci95"][0] <= margin["mean"] <= margin["ci95"][1]
    assert summary["taylor_fo_bn|0.5"]["n"] == 2
    assert os.path.getsize(tmp_path / "p.png") > 1000
    before = {k: v["wall_seconds"] for k, v in cells.items()}
    again, _ = run(tmp_path, "--seeds=0,1", "--targets=0.5", "--criteria=taylor_fo_bn,random")
    assert {k: v["wall_seconds"] for k, v in again["cells"].items()} == before  # nothing re-run


@pytest.mark.slow
def test_transfer_study_oracle_part_smoke(tmp_path):
    results, out = run(tmp_path, "--part=oracle", "--seeds=0", "--criteria=taylor_fo_bn,random")
    assert results["cells"] == {}  # the oracle part trains no pruning cell
    (entry,) = results["oracle"].values()
    for definition in ("nvlabs", "heldout"):
        for name in ("taylor_fo_bn", "random"):
            c = entry[definition][name]
            assert -1.0 <= c["spearman"] <= 1.0 and c["n"] == entry["groups"]
            assert set(c["layer_mean"]) == {"spearman", "kendall", "pearson"}
    assert entry["minibatches"] == 2
    assert "oracle nvlabs" in out


TORCH_PY = os.path.join(ROOT, ".venv-torch", "bin", "python")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(TORCH_PY), reason="needs .venv-torch (benchmarks/torch_pruning_compare.py creates it)")
def test_transfer_study_torch_part_smoke(tmp_path):
    run(tmp_path, "--seeds=0,1", "--targets=0.5", "--criteria=taylor_fo_bn,random")
    results, out = run(tmp_path, "--part=torch", "--seeds=0,1", "--targets=0.5", "--criteria=taylor_fo_bn,random")
    runs = results["torch"]
    assert sorted(r["seed"] for r in runs.values()) == [0, 1]
    for r in runs.values():
        assert r["init_logit_max_abs_diff_vs_keras"] < 1e-4  # the same transferred network on both sides
        assert r["pruning_done"] and r["flops_fraction"] <= 0.5 + 1e-9
        assert len(r["epochs"]) == 2 and r["epochs"][-1]["params"] == r["params_after"] < r["params_before"]
        assert r["pruner"]["importance"] == "GroupTaylorImportance()" and r["channels_per_step"] >= 1
        same = r["keras_same_load"]
        assert same["criterion"] == "taylor_fo_bn" and same["wall_seconds"] > 0 and len(same["epochs"]) == 2
    comparison = results["torch_comparison"]["0.5"]
    assert comparison["torch"]["n"] == 2
    assert set(comparison["keras"]) == {"taylor_fo_bn/own", "random/own"}
    m = comparison["keras"]["random/own"]["margin_vs_torch"]
    assert m["ci95"][0] <= m["mean"] <= m["ci95"][1]
    assert results["variants"]["random/own|0.5"]["vs taylor_fo_bn/own"]["seeds"] == [0, 1]
    assert "Torch-Pruning 0.5: n=2" in out
    wall = comparison["wall_by_switch"]["step"]  # the whole-run wall times with the step-time phases
    assert sorted(wall["seeds"]) == [0, 1] and all(p["pruned_steps"] > 0 for p in wall["keras_phases"])
    # keras_taylor at the FLOPs Torch-Pruning reached, paired by seed
    results, out = run(tmp_path, "--match_torch", "--seeds=0,1", "--targets=0.5", "--criteria=taylor_fo_bn")
    eq = results["torch_comparison"]["0.5"]["equal_flops"]["taylor_fo_bn/own"]
    assert eq["seeds"] == [0, 1]
    for mine, theirs, target in zip(eq["flops"], eq["torch_flops"], [0.5, 0.5]):
        assert mine <= theirs + 1e-9 and theirs < target  # Torch-Pruning overshot; keras_taylor pruned to its FLOPs
    assert set(results["summary"]) == {"taylor_fo_bn|0.5", "random|0.5", "dense"}  # matched cells kept apart
    before = {k: v["prune_and_finetune_seconds"] for k, v in runs.items()}
    again, _ = run(tmp_path, "--part=torch", "--seeds=0,1", "--targets=0.5", "--criteria=taylor_fo_bn,random")
    assert {k: v["prune_and_finetune_seconds"] for k, v in again["torch"].items()} == before  # resumed, not re-run
