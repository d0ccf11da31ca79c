"""Masks vs channel removal: tfmot's unstructured magnitude pruning (50%
sparsity) against keras_taylor's structural pruning (~50% of the FLOPs), on
ResNet50 with random weights, measured the same way.

tensorflow-model-optimization works only on Keras 2 (`tf_keras`) models and
importing it sets TF_USE_LEGACY_KERAS=1 for the whole process, so its half
runs in its own venv and process (DESIGN.md §4):

1. This script creates `--venv` (default `.venv-tfmot`) if it is missing or
   broken: `python -m venv`, then `pip install tensorflow-cpu==2.21.*
   tf-keras==2.21.* tensorflow-model-optimization==0.8.1`.
2. In this (Keras 3) process: `keras.applications.ResNet50(weights=None)`
   with trained-looking random BN statistics, pruned with keras_taylor to
   <= 0.5 of its FLOPs (random order of keras_taylor's channel groups, no
   layer emptied; see benchmarks/latency_per_flop.py), surgery; measured:
   file sizes raw and gzipped (.keras, .h5, float32 .tflite) and latency
   ratio pruned / original (TF graph mode batch 1 and `--batch`, TFLite
   batch 1), original and pruned interleaved in the same rounds, with the
   original timed twice (`original_copy`, an A/A control for the noise).
3. Then `benchmarks/tfmot_worker.py` runs in the tfmot venv (subprocess)
   and measures the same things for dense vs 50%-sparse tf_keras ResNet50
   (see its docstring), plus TFLite's `Optimize.EXPERIMENTAL_SPARSITY`.

    python benchmarks/tfmot_contrast.py            # ~13 min on 2 busy cores (first run: + ~1 min venv setup)

Writes benchmarks/results/tfmot_contrast.json.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.pop("TF_USE_LEGACY_KERAS", None)

from absl import app, flags  # noqa: E402

import keras  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import latency_per_flop as lpf  # noqa: E402

from keras_taylor.latency import measure_latency  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PACKAGES = ["tensorflow-cpu==2.21.*", "tf-keras==2.21.*", "tensorflow-model-optimization==0.8.1"]

FLAGS = flags.FLAGS
flags.DEFINE_string("venv", os.path.join(ROOT, ".venv-tfmot"), "The tfmot venv (created if missing).")
flags.DEFINE_float("target", 0.5, "FLOPs fraction for keras_taylor.")
flags.DEFINE_integer("size_b1", 224, "Input size, batch 1 (TF and TFLite).")
flags.DEFINE_integer("size_batch", 128, "Input size, large batch.")
flags.DEFINE_integer("batch", 32, "Large batch size.")
flags.DEFINE_integer("rounds_b1", 40, "Interleaved rounds, batch 1.")
flags.DEFINE_float("round_s_b1", 0.3, "Seconds the unpruned model runs per round at batch 1 (sets the calls per round).")
flags.DEFINE_integer("rounds_batch", 20, "Interleaved rounds, large batch.")
flags.DEFINE_float("round_s_batch", 1.0, "Seconds the unpruned model runs per round at the large batch.")
flags.DEFINE_integer("tflite_threads", 2, "TFLite interpreter threads.")
flags.DEFINE_integer("seed", 0, "Seed.")
flags.DEFINE_integer("worker_timeout", 1800, "Seconds before the tfmot worker is stopped.")
flags.DEFINE_bool("skip_keras_taylor", False, "Only run the tfmot worker (debugging).")
flags.DEFINE_string("output", os.path.join(HERE, "results", "tfmot_contrast.json"), "JSON output.")

_CHECK = (
    "import json, tensorflow as tf, tf_keras, tensorflow_model_optimization as t, os; "
    "print(json.dumps({'tensorflow': tf.__version__, 'tf_keras': tf_keras.__version__, "
    "'tfmot': t.__version__, 'TF_USE_LEGACY_KERAS_after_import': os.environ.get('TF_USE_LEGACY_KERAS')}))"
)


def _venv_env() -> dict:
    env = dict(os.environ)
    env.pop("TF_USE_LEGACY_KERAS", None)
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return env


def _check_venv(python: str):
    if not os.path.exists(python):
        return None
    r = subprocess.run([python, "-c", _CHECK], capture_output=True, text=True, env=_venv_env(), timeout=300)
    if r.returncode != 0:
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def ensure_venv(venv: str) -> dict:
    """Creates the tfmot venv when it is missing or cannot import tfmot;
    returns the versions it imports and what was done."""
    python = os.path.join(venv, "bin", "python")
    start = time.time()
    versions = _check_venv(python)
    created = False
    if versions is None:
        print(f"setting up {venv}: pip install {' '.join(PACKAGES)}", flush=True)
        if not os.path.exists(python):
            subprocess.run([sys.executable, "-m", "venv", venv], check=True)
            created = True
        subprocess.run([python, "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", *PACKAGES], check=True)
        versions = _check_venv(python)
        if versions is None:
            raise RuntimeError(f"{python} still cannot import tensorflow, tf_keras and tfmot after pip install.")
    freeze = subprocess.run([python, "-m", "pip", "freeze"], capture_output=True, text=True).stdout.splitlines()
    wanted = ("tensorflow", "tf-keras", "tf_keras", "tensorflow-model-optimization", "tensorflow-cpu", "tensorflow_cpu", "keras", "numpy")
    return {
        "venv": os.path.relpath(venv, ROOT),
        "packages_requested": PACKAGES,
        "created_now": created,
        "setup_s": round(time.time() - start, 1),
        "imports": versions,
        "installed": [l for l in freeze if l.split("==")[0].lower() in wanted],
    }


def keras_taylor_half(tmp: str) -> dict:
    """Original vs keras_taylor-pruned ResNet50: files and interleaved latency."""
    sizes = [FLAGS.size_b1, FLAGS.size_batch]
    models, info = lpf.prune_variants("ResNet50", [FLAGS.target], sizes, FLAGS.seed)
    key = f"p{FLAGS.target:.2f}"
    var = info["variants"][key]
    out = {
        "model": info["constructor"],
        "selection": "random order of keras_taylor channel groups (seeded), shortest prefix reaching the FLOPs target; no layer emptied",
        "flops_ratio": var["flops_ratio"], "params_ratio": var["params_ratio"],
        "params": {"original": int(models["original"][FLAGS.size_b1].count_params()),
                   "pruned": int(models[key][FLAGS.size_b1].count_params())},
        "removed_groups": var["removed_groups"], "prunable_groups": info["prunable_groups"],
        "min_channels": var["min_channels"],
    }
    files = {}
    for name, k in (("original", "original"), ("pruned", key)):
        m = models[k][FLAGS.size_b1]
        for ext in ("keras", "h5"):
            p = os.path.join(tmp, f"kt_{name}.{ext}")
            m.save(p)
            files[f"{name}.{ext}"] = lpf.file_sizes(p)
    paths, checks = lpf.export_all({"original": models["original"], "pruned": models[key]}, FLAGS.size_b1, tmp, FLAGS.seed)
    for name, c in checks.items():
        files[f"{name}.tflite"] = {"raw_bytes": c["raw_bytes"], "gzip_bytes": c["gzip_bytes"], "convert_s": c["convert_s"]}
    out["tflite_check"] = {n: {k: c[k] for k in ("max_abs_diff", "max_abs_output", "runtime")} for n, c in checks.items()}
    out["files"] = files
    for name, batch, size, round_s, rounds in (
        ("tf_b1", 1, FLAGS.size_b1, FLAGS.round_s_b1, FLAGS.rounds_b1),
        ("tf_batch", FLAGS.batch, FLAGS.size_batch, FLAGS.round_s_batch, FLAGS.rounds_batch),
    ):
        out[f"load_before_{name}"] = lpf.load()
        calls = lpf.tf_calls(models["original"][size], batch, round_s, FLAGS.seed)
        out[name] = measure_latency({"original": models["original"][size], "pruned": models[key][size],
                                     "original_copy": models["original"][size]},
                                    batch_size=batch, rounds=rounds, calls_per_round=calls,
                                    warmup=3 if batch == 1 else 2, seed=FLAGS.seed)
        out[name]["calls_per_round"] = calls
        print(f"keras_taylor {name}: {_show(out[name])}", flush=True)
    out["load_before_tflite_b1"] = lpf.load()
    paths["original_copy"] = paths["original"]  # A/A control: a second interpreter on the same file
    out["tflite_b1"] = lpf.measure_tflite(paths, 1, FLAGS.rounds_b1, None, FLAGS.tflite_threads, FLAGS.seed,
                                          round_s=FLAGS.round_s_b1)
    print(f"keras_taylor tflite_b1: {_show(out['tflite_b1'])}", flush=True)
    return out


def _show(r: dict) -> str:
    return ", ".join(f"{k} {v['median_ms']:.1f}ms x{v['ratio_median']:.3f}" for k, v in r.items() if isinstance(v, dict))


def run_worker(python: str, tmp: str) -> dict:
    out_path = os.path.join(tmp, "tfmot_worker.json")
    cmd = [python, os.path.join(HERE, "tfmot_worker.py"), f"--output={out_path}",
           f"--size_b1={FLAGS.size_b1}", f"--size_batch={FLAGS.size_batch}", f"--batch={FLAGS.batch}",
           f"--rounds_b1={FLAGS.rounds_b1}", f"--round_s_b1={FLAGS.round_s_b1}",
           f"--rounds_batch={FLAGS.rounds_batch}", f"--round_s_batch={FLAGS.round_s_batch}",
           f"--tflite_threads={FLAGS.tflite_threads}", f"--seed={FLAGS.seed}"]
    start = time.time()
    r = subprocess.run(cmd, env=_venv_env(), timeout=FLAGS.worker_timeout, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"tfmot worker failed with exit code {r.returncode}: {' '.join(cmd)}")
    with open(out_path) as f:
        result = json.load(f)
    result["worker_process_s"] = round(time.time() - start, 1)
    return result


def ratio(a: dict, b: dict, field: str) -> float:
    return b[field] / a[field]


def comparison(kt_half: dict | None, tfmot: dict) -> list:
    """One row per method: pruned ÷ unpruned, for each measure."""
    rows = []
    if kt_half is not None:
        f = kt_half["files"]
        rows.append({
            "method": f"keras_taylor: channels removed (surgery), FLOPs <= {FLAGS.target}",
            "flops_ratio": kt_half["flops_ratio"][str(FLAGS.size_b1)],
            "params_ratio_nonzero": kt_half["params_ratio"],
            "model_file": ".keras",
            "model_file_raw_ratio": ratio(f["original.keras"], f["pruned.keras"], "raw_bytes"),
            "model_file_gzip_ratio": ratio(f["original.keras"], f["pruned.keras"], "gzip_bytes"),
            "h5_raw_ratio": ratio(f["original.h5"], f["pruned.h5"], "raw_bytes"),
            "h5_gzip_ratio": ratio(f["original.h5"], f["pruned.h5"], "gzip_bytes"),
            "tflite_raw_ratio": ratio(f["original.tflite"], f["pruned.tflite"], "raw_bytes"),
            "tflite_gzip_ratio": ratio(f["original.tflite"], f["pruned.tflite"], "gzip_bytes"),
            "latency_tf_b1": _lat(kt_half["tf_b1"]["pruned"]),
            f"latency_tf_b{FLAGS.batch}": _lat(kt_half["tf_batch"]["pruned"]),
            "latency_tflite_b1": _lat(kt_half["tflite_b1"]["pruned"]),
        })
    f = tfmot["files"]
    sp = tfmot["sparsity"]["sparse"]
    base = {
        "flops_ratio": 1.0,  # the same dense kernels run, zeros included
        "params_ratio_nonzero": 1.0 - sp["all_weights"],
        "model_file": ".h5",
        "h5_raw_ratio": ratio(f["dense.h5"], f["sparse.h5"], "raw_bytes"),
        "h5_gzip_ratio": ratio(f["dense.h5"], f["sparse.h5"], "gzip_bytes"),
        "latency_tf_b1": _lat(tfmot["tf_b1"]["sparse"]),
        f"latency_tf_b{FLAGS.batch}": _lat(tfmot["tf_batch"]["sparse"]),
    }
    base["model_file_raw_ratio"], base["model_file_gzip_ratio"] = base["h5_raw_ratio"], base["h5_gzip_ratio"]
    for name, label in (("sparse", "tfmot: 50% magnitude masks (strip_pruning), float32 TFLite"),
                        ("sparse_experimental_sparsity", "tfmot: 50% masks, TFLite with Optimize.EXPERIMENTAL_SPARSITY")):
        if f"{name}.tflite" not in f:
            continue
        row = {"method": label, **base,
               "tflite_raw_ratio": ratio(f["dense.tflite"], f[f"{name}.tflite"], "raw_bytes"),
               "tflite_gzip_ratio": ratio(f["dense.tflite"], f[f"{name}.tflite"], "gzip_bytes"),
               "latency_tflite_b1": _lat(tfmot["tflite_b1"][name])}
        rows.append(row)
    if kt_half is not None:
        rows.append({"method": "A/A control, Keras 3 process: original ÷ original (separate tf.function / interpreter)",
                     **{k: _lat(kt_half[src]["original_copy"]) for k, src in (
                         ("latency_tf_b1", "tf_b1"), (f"latency_tf_b{FLAGS.batch}", "tf_batch"), ("latency_tflite_b1", "tflite_b1"))}})
    rows.append({"method": "A/A control, tfmot process: dense ÷ dense (separate tf.function / interpreter)",
                 **{k: _lat(tfmot[src]["dense_copy"]) for k, src in (
                     ("latency_tf_b1", "tf_b1"), (f"latency_tf_b{FLAGS.batch}", "tf_batch"), ("latency_tflite_b1", "tflite_b1"))}})
    return rows


def _lat(r: dict) -> dict:
    return {"median": r["ratio_median"], "min": r["ratio_min"], "max": r["ratio_max"]}


def main(argv):
    del argv
    lpf.quiet_logs()
    wall0 = time.time()
    cmd = " ".join(["python", "benchmarks/tfmot_contrast.py"] + sys.argv[1:])
    result = {
        "command": cmd,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        **lpf.machine(),
        "load_average_1_5_15min": {"start": lpf.load()},
        "settings": {k: getattr(FLAGS, k) for k in (
            "target", "size_b1", "size_batch", "batch", "rounds_b1", "round_s_b1", "rounds_batch",
            "round_s_batch", "tflite_threads", "seed")},
    }
    result["tfmot_venv"] = ensure_venv(FLAGS.venv)
    print("tfmot venv:", result["tfmot_venv"]["imports"], flush=True)
    tmp = tempfile.mkdtemp(prefix="tfmot_contrast_")
    kt_half = None
    if not FLAGS.skip_keras_taylor:
        t0 = time.time()
        kt_half = keras_taylor_half(tmp)
        kt_half["wall_s"] = round(time.time() - t0, 1)
        result["keras_taylor"] = kt_half
        keras.backend.clear_session()
        gc.collect()
    result["load_average_1_5_15min"]["before_worker"] = lpf.load()
    result["tfmot"] = run_worker(os.path.join(FLAGS.venv, "bin", "python"), tmp)
    result["comparison"] = comparison(kt_half, result["tfmot"])
    result["load_average_1_5_15min"]["end"] = lpf.load()
    result["wall_s"] = round(time.time() - wall0, 1)
    os.makedirs(os.path.dirname(FLAGS.output), exist_ok=True)
    with open(FLAGS.output, "w") as fh:
        json.dump(result, fh, indent=1)
    b = FLAGS.batch
    print(f"\n{'method':62s} {'FLOPs':>5s} {'nnz':>5s} {'file':>5s} {'gz':>5s} {'tfl':>5s} {'tfl.gz':>6s}  latency TF b1 / TF b{b} / TFLite b1")
    for r in result["comparison"]:
        lat = " / ".join(f"{r[k]['median']:.3f} [{r[k]['min']:.2f}-{r[k]['max']:.2f}]" for k in ("latency_tf_b1", f"latency_tf_b{b}", "latency_tflite_b1"))
        num = lambda k, w=5: f"{r[k]:{w}.2f}" if k in r else " " * w
        print(f"{r['method'][:62]:62s} {num('flops_ratio')} {num('params_ratio_nonzero')} {num('model_file_raw_ratio')} "
              f"{num('model_file_gzip_ratio')} {num('tflite_raw_ratio')} {num('tflite_gzip_ratio', 6)}  {lat}")
    print(f"wall {result['wall_s']} s; load {result['load_average_1_5_15min']}; wrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
