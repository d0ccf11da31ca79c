"""What every script of benchmarks/ shares: one interleaved timing loop and its
summary, the machine facts, step timing in `fit`, compilation and flags.

Importable from the side environments (the tfmot venv of `tfmot_worker.py`,
the PyTorch venv of `torch_side.py`): at import time it needs numpy and the
standard library only; Keras and TensorFlow are imported by the functions
that use them.

The timing loop itself is `keras_taylor/latency.py` (`interleaved`,
`summarize`, `calls_for`), the one the library's `measure_latency` runs. It
is loaded here by file path, not as `keras_taylor.latency`, so that
importing it does not import the `keras_taylor` package (which needs Keras 3)
in the side environments. One loop for the library and the benchmarks means a
benchmark measures latency exactly as `keras_taylor.latency` documents.

Usage (scripts run as `python benchmarks/<name>.py`, so this directory is on
`sys.path`):

    import _harness
    result = _harness.measure({"a": run_a, "b": run_b}, rounds=15, round_s=0.3)
    result["b"]["ratio_median"], result["b"]["ratio_min"], result["b"]["ratio_max"]
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
import time

import numpy as np

_LATENCY_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "keras_taylor", "latency.py")


def _load_latency():
    spec = importlib.util.spec_from_file_location("_keras_taylor_latency_loop", _LATENCY_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_latency = _load_latency()
interleaved = _latency.interleaved
calls_for = _latency.calls_for


def summarize(times: dict, reference: str, per_round: bool = True) -> dict:
    """`keras_taylor.latency.summarize` with the per-round times kept (the
    benchmarks' JSON records them): per name, median/min/max ms and the
    median [min-max] of the per-round ratios against `reference`."""
    return _latency.summarize(times, reference, per_round=per_round)


def measure(runs: dict, rounds: int, calls: int | None = None, round_s: float = 0.3, reference=None,
            seed=0, warmup: int = 3, finish=None) -> dict:
    """Times zero-argument callables in interleaved rounds (the benchmarks' one loop).

    Each run is called `warmup` times first; then every round calls each run
    `calls` times, in a fresh random order (`interleaved`). `calls=None`: as
    many as make the reference run about `round_s` seconds (`calls_for`,
    1 to 50). `finish` is called on a round's last output before the clock
    stops (e.g. `lambda y: y.numpy()`).

    Returns:
        `summarize(times, reference)` (reference: the first run by default)
        plus `"calls_per_round"` and `"rounds"`.
    """
    names = list(runs)
    reference = names[0] if reference is None else reference
    for n in names:
        for _ in range(warmup):
            out = runs[n]()
            if finish is not None:
                finish(out)
    if calls is None:
        ref = runs[reference]
        calls = calls_for((lambda: finish(ref())) if finish is not None else ref, round_s)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    times = interleaved(runs, rounds, calls, rng, finish=finish)
    out = summarize(times, reference)
    out["calls_per_round"] = calls
    out["rounds"] = rounds
    return out


def in_rounds(names, rounds: int, measure, seed=0) -> dict:
    """Interleaved rounds of any measurement (a `fit` with a step timer, a
    profiled run, a subprocess): per round, `measure(name)` for every name in
    a fresh random order. Returns `{name: [result per round]}`. (`measure`
    and `interleaved` are the same schedule for call timings.)"""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    names = list(names)
    results = {n: [] for n in names}
    for _ in range(rounds):
        for i in rng.permutation(len(names)).tolist():
            results[names[i]].append(measure(names[i]))
    return results


# ---- machine facts ---------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def load() -> list:
    """The 1/5/15-minute load averages, rounded."""
    return [round(x, 2) for x in os.getloadavg()]


def machine(**extra) -> dict:
    """Machine, CPU, Python and library versions (Keras, TensorFlow, torch...
    only when the script has imported them: nothing is imported here)."""
    facts = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}",
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    for name in ("keras", "tensorflow", "tf_keras", "tensorflow_model_optimization", "torch", "torch_pruning"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "__version__"):
            facts[name] = module.__version__
    if "keras" in sys.modules and hasattr(sys.modules["keras"], "backend"):
        try:
            facts["backend"] = sys.modules["keras"].backend.backend()
        except Exception:  # tf_keras's keras has no backend() function
            pass
    facts.update(extra)
    return facts


# ---- Keras training --------------------------------------------------------------

def compile_model(model, learning_rate: float = 0.01, nesterov: bool = False, metrics: bool = True,
                  jit_compile=False):
    """SGD (momentum 0.9) on sparse categorical cross-entropy from logits, the
    setup of examples/fashion_mnist.py; `metrics` adds accuracy as `"acc"`."""
    import keras

    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=nesterov),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="acc")] if metrics else None,
        jit_compile=jit_compile,
    )
    return model


def _step_timer_class():
    import keras

    class StepTimer(keras.callbacks.Callback):
        """The step-time log of a `fit`: the wall time of every training
        minibatch (`times`, seconds), and per minibatch `steps` rows
        `(start, seconds, model index, pruning done)`: the index into `models`
        of the model that trained it (`keras_taylor.fit_prune` hands its callbacks the
        pruned model at the switch: index 1). `rows`: seconds and
        `count_params` per epoch. With a `pruner`, `times` is also split into
        `scoring` (pruning not done when the minibatch began) and `after`;
        list it before the pruner (and before `fit_prune`'s switch, which
        `fit_prune` appends last), so a minibatch's time excludes the pruning
        step and the switch that follow it. `phases()` sums the log per phase."""

        def __init__(self, pruner=None, pause_log=None, pause_every=1.0):
            super().__init__()
            self.pruner = pruner
            # With `pause_log` (a path): from on_train_end on, faulthandler dumps every thread's
            # Python stack there every `pause_every` seconds until `stop_pause_trace()` (call it when `fit` returns),
            # so a pause between on_train_end and `fit` returning leaves where it is.
            self.pause_log, self.pause_every, self._pause_file = pause_log, pause_every, None
            self.steps, self.rows, self.models = [], [], []
            self.train_begin = self.train_end = None  # `time.perf_counter()` at on_train_begin / on_train_end

        @property
        def times(self) -> list:
            """Seconds of every training minibatch, in order (from `steps`)."""
            return [s[1] for s in self.steps]

        @property
        def scoring(self) -> list:
            """With a `pruner`: seconds of the minibatches that began before pruning was done."""
            return [s[1] for s in self.steps if not s[3]] if self.pruner is not None else []

        @property
        def after(self) -> list:
            """With a `pruner`: seconds of the minibatches that began after pruning was done."""
            return [s[1] for s in self.steps if s[3]] if self.pruner is not None else []

        def _model_index(self) -> int:
            for i, m in enumerate(self.models):
                if m is self.model:
                    return i
            self.models.append(self.model)
            return len(self.models) - 1

        def on_train_begin(self, logs=None):
            self.train_begin = time.perf_counter()

        def on_train_end(self, logs=None):
            self.train_end = time.perf_counter()
            if self.pause_log is not None:
                import faulthandler

                self.stop_pause_trace()
                self._pause_file = open(self.pause_log, "a")
                self._pause_file.write(f"== on_train_end at perf_counter {self.train_end:.3f}\n")
                self._pause_file.flush()
                faulthandler.dump_traceback_later(self.pause_every, repeat=True, file=self._pause_file)

        def stop_pause_trace(self):
            """Cancels the pause trace armed at on_train_end (a no-op when none is)."""
            if self._pause_file is not None:
                import faulthandler

                faulthandler.cancel_dump_traceback_later()
                self._pause_file.write(f"== fit returned at perf_counter {time.perf_counter():.3f}\n")
                self._pause_file.close()
                self._pause_file = None

        def on_epoch_begin(self, epoch, logs=None):
            self._t0 = time.perf_counter()
            self._params_begin = int(self.model.count_params())

        def on_train_batch_begin(self, batch, logs=None):
            self._done = bool(self.pruner.done) if self.pruner is not None else False
            self._t = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.steps.append((self._t, time.perf_counter() - self._t, self._model_index(), self._done))

        def on_epoch_end(self, epoch, logs=None):
            self._last_epoch_end = now = time.perf_counter()
            self.rows.append({"epoch": epoch, "seconds": now - self._t0,
                              "params_begin": self._params_begin, "params": int(self.model.count_params())})

        def phases(self, t_start, t_end) -> dict:
            """Seconds per phase of the run between `t_start` and `t_end`
            (`time.perf_counter()` values): the first minibatch of each model
            (tracing its step + one step), the other minibatches of each model
            (with their median), the switch (between the last gated and the
            first pruned minibatch: the last pruning step, surgery, compile,
            optimizer slicing), the rest (fit set-up, pruning steps, epoch
            ends, data iterators)."""
            gated = [s for s in self.steps if s[2] == 0]
            pruned = [s for s in self.steps if s[2] != 0]
            med = lambda v: 1000 * float(np.median([s[1] for s in v[1:]])) if len(v) > 1 else None  # noqa: E731
            out = {"gated_first_step": gated[0][1] if gated else 0.0,
                   "gated_other_steps": float(sum(s[1] for s in gated[1:])),
                   "gated_step_ms_median": med(gated),
                   "gated_steps": len(gated),
                   "pruned_first_step": pruned[0][1] if pruned else 0.0,
                   "pruned_other_steps": float(sum(s[1] for s in pruned[1:])),
                   "pruned_step_ms_median": med(pruned),
                   "pruned_steps": len(pruned)}
            out["switch"] = (pruned[0][0] - (gated[-1][0] + gated[-1][1])) if gated and pruned else 0.0
            inside = sum(s[1] for s in self.steps) + out["switch"]
            out["other"] = (t_end - t_start) - inside
            # where "other" went: before `fit` called on_train_begin (set-up, the callbacks'
            # on_train_begin not included), the epochs' own time outside the steps, and after
            # on_train_end (what follows `fit`'s last callback until `t_end`)
            if self.train_begin is not None and self.train_end is not None:
                out["before_train_begin"] = self.train_begin - t_start
                out["after_train_end"] = t_end - self.train_end
                out["last_epoch_end_to_train_end"] = self.train_end - getattr(self, "_last_epoch_end", self.train_end)
            return out

        def log(self) -> dict:
            """The per-minibatch log for a JSON record: milliseconds and model index."""
            return {"step_ms": [round(1000 * s[1], 3) for s in self.steps], "model": [s[2] for s in self.steps]}

    return StepTimer


def __getattr__(name):
    # `StepTimer` subclasses a Keras callback: built on first use, so that
    # importing this module does not import Keras.
    if name == "StepTimer":
        cls = _step_timer_class()
        globals()["StepTimer"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- flags -----------------------------------------------------------------------

def define_common_flags(flags, output: str, quick_help: str = "Smoke run: the smallest sizes, a few seconds.",
                        seed: int = 0) -> None:
    """The absl flags every benchmark has: `--seed`, `--output` (JSON path,
    default `benchmarks/results/<output>`) and `--quick`."""
    flags.DEFINE_integer("seed", seed, "Seed of weights, orders and inputs.")
    flags.DEFINE_string("output", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", output),
                        "JSON output.")
    flags.DEFINE_bool("quick", False, quick_help)


def write_json(result: dict, path: str) -> None:
    """Writes `result` to `path` (indent 1), atomically: a temporary file
    beside it, then a rename, so an interrupted run leaves the old file whole."""
    import json

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)


def read_json(path: str, default=None):
    """The JSON in `path`, or `default` (called when callable, so that every
    call gets a fresh object) when there is no such file."""
    import json

    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return default() if callable(default) else default


# ---- the PyTorch venv of torch_side.py (torch_pruning_compare.py, transfer_study.py --part=torch)
TORCH_VENV = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv-torch")
TORCH_PY = os.path.join(TORCH_VENV, "bin", "python")


def ensure_torch_venv() -> None:
    """Creates `.venv-torch` with CPU-only torch 2.13.0 + torch-pruning when missing."""
    import subprocess

    if os.path.exists(TORCH_PY):
        return
    print(f"== Creating {TORCH_VENV}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", TORCH_VENV], check=True)
    pip = [TORCH_PY, "-m", "pip", "install", "-q"]
    cpu_index = ["--index-url", "https://download.pytorch.org/whl/cpu", "--timeout", "20", "--retries", "1"]
    if subprocess.run(pip + ["torch==2.13.0"] + cpu_index).returncode != 0:
        # PyPI (and any configured find-links); prefer the CPU build when one is offered.
        if subprocess.run(pip + ["torch==2.13.0+cpu"]).returncode != 0:
            subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + ["torch-pruning", "numpy"], check=True)
    listing = subprocess.run([TORCH_PY, "-m", "pip", "list"], capture_output=True, text=True, check=True).stdout
    if "nvidia" in listing.lower():
        print("WARNING: the torch install pulled CUDA wheels (nvidia-*).", flush=True)


def torch_versions() -> dict:
    import subprocess

    out = subprocess.run(
        [TORCH_PY, "-c", "import torch, numpy; from importlib.metadata import version; "
         "print(torch.__version__, version('torch-pruning'), numpy.__version__)"],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    return {"torch": out[0], "torch_pruning": out[1], "numpy_torch_venv": out[2]}
