"""Memory: peak RSS of ResNet-50 training with and without Taylor scoring.

Claim checked: scoring adds only O(channels) memory. Three variants of the
same `keras.applications.ResNet50(weights=None, classes=10)` train with
`model.fit` on random data, each in its OWN fresh subprocess (peak RSS is a
per-process figure):
  original  the user's model, plain `fit` (with --copy_original, a
            `clone_model` copy of it, built as the gated copy is);
  gated     `add_gates(model)` (the ungated model is deleted), plain `fit`;
  scoring   `add_gates(model)` + `TaylorPruning(target=0.5, prune_every=10**9)`:
            scores accumulate in every train step, no pruning step comes
            (`target=1.0` would not do: the callback sees the target already
            met and never installs the scoring step).
Each child goes through four phases and records, at the end of each, VmRSS,
VmHWM (/proc/self/status) and `getrusage(RUSAGE_SELF).ru_maxrss`, then
resets the high-water mark (`echo 5 > /proc/self/clear_refs`; on Linux this
resets ru_maxrss too), so each phase has its own peak:
  build   imports, data, model (+ gates), compile, then gc and (--malloc_trim)
          glibc malloc_trim(0) so freed heap pages leave the RSS;
  setup   first `fit` up to the end of the callbacks' on_train_begin (the
          TaylorPruning setup: graph analysis, cost model, scorer);
  warmup  the rest of that `fit`: trace of the train step and
          --warmup_steps minibatches;
  steps   second `fit` of --steps minibatches (no retrace).
The process peak is the max over the phases (what ru_maxrss would be without
the resets). The gated variants briefly hold the ungated model too while
`add_gates` copies it (≈ +90 MiB in the build phase; --copy_original gives
the original variant the same history), so the fit-phase peak
(max of setup, warmup and steps) and the train-step peak (max of warmup and
steps) isolate training memory. Also recorded, the O(channels) figure to compare with: the pruning state in bytes,
wherever it lives (tf.Variables the scorer holds, e.g. a per-group score sum,
plus the `ChannelGate` variables other than the gate, e.g. per-channel
score/EMA and run counters), with the number of channel groups and gated
channels, the gate variables and the host-side numpy arrays of the scorer and
the callback. Every child imports one copy of keras_taylor/ taken when the
run starts (--snapshot) and records its sha256, so an edit of the working
tree mid-run cannot mix versions.

Rounds run the variants in a fresh random order; reported: per-variant median
[min–max] of each figure and the median [min–max] of the per-round
differences scoring − gated and gated − original.

    python benchmarks/memory.py                              # 96×96, batch 16, 20 steps, 3 rounds
    python benchmarks/memory.py --input_size 224 --rounds 5
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("rounds", 3, "Interleaved rounds (one fresh subprocess per variant per round).")
flags.DEFINE_integer("steps", 20, "Measured minibatches per run, after the warm-up.")
flags.DEFINE_integer("warmup_steps", 3, "Minibatches of the warm-up fit (traces the train step).")
flags.DEFINE_integer("batch_size", 16, "Batch size.")
flags.DEFINE_integer("input_size", 96, "Input height = width of the ResNet50.")
flags.DEFINE_bool("jit_compile", False, "Compile the train step with XLA.")
flags.DEFINE_integer("seed", 0, "Seed of the variant order.")
flags.DEFINE_string("output", os.path.join(os.path.dirname(__file__), "results", "memory.json"), "JSON output.")
flags.DEFINE_enum("child", None, ["original", "gated", "scoring"], "Internal: run one variant in this process.")
flags.DEFINE_bool("copy_original", True, "The original variant also copies its model (clone_model + set_weights) and drops the first, as add_gates does for the gated ones: the dropped model's ~100 MiB stay in the allocator (glibc keeps them for reuse; malloc_trim does not return them), so without the copy the gated variants start fit ~120 MiB higher for that reason alone.")
flags.DEFINE_bool("malloc_trim", True, "Call glibc malloc_trim(0) at the end of the build phase in every variant (hands freed heap pages back; in practice only ~10 MiB, glibc keeps the dropped model's pages for reuse).")
flags.DEFINE_string("child_output", None, "Internal: where the child writes its JSON.")
flags.DEFINE_string("snapshot_dir", None, "Internal: the copy of keras_taylor/ the child imports.")
flags.DEFINE_bool("snapshot", True, "Copy keras_taylor/*.py once at the start and run every child on that copy, so an edit of the working tree mid-run cannot mix versions.")

VARIANTS = ("original", "gated", "scoring")
MIB = 1024.0 * 1024.0


# ---- per-process memory ----------------------------------------------------------
def proc_status() -> dict:
    """VmRSS and VmHWM of this process in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def phase_end(name: str, record: dict, reset: bool = True) -> None:
    """Stores this phase's RSS now and peak, then resets the high-water mark."""
    st = proc_status()
    record[name] = {
        "rss_mib": st["VmRSS"] / MIB,
        "vmhwm_mib": st["VmHWM"] / MIB,
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB,  # KiB on Linux
    }
    if reset:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            record[name]["hwm_reset"] = True
        except OSError:
            record[name]["hwm_reset"] = False


def trim_heap() -> bool:
    """glibc `malloc_trim(0)`: hands freed heap pages back to the OS."""
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def train_graph_nodes(fn) -> int | None:
    """Nodes of the traced train function's graph(s) (private tf.function API; None if unavailable)."""
    try:
        cands = [fn] + [c.cell_contents for c in (getattr(fn, "__closure__", None) or [])]
        total = 0
        for f in cands:
            if hasattr(f, "_list_all_concrete_functions"):
                for cf in f._list_all_concrete_functions():
                    gd = cf.graph.as_graph_def()
                    total += len(gd.node) + sum(len(fd.node_def) for fd in gd.library.function)
        return total or None
    except Exception:  # noqa: BLE001 - information only
        return None


def variable_bytes(variables) -> int:
    return int(sum(int(np.prod(v.shape)) * np.dtype(getattr(v.dtype, "as_numpy_dtype", v.dtype)).itemsize for v in variables))


def as_tensor(x):
    """A keras.Variable's value, or `x` itself (a tensor)."""
    return x.value if hasattr(x, "assign") and hasattr(x, "value") else x


def held_variables(obj) -> list:
    """tf/keras Variables an object holds in its attributes (directly or in a list/tuple/dict)."""
    import keras
    import tensorflow as tf

    found = []
    for value in vars(obj).values():
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
        found += [v for v in items if isinstance(v, (keras.Variable, tf.Variable))]
    return found


def host_array_bytes(obj) -> int:
    """Bytes of the numpy arrays an object holds (directly or in a list/tuple)."""
    total = 0
    for value in vars(obj).values():
        items = value if isinstance(value, (list, tuple)) else [value]
        total += sum(a.nbytes for a in items if isinstance(a, np.ndarray))
    return int(total)


def gate_state_variables(model) -> list:
    """The `ChannelGate` layers' own variables other than the gate (pruning state, if any)."""
    import keras_taylor as kt

    out = []
    for g in kt.gates.gate_layers(model):
        inner = {id(v) for v in g.layer.variables}
        out += [v for v in g.variables if id(v) not in inner and v is not g.gate]
    return out


def gate_facts(model) -> dict:
    """Gate layers, gated channels and the bytes of the gates' own variables."""
    import keras_taylor as kt

    gates = kt.gates.gate_layers(model)
    state_vars = gate_state_variables(model)
    return {
        "gate_layers": len(gates),
        "gated_channels": int(sum(int(g.gate.shape[0]) for g in gates)),
        "gate_variables_bytes": variable_bytes([g.gate for g in gates]),
        "gate_state_variable_names": sorted({v.name for v in state_vars}),
        "gate_state_variables_bytes": variable_bytes(state_vars),
    }


PACKAGE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "keras_taylor")


def source_digest(root: str = PACKAGE_DIR) -> str:
    """sha256 of keras_taylor/*.py under `root` (the working tree may change during a run)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            with open(os.path.join(root, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()


# ---- child: one variant ------------------------------------------------------------
def SetupProbe(phases):
    """A callback that closes the "setup" phase when `fit` has run every on_train_begin."""
    import keras

    class Probe(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            phase_end("setup", phases)

    return Probe()


def run_child(variant: str, path: str) -> None:
    import keras
    import tensorflow as tf

    import keras_taylor as kt

    root = os.path.dirname(os.path.abspath(kt.__file__))
    if FLAGS.snapshot_dir:
        assert root == os.path.join(os.path.abspath(FLAGS.snapshot_dir), "keras_taylor"), root
    digest = source_digest(root)

    phases: dict = {}
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    size, batch = FLAGS.input_size, FLAGS.batch_size
    n = batch * max(FLAGS.steps, FLAGS.warmup_steps)
    x = rng.uniform(0, 1, (n, size, size, 3)).astype("float32")
    y = rng.integers(0, 10, n).astype("int32")

    model = keras.applications.ResNet50(weights=None, input_shape=(size, size, 3), classes=10)
    params = model.count_params()
    if variant != "original":
        copy = kt.add_gates(model)
    elif FLAGS.copy_original:
        # The same build history as add_gates (build, copy, drop the first):
        # the allocator keeps the dropped model's pages for reuse either way.
        copy = keras.models.clone_model(model)
        copy.set_weights(model.get_weights())
    else:
        copy = model
    del model
    gc.collect()
    model = copy
    del copy
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(),  # ResNet50 ends in softmax
        jit_compile=FLAGS.jit_compile,
    )
    callbacks = []
    pruner = None
    if variant == "scoring":
        pruner = kt.TaylorPruning(target=0.5, prune_every=10**9)
        callbacks = [pruner]
    gc.collect()
    rss_before_trim = proc_status()["VmRSS"] / MIB
    trimmed = trim_heap() if FLAGS.malloc_trim else False
    phase_end("build", phases)

    fit = dict(batch_size=batch, epochs=1, verbose=0, shuffle=False)
    probe = SetupProbe(phases)  # after the pruner: ends the "setup" phase
    model.fit(x, y, steps_per_epoch=FLAGS.warmup_steps, callbacks=callbacks + [probe], **fit)
    phase_end("warmup", phases)
    scoring_fn = pruner.scorer._scoring_function if pruner is not None else None
    start = time.perf_counter()
    model.fit(x[: batch * FLAGS.steps], y[: batch * FLAGS.steps], callbacks=callbacks, **fit)
    seconds = time.perf_counter() - start
    phase_end("steps", phases, reset=False)

    facts = {
        "variant": variant,
        "params": params,
        "model_variables_bytes": variable_bytes(model.variables),
        "optimizer_variables_bytes": variable_bytes(model.optimizer.variables),
        "steps_s": seconds,
        "keras_taylor_source_sha256": digest,
        "rss_before_malloc_trim_mib": rss_before_trim,
        "malloc_trim_released": trimmed,
        "train_graph_nodes": train_graph_nodes(
            pruner.scorer._scoring_function if pruner is not None else model.train_function),
    }
    if variant != "original":
        facts.update(gate_facts(model))
    if pruner is not None:
        scorer = pruner.scorer
        steps = float(keras.ops.convert_to_numpy(as_tensor(scorer.steps)))
        expected = FLAGS.warmup_steps + FLAGS.steps
        assert steps == expected, f"scorer accumulated {steps} minibatches, expected {expected}"
        assert not pruner.history and not pruner.removed, "a pruning step ran during the measurement"
        assert scorer._scoring_function is scoring_fn, "the scoring step was rebuilt for the second fit"
        own = held_variables(scorer)
        facts.update({
            "num_groups": int(scorer.num_groups),
            "scorer_variables": {v.name: [list(v.shape), str(getattr(v.dtype, "name", v.dtype))] for v in own},
            "scorer_variables_bytes": variable_bytes(own),
            "scorer_host_arrays_bytes": host_array_bytes(scorer),
            "callback_host_arrays_bytes": host_array_bytes(pruner),
            "scored_minibatches": steps,
        })
        # The pruning state, wherever it lives: the scorer's own variables
        # (accumulators) plus the gate layers' state variables besides the
        # gate, each variable counted once (the scorer may hold a gate's).
        state = {id(as_tensor(v)): v for v in own + gate_state_variables(model)}
        facts["pruning_state_bytes"] = variable_bytes(state.values())
    fit_peak = max(phases[k]["vmhwm_mib"] for k in ("setup", "warmup", "steps"))
    result = {
        **facts,
        "phases": phases,
        "peak_rss_mib": max(p["vmhwm_mib"] for p in phases.values()),
        "peak_ru_maxrss_mib": max(p["ru_maxrss_mib"] for p in phases.values()),
        "fit_peak_rss_mib": fit_peak,
        "setup_peak_rss_mib": phases["setup"]["vmhwm_mib"],
        "train_peak_rss_mib": max(phases["warmup"]["vmhwm_mib"], phases["steps"]["vmhwm_mib"]),
        "steps_peak_rss_mib": phases["steps"]["vmhwm_mib"],
        "rss_after_setup_mib": phases["setup"]["rss_mib"],
        "rss_before_fit_mib": phases["build"]["rss_mib"],
        "rss_growth_during_fit_mib": phases["steps"]["rss_mib"] - phases["build"]["rss_mib"],
        "fit_peak_over_before_fit_mib": fit_peak - phases["build"]["rss_mib"],
        "versions": {
            "python": platform.python_version(),
            "keras": keras.__version__,
            "tensorflow": tf.__version__,
            "numpy": np.__version__,
            "keras_taylor": kt.__version__,
            "backend": keras.backend.backend(),
        },
    }
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


# ---- parent ------------------------------------------------------------------------------
def machine() -> dict:
    cpu = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "processor":
                cpu["processors"] = cpu.get("processors", 0) + 1
            elif key in ("model name", "cpu MHz", "cache size", "cpu cores") and key not in cpu:
                cpu[key] = value
    mem = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("MemTotal", "MemAvailable", "SwapTotal"):
                mem[key + "_mib"] = round(int(value.split()[0]) / 1024)
    return {
        **_harness.machine(),
        "cpuinfo": cpu,
        "meminfo_at_start": mem,
    }


def git_state() -> dict:
    """HEAD and whether keras_taylor/ differs from it (the figures are for the tree as run)."""
    root = os.path.dirname(PACKAGE_DIR)
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "keras_taylor"], cwd=root,
                               capture_output=True, text=True).stdout.split("\n")
        return {"head": head, "keras_taylor_uncommitted": sorted(l[3:] for l in dirty if l.strip())}
    except OSError:
        return {}


def spawn(variant: str, snapshot_dir: str | None) -> dict:
    fd, path = tempfile.mkstemp(prefix=f"kt_memory_{variant}_", suffix=".json")
    os.close(fd)
    cmd = [
        sys.executable, os.path.abspath(__file__),
        f"--child={variant}", f"--child_output={path}",
        f"--steps={FLAGS.steps}", f"--warmup_steps={FLAGS.warmup_steps}",
        f"--batch_size={FLAGS.batch_size}", f"--input_size={FLAGS.input_size}",
        f"--jit_compile={FLAGS.jit_compile}", f"--copy_original={FLAGS.copy_original}",
        f"--malloc_trim={FLAGS.malloc_trim}",
    ]
    env = dict(os.environ)
    if snapshot_dir:
        cmd.append(f"--snapshot_dir={snapshot_dir}")
        env["PYTHONPATH"] = snapshot_dir + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
            raise RuntimeError(f"the {variant} child failed with exit status {proc.returncode}")
        with open(path) as f:
            result = json.load(f)
    finally:
        os.remove(path)
    result["wall_s"] = time.perf_counter() - start
    return result


def stats(values) -> dict:
    a = np.asarray(values, dtype="float64")
    return {"median": float(np.median(a)), "min": float(a.min()), "max": float(a.max())}


def main(argv):
    del argv
    if FLAGS.child:
        run_child(FLAGS.child, FLAGS.child_output)
        return
    rng = np.random.default_rng(FLAGS.seed)
    facts = machine()
    git = git_state()
    snapshot_dir = None
    if FLAGS.snapshot:
        snapshot_dir = tempfile.mkdtemp(prefix="kt_memory_src_")
        shutil.copytree(PACKAGE_DIR, os.path.join(snapshot_dir, "keras_taylor"),
                        ignore=shutil.ignore_patterns("__pycache__"))
    load_before = os.getloadavg()
    runs = {v: [] for v in VARIANTS}
    orders = []
    try:
        for r in range(FLAGS.rounds):
            order = rng.permutation(VARIANTS).tolist()
            orders.append(order)
            for variant in order:
                res = spawn(variant, snapshot_dir)
                runs[variant].append(res)
                print(
                    f"round {r + 1}/{FLAGS.rounds} {variant:8s}: peak {res['peak_rss_mib']:.0f} MiB "
                    f"(fit {res['fit_peak_rss_mib']:.0f}, before fit {res['rss_before_fit_mib']:.0f}, "
                    f"growth in fit {res['rss_growth_during_fit_mib']:+.0f}) in {res['wall_s']:.0f}s",
                    flush=True,
                )
    finally:
        if snapshot_dir:
            shutil.rmtree(snapshot_dir, ignore_errors=True)
    load_after = os.getloadavg()

    keys = ("peak_rss_mib", "peak_ru_maxrss_mib", "fit_peak_rss_mib", "setup_peak_rss_mib",
            "train_peak_rss_mib", "steps_peak_rss_mib", "rss_before_fit_mib", "rss_after_setup_mib",
            "rss_growth_during_fit_mib", "fit_peak_over_before_fit_mib")
    summary = {k: {v: stats([run[k] for run in runs[v]]) for v in VARIANTS} for k in keys}
    diffs = {}
    for a, b in (("scoring", "gated"), ("gated", "original"), ("scoring", "original")):
        diffs[f"{a}-{b}"] = {
            k: stats([ra[k] - rb[k] for ra, rb in zip(runs[a], runs[b])])
            for k in keys if k != "peak_ru_maxrss_mib"
        }
    sc = runs["scoring"][0]
    o_mem = {
        "num_groups": sc["num_groups"],
        "gate_layers": sc["gate_layers"],
        "gated_channels": sc["gated_channels"],
        "scorer_variables": sc["scorer_variables"],
        "scorer_variables_bytes": sc["scorer_variables_bytes"],
        "gate_state_variable_names": sc["gate_state_variable_names"],
        "gate_state_variables_bytes": sc["gate_state_variables_bytes"],
        "pruning_state_bytes": sc["pruning_state_bytes"],
        "pruning_state_mib": sc["pruning_state_bytes"] / MIB,
        "pruning_state_bytes_per_group": sc["pruning_state_bytes"] / sc["num_groups"],
        "pruning_state_bytes_per_gated_channel": sc["pruning_state_bytes"] / sc["gated_channels"],
        "gate_variables_bytes": sc["gate_variables_bytes"],
        "scorer_host_arrays_bytes": sc["scorer_host_arrays_bytes"],
        "callback_host_arrays_bytes": sc["callback_host_arrays_bytes"],
        "train_graph_nodes": {v: runs[v][0]["train_graph_nodes"] for v in VARIANTS},
        "model_variables_bytes": {v: runs[v][0]["model_variables_bytes"] for v in VARIANTS},
        "optimizer_variables_bytes": {v: runs[v][0]["optimizer_variables_bytes"] for v in VARIANTS},
    }
    digests = sorted({run["keras_taylor_source_sha256"] for rs in runs.values() for run in rs})
    if len(digests) > 1:
        print(f"WARNING: keras_taylor/*.py changed during the run ({len(digests)} versions imported)", flush=True)
    size = FLAGS.input_size
    cmd = " ".join(["python", "benchmarks/memory.py"] + sys.argv[1:])
    result = {
        "command": cmd,
        "date": time.strftime("%Y-%m-%d"),
        **facts,
        "versions": runs["original"][0]["versions"],
        "load_average_1_5_15min": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in load_after]},
        "model": f"keras.applications.ResNet50(weights=None, classes=10), {size}x{size}x3, batch {FLAGS.batch_size}, SGD(momentum=0.9)",
        "params": runs["original"][0]["params"],
        "jit_compile": FLAGS.jit_compile,
        "malloc_trim": FLAGS.malloc_trim,
        "copy_original": FLAGS.copy_original,
        "rounds": FLAGS.rounds,
        "warmup_steps": FLAGS.warmup_steps,
        "steps": FLAGS.steps,
        "orders": orders,
        "keras_taylor_source_sha256": digests,
        "git": git,
        "scoring_config": "TaylorPruning(target=0.5, prune_every=10**9): scores every step, never prunes",
        "notes": (
            "MiB = 2**20 bytes. Each run is a fresh subprocess. The high-water mark is reset "
            "(/proc/self/clear_refs) after the build and warmup phases; peak_rss_mib is the max "
            "of the phase peaks (VmHWM), fit_peak_rss_mib the max over setup, warmup and steps, "
            "train_peak_rss_mib over warmup and steps, steps_peak_rss_mib the measured steps only. "
            "The gated variants hold the ungated model during add_gates (build phase) and glibc keeps its freed pages "
            "for reuse (malloc_trim(0), called at the end of the build phase, returns only ~10 MiB); with copy_original "
            "the original variant is a clone_model copy built the same way, so all three start fit from the same allocator history. "
            "pruning_state_bytes = the scorer's own variables + the gate layers' variables other "
            "than the gate (per-channel score/EMA and counters where the gates carry them)."
        ),
        "o_channels": o_mem,
        "median": {k: {v: s["median"] for v, s in per.items()} for k, per in summary.items()},
        "per_variant": summary,
        "differences_mib": diffs,
        "per_run": runs,
    }
    os.makedirs(os.path.dirname(FLAGS.output), exist_ok=True)
    with open(FLAGS.output, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "per_run"}, indent=1))

    med = result["median"]
    for key, label in (("peak_rss_mib", "peak RSS"), ("train_peak_rss_mib", "peak RSS of the train steps"),
                       ("rss_after_setup_mib", "RSS after callback setup")):
        d_sg = diffs["scoring-gated"][key]
        d_go = diffs["gated-original"][key]
        print(
            f"{label}: original {med[key]['original']:.0f} MiB, gated {med[key]['gated']:.0f} MiB, "
            f"scoring {med[key]['scoring']:.0f} MiB ({d_sg['median']:+.0f} MiB over gated "
            f"[{d_sg['min']:+.0f}, {d_sg['max']:+.0f}], gated {d_go['median']:+.0f} MiB over original "
            f"[{d_go['min']:+.0f}, {d_go['max']:+.0f}]; pruning state {o_mem['pruning_state_mib']:.2f} MiB "
            f"({o_mem['pruning_state_bytes']:,} bytes) for {o_mem['num_groups']:,} groups / "
            f"{o_mem['gated_channels']:,} gated channels; "
            f"median of {FLAGS.rounds} rounds)"
        )


if __name__ == "__main__":
    app.run(main)
