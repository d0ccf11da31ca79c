"""`keras-taylor`: report, prune and export Keras models from the command line.

    keras-taylor report MODEL.keras [--json] [--all]
    keras-taylor prune MODEL.keras --data fashion_mnist|DATA.npz --target-flops 0.5 --epochs 4
    keras-taylor export MODEL.keras --format saved_model|tflite|onnx [--output PATH]
                 [--tflite-quantization float16|int8 --data DATA.npz]

Also runs as `python -m keras_taylor.cli` or `python -m keras_taylor`.

Every command takes `--unsafe` to load a `.keras` file holding a `Lambda`
layer with Python code (Keras refuses such files by default: pass it only for
files you trust); `report` and `prune` take `--on-unknown freeze|error` for
layers keras_taylor has no handler for.

This module imports only the standard library at import time: arguments are
parsed (and `--help` answered) before Keras and TensorFlow are imported, and
TensorFlow's start-up log lines are silenced. The `keras-taylor` console
script (`keras_taylor_cli.main`) loads this file without importing the
package first, so `keras-taylor --help` does not import TensorFlow at all.

Exit status: 0 on success; 2 for bad input (usage errors, a missing or
unreadable model file, a model or data set the command cannot work with, an
output that exists without `--force`); 1 when `prune` finished without
reaching its target (the outputs are still written) or an export failed its
check. Errors are one message on stderr, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import warnings
import zipfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PROG = "keras-taylor"
EXIT_USAGE = 2  # bad input, as argparse uses for usage errors
EXIT_TARGET_MISSED = 1


class CLIError(Exception):
    """A user error: printed as one line on stderr, exits with `code`."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def _say(*args) -> None:
    print(*args, flush=True)


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Argument types


def _number(cast, ok, expected: str):
    """An argparse type: `cast(text)`, refused unless `ok(value)`."""

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_fraction = _number(float, lambda v: 0.0 < v < 1.0 and math.isfinite(v), "a number in (0, 1)")
_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_positive_float = _number(float, lambda v: v > 0.0 and math.isfinite(v), "a positive number")


# --------------------------------------------------------------------------
# Model loading and inspection


def _check_model_file(path: str) -> None:
    if not os.path.exists(path):
        raise CLIError(f"model file not found: {path!r}")
    if os.path.isdir(path):
        raise CLIError(
            f"{path!r} is a directory, not a Keras model file; expected a `.keras` "
            "file written by `model.save(...)` (Keras 3 cannot load SavedModel "
            "directories as Keras models)"
        )
    if path.endswith(".keras") and not zipfile.is_zipfile(path):
        raise CLIError(f"{path!r} is not a Keras model file (a `.keras` file is a zip archive)")
    if not path.endswith((".keras", ".h5", ".hdf5")):
        raise CLIError(
            f"{path!r} is not a Keras model file: expected a `.keras` file "
            "(or a legacy `.h5`) written by `model.save(...)`"
        )


def _load_model(path: str, unsafe: bool = False):
    """Loads a model file with keras_taylor's layers registered.

    `unsafe=True` lets Keras deserialize `Lambda` layers holding Python code
    (`safe_mode=False`): only for files the user trusts.
    """
    _check_model_file(path)
    import keras

    import keras_taylor  # noqa: F401  (registers ChannelGate for gated models)

    safe_mode = not unsafe
    try:
        with warnings.catch_warnings():
            # A compiled model saved before training warns that its (unbuilt)
            # optimizer has no variables to load; the CLI never reuses them.
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            model = keras.saving.load_model(path, safe_mode=safe_mode)
    except Exception as first:  # noqa: BLE001  (a bad file raises many types)
        if safe_mode and "safe_mode" in str(first):
            raise CLIError(
                f"{path!r} holds a Lambda layer with Python code, which Keras does not load by "
                "default (it could run arbitrary code). If you trust the file, pass --unsafe"
            ) from first
        try:
            # The training config (optimizer, loss) may be what fails.
            model = keras.saving.load_model(path, compile=False, safe_mode=safe_mode)
        except Exception as e:  # noqa: BLE001
            raise CLIError(f"could not load {path!r} as a Keras model: {_one_line(e)}") from e
        _warn(f"loaded {path!r} without its training config, which failed to load: {_one_line(first)}")
    if not isinstance(model, keras.Model):
        raise CLIError(f"{path!r} holds a {type(model).__name__}, not a keras.Model")
    return model


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split())


def _analyze(model, what: str, on_unknown: str = "freeze"):
    """`kt.analyze(model, on_unknown=...)`, its ValueErrors as CLIErrors."""
    import keras_taylor as kt

    try:
        return kt.analyze(model, on_unknown=on_unknown)
    except ValueError as e:
        hint = " (or pass --on-unknown freeze)" if on_unknown == "error" and "on_unknown='freeze'" in str(e) else ""
        raise CLIError(f"cannot {what} model {model.name!r}: {_one_line(e)}{hint}") from e


def _layer_rows(model, graph, prof) -> list:
    """One dict per layer (first call), in graph order.

    For a gated model, channels whose gate is 0 are left out of
    `output_channels` and `prunable_groups`, as they are of the MACs."""
    import keras_taylor as kt
    from keras_taylor.flops import removed_groups_from_gates

    removed = removed_groups_from_gates(model, graph) if kt.is_gated(model) else set()
    alive = graph.alive_ids(removed)
    counts = prof.by_name()
    rows, seen = [], set()
    for node in graph.nodes:
        if node.name in seen:
            continue
        seen.add(node.name)
        live = node.out_maps[0][alive[node.out_maps[0]]] if node.out_maps else []
        groups = graph.group_of_comp[graph.comp_of[live]] if node.out_maps else []
        cost = counts.get(node.name)
        rows.append(
            {
                "name": node.name,
                "class": type(node.inner).__name__,
                "output_channels": int(len(live)),
                "prunable_groups": int(len(set(int(g) for g in groups if g >= 0))),
                "macs": int(cost.flops) if cost else 0,
                "params": int(cost.params) if cost else 0,
            }
        )
    return rows


def _format_table(head, rows, left=2) -> str:
    cells = [tuple(str(c) for c in r) for r in [head] + rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join(fmt(r).rstrip() for r in cells)


# --------------------------------------------------------------------------
# report


def cmd_report(args) -> int:
    model = _load_model(args.model, args.unsafe)
    import keras_taylor as kt

    graph = _analyze(model, "analyse", args.on_unknown)
    try:
        prof = kt.profile(model)
    except ValueError as e:
        raise CLIError(f"cannot profile model {model.name!r}: {_one_line(e)}") from e
    rows = _layer_rows(model, graph, prof)
    gated = kt.is_gated(model)
    live_groups = None
    if gated:
        from keras_taylor.flops import removed_groups_from_gates

        live_groups = graph.num_groups - len(removed_groups_from_gates(model, graph))
    result = {
        "model": model.name,
        "path": args.model,
        "gated": gated,
        "layers": rows,
        "totals": {
            "flops": prof.flops,  # FLOPs = multiply-accumulates of Conv/Dense layers
            "params": prof.params,
            "prunable_groups": int(graph.num_groups if live_groups is None else live_groups),
            "gate_sites": len(graph.gate_sites),
        },
        "frozen_layers": list(graph.unknown_layers),
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return 0

    shown = rows if args.all else [r for r in rows if r["macs"] or r["params"]]
    table = [
        (r["name"], r["class"], f"{r['output_channels']:,}", f"{r['prunable_groups']:,}", f"{r['macs']:,}", f"{r['params']:,}")
        for r in shown
    ]
    groups_total = graph.num_groups if live_groups is None else live_groups
    table.append(("total", "", "", f"{groups_total:,}", f"{prof.flops:,}", f"{prof.params:,}"))
    _say(f"Model {model.name!r} ({args.model})" + (", gated: channels, groups, MACs and params leave out channels gated off" if gated else ""))
    _say(_format_table(("layer", "class", "out ch", "groups", "MACs", "params"), table))
    _say("")
    _say(f"FLOPs (MACs): {prof.flops:,} ({prof.flops / 1e6:,.2f} M)")
    _say(f"params:       {prof.params:,} ({prof.params / 1e6:,.3f} M)")
    _say(f"prunable channel groups: {groups_total:,} across {len(graph.gate_sites)} gated layers"
         + (f" ({graph.num_groups - groups_total:,} of {graph.num_groups:,} gated off)" if gated else ""))
    if not args.all and len(shown) < len(rows):
        _say(f"({len(rows) - len(shown)} layers without MACs or params not shown; --all lists them)")
    _say("groups: prunable channel groups in the layer's output (channels tied by Add/Multiply count once)")
    if graph.unknown_layers:
        _say(f"layers without a handler (their channels are kept): {', '.join(graph.unknown_layers)}")
    return 0


# --------------------------------------------------------------------------
# prune


def _load_data(spec: str) -> tuple:
    """Returns `(x_train, y_train, x_test, y_test)` as numpy arrays."""
    import numpy as np

    if spec == "fashion_mnist":
        from keras_taylor import datasets

        try:
            (x_train, y_train), (x_test, y_test) = datasets.load_fashion_mnist()
        except (FileNotFoundError, ValueError) as e:
            raise CLIError(f"cannot load Fashion-MNIST: {_one_line(e)}") from e
        return datasets.as_float_images(x_train), y_train, datasets.as_float_images(x_test), y_test
    if not spec.endswith(".npz"):
        raise CLIError(f"--data must be 'fashion_mnist' or a .npz file. Received: {spec!r}")
    if not os.path.isfile(spec):
        raise CLIError(f"data file not found: {spec!r}")
    try:
        with np.load(spec, allow_pickle=False) as f:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f.files]
            if missing:
                raise CLIError(
                    f"{spec!r} lacks array(s) {', '.join(missing)}; expected x_train, "
                    f"y_train, x_test, y_test. Found: {', '.join(f.files) or 'none'}"
                )
            arrays = [np.asarray(f[k]) for k in ("x_train", "y_train", "x_test", "y_test")]
    except CLIError:
        raise
    except Exception as e:  # noqa: BLE001  (zip/pickle/format errors)
        raise CLIError(f"cannot read {spec!r} as a .npz file: {_one_line(e)}") from e
    return tuple(arrays)


def _prepare_split(x, y, input_shape, num_classes, split: str, spec: str) -> tuple:
    """Checks one split against the model; uint8 images are scaled to [0, 1]."""
    import numpy as np

    if x.dtype.kind not in "uif" or (y.dtype.kind not in "ui" and not (y.dtype.kind == "f" and np.all(y == np.round(y)))):
        raise CLIError(
            f"{split} arrays of {spec!r} must be numeric images and integer class labels. "
            f"Received: x dtype {x.dtype}, y dtype {y.dtype}"
        )
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise CLIError(
            f"y_{split} of {spec!r} must hold integer class labels of shape (N,). "
            f"Received: shape {y.shape} (one-hot labels are not supported)"
        )
    if len(x) != len(y) or len(x) == 0:
        raise CLIError(f"x_{split} and y_{split} of {spec!r} must hold the same, non-zero number of examples. Received: {len(x)} and {len(y)}")
    want = tuple(input_shape[1:])
    if x.ndim == len(want) and want and want[-1] == 1:
        x = x[..., None]  # (N, H, W) grayscale images for a (H, W, 1) input
    if x.ndim != len(want) + 1 or any(w is not None and w != s for w, s in zip(want, x.shape[1:])):
        raise CLIError(
            f"x_{split} of {spec!r} has examples of shape {tuple(x.shape[1:])}; the model takes "
            f"{tuple(None if w is None else int(w) for w in want)}"
        )
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise CLIError(
            f"y_{split} of {spec!r} must hold class labels in [0, {num_classes}) for a model with "
            f"{num_classes} outputs. Received: labels in [{int(y.min())}, {int(y.max())}]"
        )
    x = x.astype("float32") / 255.0 if x.dtype == np.uint8 else x.astype("float32")
    return x, y.astype("int32")


def _output_layer(model):
    """The layer that produces the model's (single) output."""
    import keras

    from keras_taylor import _compat

    op = model
    while isinstance(op, keras.Model):
        try:
            outputs = _compat.graph_inputs_outputs(op)[1]
            history = getattr(outputs[0], "_keras_history", None)
            op = history[0] if history else op.layers[-1]
        except (ValueError, IndexError, AttributeError):
            return None
    return op


def _outputs_probabilities(model) -> bool:
    """True when the last layer applies softmax (outputs are probabilities)."""
    import keras

    layer = _output_layer(model)
    if layer is None:
        return False
    if isinstance(layer, keras.layers.Softmax):
        return True
    act = getattr(layer, "activation", None)
    return act is keras.activations.softmax or getattr(act, "__name__", "") == "softmax"


def _compile_for_pruning(gated, original, args, total_steps: int) -> str:
    """Compiles `gated`; returns a description of what it was compiled with."""
    import keras

    loss = getattr(original, "loss", None) if getattr(original, "compiled", False) else None
    opt = getattr(original, "optimizer", None) if loss is not None else None
    if loss is not None and opt is not None:
        config = opt.get_config()
        if args.lr is not None:
            config["learning_rate"] = args.lr
        optimizer = opt.__class__.from_config(config)
        loss_name = getattr(loss, "name", None) or getattr(loss, "__name__", None) or str(loss)
        lr_text = f"learning rate {args.lr:g}" if args.lr is not None else "its learning rate"
        what = f"the model's own compile config: {type(opt).__name__} ({lr_text}), loss {loss_name}"
    else:
        from_logits = not _outputs_probabilities(original)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
        lr = args.lr if args.lr is not None else 0.01
        schedule = keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(1, total_steps), alpha=0.05)
        optimizer = keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True)
        what = (
            f"default: SGD (Nesterov momentum 0.9, learning rate {lr:g} cosine-decayed to {0.05 * lr:g}), "
            f"sparse categorical cross-entropy from {'logits' if from_logits else 'softmax probabilities'}"
        )
    gated.compile(optimizer=optimizer, loss=loss, metrics=[keras.metrics.SparseCategoricalAccuracy(name="acc")])
    return what


def _accuracy(model, x, y, batch_size: int) -> float:
    import numpy as np

    pred = model.predict(x, batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(pred, axis=-1) == y))


def _default_outputs(model_path: str) -> tuple:
    stem = model_path[: -len(".keras")] if model_path.endswith(".keras") else os.path.splitext(model_path)[0]
    return stem + ".pruned.keras", stem + ".pruned.plan.json"


def _check_output_path(path: str, what: str, model_path: str, force: bool = False) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CLIError(f"directory of {what} {path!r} does not exist")
    if os.path.abspath(path) == os.path.abspath(model_path):
        raise CLIError(f"{what} {path!r} would overwrite the input model")
    if os.path.isdir(path):
        raise CLIError(f"{what} {path!r} is a directory")
    if os.path.exists(path) and not force:
        raise CLIError(f"{what} {path!r} exists; pass --force to overwrite it")


def _ratio(value: float, target: float | None = None) -> str:
    """`value` with 3 decimals, or as many more as it takes to tell it apart
    from `target` (0.50028 is not shown as "0.500" next to a target of 0.5)."""
    for digits in range(3, 10):
        text = f"{value:.{digits}f}"
        if target is None or value == target or float(text) != target:
            return text
    return repr(value)


def cmd_prune(args) -> int:
    output, plan_out = _default_outputs(args.model)
    output = args.output or output
    plan_out = args.plan_out or plan_out
    if not output.endswith(".keras"):
        raise CLIError(f"--output must end in .keras. Received: {output!r}")
    _check_output_path(output, "--output", args.model, args.force)
    _check_output_path(plan_out, "--plan-out", args.model, args.force)
    if os.path.abspath(output) == os.path.abspath(plan_out):
        raise CLIError("--output and --plan-out must be different files")

    model = _load_model(args.model, args.unsafe)
    import keras

    import keras_taylor as kt

    if kt.is_gated(model):
        raise CLIError(
            f"{args.model!r} holds a gated model (ChannelGate layers); give the original, "
            "ungated model, or finish it in Python with keras_taylor.prune(model)"
        )
    graph = _analyze(model, "prune", args.on_unknown)
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise CLIError(
            f"prune needs a classifier with one input and one output. Received: model "
            f"{model.name!r} with {len(model.inputs)} inputs and {len(model.outputs)} outputs"
        )
    if graph.num_groups == 0:
        raise CLIError(f"model {model.name!r} has no prunable channels")
    input_shape = tuple(model.inputs[0].shape)
    output_shape = tuple(model.outputs[0].shape)
    if len(output_shape) != 2 or output_shape[-1] is None or output_shape[-1] < 2:
        raise CLIError(
            f"prune needs a classifier whose output is (batch, classes). Received: output "
            f"shape {output_shape} of model {model.name!r}"
        )
    num_classes = int(output_shape[-1])

    x_train, y_train, x_test, y_test = _load_data(args.data)
    x_train, y_train = _prepare_split(x_train, y_train, input_shape, num_classes, "train", args.data)
    x_test, y_test = _prepare_split(x_test, y_test, input_shape, num_classes, "test", args.data)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    if total_steps < args.prune_every:
        raise CLIError(
            f"{len(x_train)} training examples in batches of {args.batch_size} for {args.epochs} "
            f"epoch(s) make {total_steps} minibatches, fewer than --prune-every {args.prune_every}: "
            "no pruning step would run. Lower --prune-every or raise --epochs"
        )

    keras.utils.set_random_seed(args.seed)
    verbose = 1 if sys.stdout.isatty() else 2
    before = kt.profile(model)
    _say(f"Model {model.name!r}: {before.flops:,} FLOPs (MACs), {before.params:,} params, {graph.num_groups:,} prunable channel groups")
    _say(f"Data {args.data}: {len(x_train):,} train / {len(x_test):,} test examples")
    acc_before = _accuracy(model, x_test, y_test, args.batch_size)
    _say(f"Test accuracy before pruning: {acc_before:.4f}")

    try:
        gated = kt.add_gates(model, on_unknown=args.on_unknown)
    except ValueError as e:
        raise CLIError(f"cannot add gates to model {model.name!r}: {_one_line(e)}") from e
    compiled_with = _compile_for_pruning(gated, model, args, total_steps)
    table = None
    if args.target_latency is not None:
        _say(f"Measuring a latency table on {args.runtime} (cached after the first time)")
        table = kt.LatencyTable.measure(model, runtime=args.runtime, verbose=verbose)
    pruner = kt.TaylorPruning(
        target=args.target_flops if table is None else args.target_latency,
        metric="flops" if table is None else "latency",
        latency=table,
        prune_every=args.prune_every,
        channels_per_step=args.channels_per_step,
    )
    _say(f"Compiled with {compiled_with}")
    _say(
        f"Pruning to {pruner.target:.0%} of the {'FLOPs' if table is None else 'predicted ' + args.runtime + ' latency'}: "
        f"{args.channels_per_step or 'the default number of'} channel group(s) every "
        f"{args.prune_every} minibatches, then fine-tuning; {args.epochs} epoch(s) of {steps_per_epoch} minibatches"
    )
    try:
        with warnings.catch_warnings():
            # A run that ends above the target is reported below, with the
            # exit status; the library's warnings would say it twice.
            warnings.filterwarnings("ignore", message=r"(TaylorPruning|keras_taylor\.prune): .*above the target")
            gated.fit(
                x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
                shuffle=True, callbacks=[pruner], verbose=verbose,
            )
            pruned = kt.prune(gated, on_unknown=args.on_unknown)
    except ValueError as e:
        raise CLIError(f"training failed: {_one_line(e)}") from e
    if args.channels_per_step is None:
        _say(f"Removed up to {pruner.state()['channels_per_step']} channel group(s) per pruning step "
             "(sized to reach the target by about half of the training)")
    after = kt.profile(pruned)
    acc_after = _accuracy(pruned, x_test, y_test, args.batch_size)
    pruned.save(output)
    pruner.plan.save(plan_out)

    rows = [
        ("test accuracy", f"{acc_before:.4f}", f"{acc_after:.4f}", f"{(acc_after - acc_before) * 100:+.2f} pts"),
        ("FLOPs (MACs)", f"{before.flops:,}", f"{after.flops:,}", f"{_ratio(after.flops / before.flops, args.target_flops)}x"),
        ("params", f"{before.params:,}", f"{after.params:,}", f"{_ratio(after.params / before.params)}x"),
    ]
    if table is not None:
        lat0, lat1 = table.predict(model), table.predict(pruned)
        rows.append((f"latency ms ({args.runtime}, predicted)", f"{lat0:.3f}", f"{lat1:.3f}", f"{lat1 / lat0:.3f}x"))
    _say("")
    _say(_format_table(("", "original", "pruned", "pruned/original"), rows, left=1))
    _say(f"\nPruned model: {output}\nPruning plan: {plan_out} ({pruner.plan.num_removed} channels removed)")
    if table is not None:
        if table.predict(pruned) > args.target_latency * table.predict(model) * (1 + 1e-6):
            print(f"{PROG}: error: pruning stopped above the latency target {args.target_latency:g}.", file=sys.stderr, flush=True)
            return EXIT_TARGET_MISSED
        return 0
    reached = after.flops <= args.target_flops * before.flops * (1 + 1e-9)
    if not reached:
        print(
            f"{PROG}: error: pruning stopped at {_ratio(after.flops / before.flops, args.target_flops)} of the FLOPs, above the "
            f"target {args.target_flops:g} (the outputs above were still written). Raise --epochs or "
            "--channels-per-step, or lower --prune-every.",
            file=sys.stderr, flush=True,
        )
        return EXIT_TARGET_MISSED
    return 0


# --------------------------------------------------------------------------
# export

_EXPORTERS = {"saved_model": "export_saved_model", "tflite": "export_tflite", "onnx": "export_onnx"}


def cmd_latency_table(args) -> int:
    model = _load_model(args.model)
    import keras_taylor as kt

    _analyze(model, "measure")
    try:
        table = kt.LatencyTable.measure(model, runtime=args.runtime, batch_size=args.batch_size,
                                        verbose=1 if sys.stdout.isatty() else 0)
    except (ValueError, ImportError) as e:
        raise CLIError(f"cannot measure model {model.name!r}: {_one_line(e)}") from e
    _say(kt.profile(model, latency=table).table())
    _say(f"\nMeasured {table.full_ms:.3f} ms on {args.runtime} (batch {args.batch_size}, {table.device})")
    if args.output:
        table.save(args.output)
        _say(f"Table: {args.output}")
    return 0


def cmd_export(args) -> int:
    fmt = args.format
    if args.output:
        output = args.output
    else:
        stem = args.model[: -len(".keras")] if args.model.endswith(".keras") else os.path.splitext(args.model)[0]
        output = stem + {"saved_model": "_saved_model", "tflite": ".tflite", "onnx": ".onnx"}[fmt]
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise CLIError(f"directory of --output {output!r} does not exist")
    if os.path.exists(output) and not args.force:
        if fmt != "saved_model" or not os.path.isdir(output) or os.listdir(output):
            raise CLIError(f"{output!r} exists; pass --force to overwrite it")

    quantize = args.tflite_quantization
    if quantize is not None and fmt != "tflite":
        raise CLIError(f"--tflite-quantization applies to --format tflite only. Received: --format {fmt}")
    if quantize == "int8" and not args.data:
        raise CLIError(
            "--tflite-quantization int8 calibrates activations on representative inputs: pass "
            "--data fashion_mnist or --data DATA.npz (its first training images are used)"
        )
    if args.data and quantize != "int8":
        raise CLIError("--data is used by export only with --tflite-quantization int8")

    from keras_taylor import export as export_lib

    exporter = getattr(export_lib, _EXPORTERS[fmt], None)
    if exporter is None:
        raise CLIError(
            f"--format {fmt} is not available: this keras_taylor has no "
            f"keras_taylor.export.{_EXPORTERS[fmt]} (supported here: "
            + ", ".join(f for f, fn in _EXPORTERS.items() if hasattr(export_lib, fn))
            + ")"
        )
    model = _load_model(args.model, args.unsafe)
    import keras_taylor as kt

    if kt.is_gated(model):
        raise CLIError(
            f"{args.model!r} holds a gated model (ChannelGate layers), which is not exported: "
            "run keras_taylor.prune(model) (or keras-taylor prune) first and export the pruned model"
        )
    check = _check_batch(model)
    if fmt == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        check = None  # the check runs the file with onnxruntime
    kwargs = {}
    if quantize is not None:
        kwargs["quantize"] = quantize
    if quantize == "int8":
        if len(model.inputs) != 1:
            raise CLIError(f"--data calibrates a single-input model. Received: model {model.name!r} with {len(model.inputs)} inputs")
        kwargs["representative_data"] = _calibration_images(args, tuple(model.inputs[0].shape))
    try:
        info = exporter(model, output, check_inputs=check, **kwargs)
    except (ValueError, ImportError) as e:
        raise CLIError(f"cannot export model {model.name!r} as {fmt}: {_one_line(e)}") from e
    except RuntimeError as e:  # conversion failed, or the exported file disagrees with Keras
        raise CLIError(f"export of model {model.name!r} as {fmt} failed: {_one_line(e)}", code=1) from e
    _say(f"Exported {model.name!r} as {fmt} to {output}")
    if isinstance(info, dict):
        for key in ("signature_inputs", "signature_outputs", "inputs", "outputs"):
            if isinstance(info.get(key), dict):
                _say(f"  {key.replace('_', ' ')}: " + ", ".join(
                    f"{k} {tuple(v.get('shape', ()))} {v.get('dtype', '')}" for k, v in info[key].items()))
        if info.get("size_bytes") is not None:
            _say(f"  size: {info['size_bytes']:,} bytes")
        if info.get("max_abs_diff") is not None:
            _say(f"  check on a random batch, reloaded file vs Keras: max |diff| = {info['max_abs_diff']:.2e}")
    return 0


def _calibration_images(args, input_shape):
    """The first `--calibration-samples` training images of `--data`, shaped
    and scaled as `prune` feeds them."""
    import numpy as np

    x_train, y_train = _load_data(args.data)[:2]
    n = min(len(x_train), args.calibration_samples)
    labels = np.zeros(n, "int32")  # labels play no part in calibration
    x, _ = _prepare_split(x_train[:n], labels, input_shape, 1, "train", args.data)
    return x


def _check_batch(model):
    """A random batch of 2 for a single-input model of static shape, else None."""
    import numpy as np

    if len(model.inputs) != 1:
        return None
    shape = tuple(model.inputs[0].shape[1:])
    if any(d is None for d in shape) or "float" not in str(model.inputs[0].dtype):
        return None
    return np.random.default_rng(0).uniform(-1, 1, (2, *shape)).astype("float32")


# --------------------------------------------------------------------------
# main


def _common_flags(p, on_unknown) -> None:
    p.add_argument("--unsafe", action="store_true",
                   help="load Lambda layers holding Python code (Keras's safe_mode=False); only for files you trust")
    if on_unknown is not None:
        p.add_argument("--on-unknown", choices=("error", "freeze"), default=on_unknown,
                       help="a layer without a handler on a prunable path: 'error' stops, 'freeze' keeps "
                            f"the channels that flow into it (default: {on_unknown})")


def _import_quietly() -> None:
    """Imports keras_taylor (and with it Keras and TensorFlow) with the C++
    start-up log lines that TensorFlow writes to stderr silenced."""
    if "keras_taylor.gates" in sys.modules:
        return
    try:
        saved = os.dup(2)
    except OSError:
        saved = None
    if saved is not None:
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    try:
        import keras_taylor  # noqa: F401
    finally:
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Taylor-expansion channel pruning for Keras 3 CNNs (keras_taylor).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("report", help="per-layer FLOPs (MACs), params and prunable channel groups")
    p.add_argument("model", metavar="MODEL.keras", help="a Keras model file")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--all", action="store_true", help="list every layer, not only those with MACs or params")
    _common_flags(p, on_unknown="freeze")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "prune",
        help="prune a classifier with TaylorPruning during training, then remove the pruned filters",
        description=(
            "Gates the model, trains it with keras_taylor.TaylorPruning until its FLOPs are at most "
            "--target-flops of the original, fine-tunes for the rest of --epochs, removes the pruned "
            "filters and saves the pruned model (stock Keras layers, saved uncompiled) and the plan. "
            "A compiled model is trained with its own optimizer (a fresh one) and loss; an uncompiled "
            "one with SGD and sparse categorical cross-entropy (from logits unless the last layer "
            "applies softmax). Labels must be integer class ids."
        ),
    )
    p.add_argument("model", metavar="MODEL.keras", help="a Keras model file (a classifier)")
    p.add_argument("--data", required=True, metavar="fashion_mnist|DATA.npz",
                   help="'fashion_mnist', or a .npz with x_train, y_train, x_test, y_test (uint8 images are scaled to [0, 1])")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-flops", type=_fraction, metavar="FRACTION",
                        help="prune until FLOPs are at most this fraction of the original, in (0, 1)")
    target.add_argument("--target-latency", type=_fraction, metavar="FRACTION",
                        help="prune until the latency predicted by a measured table (--runtime) is at most this "
                        "fraction of the original (HALP knapsack; docs/latency.md)")
    p.add_argument("--runtime", choices=("tf", "tflite", "onnxruntime"), default="tflite",
                   help="runtime the latency table is measured on, with --target-latency (default: tflite)")
    p.add_argument("--epochs", required=True, type=_positive_int, help="epochs of pruning + fine-tuning in all")
    p.add_argument("--batch-size", type=_positive_int, default=128, help="default: 128")
    p.add_argument("--prune-every", type=_positive_int, default=30, metavar="K", help="minibatches between pruning steps (default: 30)")
    p.add_argument("--channels-per-step", type=_positive_int, default=None, metavar="N",
                   help="channel groups removed per pruning step (default: TaylorPruning's, scaled to the model)")
    p.add_argument("--lr", type=_positive_float, default=None,
                   help="learning rate (default: 0.01, cosine-decayed, for an uncompiled model; the model's own otherwise)")
    p.add_argument("--output", default=None, metavar="OUT.keras", help="default: MODEL.pruned.keras")
    p.add_argument("--plan-out", default=None, metavar="PLAN.json", help="default: MODEL.pruned.plan.json")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--force", action="store_true", help="overwrite existing --output / --plan-out files")
    _common_flags(p, on_unknown="error")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("latency-table", help="measure a per-layer latency table (docs/latency.md)")
    p.add_argument("model", metavar="MODEL.keras", help="a Keras model file")
    p.add_argument("--runtime", choices=("tf", "tflite", "onnxruntime"), default="tflite", help="default: tflite")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="default: 1")
    p.add_argument("--output", default=None, metavar="TABLE.json", help="also write the table here")
    p.set_defaults(func=cmd_latency_table)

    p = sub.add_parser("export", help="export a (pruned) model for serving")
    p.add_argument("model", metavar="MODEL.keras", help="a Keras model file without gates")
    p.add_argument("--format", required=True, choices=sorted(_EXPORTERS), help="saved_model (TF Serving), tflite or onnx")
    p.add_argument("--output", default=None, metavar="PATH",
                   help="default: MODEL_saved_model/, MODEL.tflite or MODEL.onnx")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--tflite-quantization", choices=("float16", "int8"), default=None,
                   help="with --format tflite: float16 weights, or full-integer int8 (needs --data)")
    p.add_argument("--data", default=None, metavar="fashion_mnist|DATA.npz",
                   help="calibration images for --tflite-quantization int8 (x_train of the .npz)")
    p.add_argument("--calibration-samples", type=_positive_int, default=200, metavar="N",
                   help="training images used to calibrate int8 (default: 200)")
    _common_flags(p, on_unknown=None)
    p.set_defaults(func=cmd_export)
    return parser


def main(argv=None) -> int:
    """Runs the CLI on `argv` (default `sys.argv[1:]`); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors (2) and --help (0)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        _import_quietly()
        return args.func(args)
    except CLIError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return e.code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
        return 130
    except BrokenPipeError:
        # Output piped into a reader that quit early (`| head`).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
