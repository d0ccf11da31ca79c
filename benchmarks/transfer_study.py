"""Transfer-learning pruning study (the ICLR'17 setting) on Fashion-MNIST.

Source task: Fashion-MNIST classes 0-4 (T-shirt, trouser, pullover, dress,
coat), all their training images; a ResNet from `keras_taylor.models` is
trained on it once and cached. Target task: classes 5-9 (sandal, shirt,
sneaker, bag, ankle boot) with only `--per_class` training images per class
(a seeded subset), tested on all their test images. Every seed transfers the
source network to the target (new 5-way head, whole network fine-tuned, cached
per seed), then every (criterion, FLOPs target) cell prunes a copy of that
transferred network while fine-tuning (`keras_taylor.fit_prune`: the epochs
after the target is reached train the physically pruned model) and reports
top-1 on the target test set. Why this split can falsify the claim:
docs/evidence.md.

    python benchmarks/transfer_study.py                 # the full study (hours on 2 CPU cores)
    python benchmarks/transfer_study.py --seeds 0,1 --targets 0.5,0.3 --criteria taylor_fo_bn,weight_l2,random
    python benchmarks/transfer_study.py --smoke         # seconds: tiny sizes, checks the pipeline
    python benchmarks/transfer_study.py --report_only   # summary + plot from the JSON
    python benchmarks/transfer_study.py --part=torch --targets 0.5,0.3 --normalization mean_group
        # Torch-Pruning (GroupTaylorImportance, global) on the same transferred networks, in `.venv-torch`
        # (created when missing); each run is preceded by keras_taylor's run of the same cell
        # (taylor_fo_bn, --normalization) so both wall times see the same load; its step-time log
        # (`phases`: first step of each model = tracing, other steps, the switch) goes with it
    python benchmarks/transfer_study.py --match_torch --targets 0.5,0.3 --criteria taylor_fo_fg --normalization mean_group
        # keras_taylor at the FLOPs fraction Torch-Pruning reached per seed (it overshoots its target):
        # `torch_comparison[target]["equal_flops"]`, paired margins by seed

Resumable: every finished cell is written to `--results` at once, and a cell
already there (same key and same configuration) is skipped.
Summary per (criterion, target): mean and standard deviation over seeds, and
the paired margin against Taylor-FO-BN (same seed, same transferred network)
with a Student-t 95% confidence interval (scipy). `variants` in the JSON:
every (criterion, normalisation) run on the same dense starts against
Taylor-FO-BN (raw), random and weight L2; `torch_comparison`: every variant
against Torch-Pruning, paired by seed, with the wall times.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402
import keras_taylor as kt  # noqa: E402
from keras_taylor import criteria as criteria_lib  # noqa: E402
from keras_taylor import datasets, models  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("output_dir", "runs/transfer", "Cached source and transferred models.")
flags.DEFINE_string("results", "benchmarks/results/transfer_study.json", "Results JSON (resumable).")
flags.DEFINE_string("plot", "docs/img/transfer_study.png", "Accuracy-vs-FLOPs plot.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds: target subset, head init, data order, random criterion.")
flags.DEFINE_list("targets", ["0.7", "0.5", "0.3", "0.2"], "FLOPs targets (fraction of the unpruned model).")
flags.DEFINE_list(
    "criteria", ["taylor_fo_bn", "taylor_fo_fg", "iclr17_taylor", "bn_scale", "weight_l2", "random"], "Criteria."
)
flags.DEFINE_string("normalization", None, "TaylorPruning(normalization=): none, l2_layer, mean_group; default: each criterion's own.")
flags.DEFINE_list("widths", ["32", "64", "128"], "ResNet stage widths (a wider net than the task needs).")
flags.DEFINE_integer("blocks", 1, "Residual blocks per stage.")
flags.DEFINE_integer("source_epochs", 6, "Source training epochs.")
flags.DEFINE_integer("source_images", 0, "Source training images (0: all of classes 0-4).")
flags.DEFINE_integer("per_class", 300, "Target training images per class.")
flags.DEFINE_integer("test_images", 0, "Target test images (0: all of classes 5-9).")
flags.DEFINE_integer("transfer_epochs", 10, "Dense fine-tuning epochs on the target before pruning.")
flags.DEFINE_integer("prune_epochs", 6, "Epochs in which pruning reaches the target.")
flags.DEFINE_integer("finetune_epochs", 10, "Epochs after the pruning epochs (on the pruned model).")
flags.DEFINE_integer("prune_every", 5, "Minibatches between pruning steps.")
flags.DEFINE_integer("batch_size", 32, "Batch size on the target task.")
flags.DEFINE_float("lr", 0.01, "SGD learning rate (momentum 0.9) on the target task.")
flags.DEFINE_enum("part", "prune", ["prune", "oracle", "both", "torch"],
                  "prune: the accuracy cells; oracle: criteria vs both oracles on the transferred network; "
                  "torch: Torch-Pruning (GroupTaylor) pruning the same transferred network (benchmarks/torch_side.py).")
flags.DEFINE_float("torch_pruning_ratio", 0.9, "Torch part: BasePruner pruning_ratio (a ceiling; it stops at the FLOPs target).")
flags.DEFINE_integer("torch_threads", 2, "Torch part: torch.set_num_threads.")
flags.DEFINE_integer("oracle_batches", 10, "Oracle part: target training minibatches scored (criteria and the NVlabs oracle).")
flags.DEFINE_enum("switch", "step", ["step", "epoch"], "fit_prune(switch=): when training moves to the pruned model.")
flags.DEFINE_bool("match_torch", False, "Prune part: run the cells at the FLOPs fraction Torch-Pruning reached (per seed and "
                  "target of the `torch` results) instead of at --targets: keras_taylor and Torch-Pruning at equal FLOPs.")
flags.DEFINE_bool("smoke", False, "Tiny sizes: checks the pipeline in seconds.")
flags.DEFINE_bool("report_only", False, "Only summarise and plot the results JSON.")

SOURCE, TARGET = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
REFERENCE = "taylor_fo_bn"


def config() -> dict:
    """Everything a cell's result depends on, besides criterion, target and seed."""
    keys = ("widths", "blocks", "source_epochs", "source_images", "per_class", "test_images", "transfer_epochs",
            "prune_epochs", "finetune_epochs", "prune_every", "batch_size", "lr", "normalization")
    return {k: FLAGS[k].value for k in keys}


def base_config() -> dict:
    """`config()` without the normalisation: what the dense start and the Torch-Pruning runs depend on."""
    return {k: v for k, v in config().items() if k != "normalization"}


def apply_smoke() -> None:
    if FLAGS.smoke:
        for k, v in dict(widths=["4", "8"], blocks=1, source_epochs=1, source_images=600, per_class=12, test_images=100,
                         transfer_epochs=1, prune_epochs=1, finetune_epochs=1, prune_every=2, batch_size=16, oracle_batches=2,
                         seeds=["0", "1"], targets=["0.5"], criteria=["taylor_fo_bn", "random"]).items():
            if not FLAGS[k].present:
                FLAGS[k].value = v


def compile_model(model, lr):
    model.compile(optimizer=keras.optimizers.SGD(lr, momentum=0.9), loss=LOSS,
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="acc")])
    return model


# ---- data --------------------------------------------------------------------------------
def load_data(seed: int):
    """Source train (classes 0-4), target train (`per_class` per class of 5-9,
    chosen by `seed`) and target test (all of 5-9); labels remapped to 0..4."""
    (x_train, y_train), (x_test, y_test) = datasets.load_fashion_mnist()
    x_train, x_test = datasets.as_float_images(x_train), datasets.as_float_images(x_test)
    src = np.flatnonzero(np.isin(y_train, SOURCE))
    if FLAGS.source_images:
        src = np.random.default_rng(1234).permutation(src)[: FLAGS.source_images]
    rng = np.random.default_rng(seed)
    tgt = np.concatenate([rng.permutation(np.flatnonzero(y_train == c))[: FLAGS.per_class] for c in TARGET])
    test = np.flatnonzero(np.isin(y_test, TARGET))
    if FLAGS.test_images:
        test = np.random.default_rng(4321).permutation(test)[: FLAGS.test_images]
    remap = lambda y: (y - TARGET[0]).astype("int32")  # noqa: E731
    return ((x_train[src], y_train[src].astype("int32")), (x_train[tgt], remap(y_train[tgt])),
            (x_test[test], remap(y_test[test])))


def _tag() -> str:
    return f"w{'-'.join(FLAGS.widths)}_b{FLAGS.blocks}"


def source_model(source):
    """The ResNet trained on classes 0-4, trained once and cached."""
    path = os.path.join(FLAGS.output_dir, f"source_{_tag()}_e{FLAGS.source_epochs}_n{len(source[0])}.keras")
    if os.path.exists(path):
        return keras.saving.load_model(path)
    keras.utils.set_random_seed(0)
    model = models.resnet(input_shape=(28, 28, 1), num_classes=len(SOURCE), widths=[int(w) for w in FLAGS.widths],
                          blocks_per_stage=FLAGS.blocks, name="source")
    steps = int(np.ceil(len(source[0]) / 128)) * FLAGS.source_epochs
    compile_model(model, keras.optimizers.schedules.CosineDecay(0.1, decay_steps=steps, alpha=0.01))
    t0 = time.time()
    model.fit(*source, batch_size=128, epochs=FLAGS.source_epochs, verbose=2)
    print(f"== source model: {time.time() - t0:.0f} s", flush=True)
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    model.save(path)
    return model


def transferred_model(source, train, test, seed):
    """The source network with a new 5-way head, fine-tuned on the target subset (cached per seed)."""
    path = os.path.join(FLAGS.output_dir, f"transfer_{_tag()}_s{seed}_pc{FLAGS.per_class}_e{FLAGS.transfer_epochs}.keras")
    if os.path.exists(path):
        model = keras.saving.load_model(path)
        return compile_model(model, FLAGS.lr)
    keras.utils.set_random_seed(seed)
    base = source_model(source)
    features = base.get_layer("pool").output
    head = keras.layers.Dense(len(TARGET), name="target_logits")(features)
    model = compile_model(keras.Model(base.input, head, name="transfer"), FLAGS.lr)
    model.fit(*train, batch_size=FLAGS.batch_size, epochs=FLAGS.transfer_epochs, verbose=0)
    model.save(path)
    return model


def top1(model, test) -> float:
    return float(model.evaluate(*test, batch_size=500, verbose=0, return_dict=True)["acc"])


# ---- one cell -----------------------------------------------------------------------------------
StepTimer = _harness.StepTimer  # the step-time log behind `phases` (shared with torch_pruning_compare.py)


def groups_per_step(num_groups: int, num_train: int) -> int:
    """Enough groups per pruning step that removing every group would fit in
    the pruning epochs: the target is reached within them (both libraries)."""
    steps = int(np.ceil(num_train / FLAGS.batch_size))
    events = max(1, (FLAGS.prune_epochs * steps) // FLAGS.prune_every)
    return max(1, int(np.ceil(num_groups / events)))


def run_cell(dense, train, test, criterion: str, target: float, seed: int) -> dict:
    keras.utils.set_random_seed(seed)
    copy = keras.models.clone_model(dense)
    copy.set_weights(dense.get_weights())
    gated = compile_model(kt.add_gates(copy), FLAGS.lr)
    graph = kt.analyze(gated)
    per_step = groups_per_step(graph.num_groups, len(train[0]))
    crit = criteria_lib.Random(seed=seed) if criterion == "random" else criterion
    pruning = kt.TaylorPruning(target=target, prune_every=FLAGS.prune_every, channels_per_step=per_step,
                               criterion=crit, normalization=FLAGS.normalization)
    timer = StepTimer()
    t0 = time.perf_counter()
    small, history = kt.fit_prune(gated, *train, batch_size=FLAGS.batch_size, pruning=pruning, callbacks=[timer],
                                  epochs=FLAGS.prune_epochs + FLAGS.finetune_epochs, verbose=0, switch=FLAGS.switch)
    t1 = time.perf_counter()
    last = pruning.history[-1] if pruning.history else {}
    return {
        "criterion": criterion, "target": target, "seed": seed, "top1": top1(small, test),
        "flops_fraction": last.get("flops_fraction", 1.0), "params_fraction": last.get("params_fraction", 1.0),
        "groups": graph.num_groups, "channels_per_step": per_step, "reached": bool(pruning.done),
        "final_loss": float(history.history["loss"][-1]), "wall_seconds": t1 - t0, "epochs": timer.rows,
        "switch": FLAGS.switch, "switched_at": list(getattr(history, "switched_at", None) or []),
        "phases": timer.phases(t0, t1), "config": config(),
    }


# ---- Torch-Pruning part ------------------------------------------------------------------------
def torch_cell(dense, train, test, target: float, seed: int) -> dict:
    """Torch-Pruning's GroupTaylorImportance + BasePruner(global_pruning=True)
    on the same transferred network (weights copied, logits checked), the same
    target images, batch size, optimizer (SGD, momentum 0.9, constant `--lr`),
    epochs, pruning interval and groups per step as `run_cell`; the training
    order is its own seeded permutation per epoch."""
    import subprocess

    _harness.ensure_torch_venv()
    copy = keras.models.clone_model(dense)
    copy.set_weights(dense.get_weights())
    t0 = time.time()
    graph = kt.analyze(kt.add_gates(copy))
    gates_s = time.time() - t0
    per_step = groups_per_step(graph.num_groups, len(train[0]))
    epochs = FLAGS.prune_epochs + FLAGS.finetune_epochs
    rng = np.random.default_rng([seed, 2])
    as_uint8 = lambda x: np.round(x[..., 0] * 255.0).astype("uint8")  # noqa: E731  (exactly the float images: x/255)
    arrays = {"x_train": as_uint8(train[0]), "y_train": train[1], "x_test": as_uint8(test[0]), "y_test": test[1],
              "perms": np.stack([rng.permutation(len(train[0])) for _ in range(epochs)]).astype("int32"),
              "check_logits": np.asarray(dense(test[0][:8], training=False), dtype="float32")}
    for layer in dense.layers:
        for i, w in enumerate(layer.get_weights()):
            arrays[f"w/{layer.name}/{i}"] = w
    work = os.path.join(FLAGS.output_dir, "torch")
    os.makedirs(work, exist_ok=True)
    npz, out = os.path.join(work, f"s{seed}_t{target}.npz"), os.path.join(work, f"s{seed}_t{target}.json")
    np.savez(npz, **arrays)
    cmd = [_harness.TORCH_PY, os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_side.py"),
           "--data", npz, "--output", out, "--epochs", "0", "--prune_epochs", str(epochs),
           "--prune_every", str(FLAGS.prune_every), "--channels_per_step", str(per_step),
           "--pruning_ratio", str(FLAGS.torch_pruning_ratio), "--target", str(target), "--batch_size", str(FLAGS.batch_size),
           "--blocks", str(FLAGS.blocks), "--widths", ",".join(FLAGS.widths), "--num_classes", str(len(TARGET)),
           "--head_name", "target_logits", "--prune_lr", str(FLAGS.lr), "--no_nesterov",
           "--threads", str(FLAGS.torch_threads), "--seed", str(seed)]
    # keras_taylor's run of the same cell (criterion taylor_fo_bn, `--normalization`) right before
    # Torch-Pruning's, so that both wall times see the same machine load.
    mine = run_cell(dense, train, test, REFERENCE, target, seed)
    # Spinning OpenMP threads stall on a shared CPU (see torch_pruning_compare.py).
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    subprocess.run(cmd, check=True, env=env)
    with open(out) as f:
        res = json.load(f)
    res.update(target=target, seed=seed, keras_groups=graph.num_groups, channels_per_step=per_step,
               keras_add_gates_seconds=gates_s, config=base_config(),
               keras_same_load={k: mine[k] for k in ("criterion", "top1", "flops_fraction", "params_fraction",
                                                     "wall_seconds", "epochs", "config", "switch", "switched_at", "phases")})
    return res


def variant_cells(results: dict) -> dict:
    """{(criterion/normalisation, target): {seed: cell}} over the cells of this
    base configuration ('own': each criterion's default normalisation)."""
    base, out = base_config(), {}
    for c in results["cells"].values():
        if "torch_target" in c:  # run at Torch-Pruning's FLOPs: compare_torch's equal-FLOPs section
            continue
        if {k: v for k, v in c["config"].items() if k != "normalization"} == base:
            name = f"{c['criterion']}/{c['config']['normalization'] or 'own'}"
            out.setdefault((name, c["target"]), {})[c["seed"]] = c
    return out


BASELINES = ("taylor_fo_bn/own", "random/own", "weight_l2/own")


def compare_variants(results: dict) -> dict:
    """Every (criterion, normalisation) per target against the baselines in
    `BASELINES`: paired margins (same seed, same dense start), 95% t-interval."""
    cells = variant_cells(results)
    out = {}
    for (name, target), mine in sorted(cells.items()):
        acc = np.array([c["top1"] for c in mine.values()])
        entry = {"n": len(acc), "top1_mean": float(acc.mean()), "top1_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                 "flops_mean": float(np.mean([c["flops_fraction"] for c in mine.values()])),
                 "params_mean": float(np.mean([c["params_fraction"] for c in mine.values()]))}
        for ref in BASELINES:
            other = cells.get((ref, target), {})
            seeds = sorted(set(mine) & set(other))
            if ref != name and len(seeds) > 1:
                mean, ci = t_interval([mine[s]["top1"] - other[s]["top1"] for s in seeds])
                entry[f"vs {ref}"] = {"seeds": seeds, "mean": mean, "ci95": ci, "excludes_zero": bool(ci[0] > 0 or ci[1] < 0)}
        out[f"{name}|{target}"] = entry
    return out


def compare_torch(results: dict) -> dict:
    """Per target: Torch-Pruning's top-1 over seeds, and every keras_taylor
    (criterion, normalisation) measured on the same dense starts: mean, and the
    paired margin keras_taylor - Torch-Pruning (same seed) with a 95% t-interval;
    the prune-and-fine-tune wall times side by side."""
    base = base_config()
    torch_rows = sorted((r for r in results.get("torch", {}).values() if r["config"] == base), key=lambda r: r["date"])
    out = {}
    for target in sorted({r["target"] for r in torch_rows}):
        tr = {r["seed"]: r for r in torch_rows if r["target"] == target}  # the latest run per seed
        acc = np.array([r["top1_after"] for r in tr.values()])
        entry = {"torch": {"n": len(acc), "top1_mean": float(acc.mean()),
                           "top1_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                           "flops_mean": float(np.mean([r["flops_fraction"] for r in tr.values()])),
                           "params_mean": float(np.mean([r["params_fraction"] for r in tr.values()])),
                           "prune_and_finetune_seconds": [r["prune_and_finetune_seconds"] for r in tr.values()],
                           "keras_same_load_seconds": [r["keras_same_load"]["wall_seconds"] for r in tr.values()],
                           "keras_same_load_normalization": sorted({str(r["keras_same_load"]["config"]["normalization"])
                                                                    for r in tr.values()})},
                 "keras": {}, "wall_by_switch": {}, "equal_flops": {}}
        # Whole prune-and-fine-tune wall times, keras_taylor's run right before Torch-Pruning's, per fit_prune switch.
        for r in (r for r in torch_rows if r["target"] == target):
            mine = r["keras_same_load"]
            w = entry["wall_by_switch"].setdefault(mine.get("switch", "epoch"), {
                "seeds": [], "keras_seconds": [], "torch_seconds": [], "ratio": [], "top1_torch": [], "keras_phases": [],
                "torch_step_ms_median": [], "torch_epochs_seconds": [], "load_average": []})
            w["seeds"].append(r["seed"])
            w["keras_seconds"].append(mine["wall_seconds"])
            w["torch_seconds"].append(r["prune_and_finetune_seconds"])
            w["ratio"].append(mine["wall_seconds"] / r["prune_and_finetune_seconds"])
            w["top1_torch"].append(r["top1_after"])
            w["keras_phases"].append(mine.get("phases"))
            w["torch_step_ms_median"].append([r["step_ms_median_while_scoring"], r["step_ms_median_after_pruning"]])
            w["torch_epochs_seconds"].append([e["seconds"] for e in r["epochs"]])
            w["load_average"].append(r["load_average"])
        # keras_taylor run at the FLOPs Torch-Pruning reached (--match_torch), paired by seed.
        matched = {}
        for c in results["cells"].values():
            if c.get("torch_target") == target and {k: v for k, v in c["config"].items() if k != "normalization"} == base:
                matched.setdefault(f"{c['criterion']}/{c['config']['normalization'] or 'own'}", {})[c["seed"]] = c
        for name, cells in sorted(matched.items()):
            seeds = sorted(set(cells) & set(tr))
            mean, ci = t_interval([cells[s]["top1"] - tr[s]["top1_after"] for s in seeds])
            entry["equal_flops"][name] = {
                "seeds": seeds, "top1_mean": float(np.mean([cells[s]["top1"] for s in seeds])),
                "flops": [cells[s]["flops_fraction"] for s in seeds], "torch_flops": [tr[s]["flops_fraction"] for s in seeds],
                "margin_vs_torch": {"mean": mean, "ci95": ci, "excludes_zero": bool(ci[0] > 0 or ci[1] < 0)}}
        for (name, t), cells in sorted(variant_cells(results).items()):
            seeds = sorted(set(cells) & set(tr))
            if t != target or not seeds:
                continue
            mean, ci = t_interval([cells[s]["top1"] - tr[s]["top1_after"] for s in seeds])
            entry["keras"][name] = {
                "seeds": seeds, "top1_mean": float(np.mean([cells[s]["top1"] for s in seeds])),
                "flops_mean": float(np.mean([cells[s]["flops_fraction"] for s in seeds])),
                "params_mean": float(np.mean([cells[s]["params_fraction"] for s in seeds])),
                "margin_vs_torch": {"mean": mean, "ci95": ci, "excludes_zero": bool(ci[0] > 0 or ci[1] < 0)},
                "wall_seconds": [cells[s]["wall_seconds"] for s in seeds],
                "wall_ratio_vs_torch": [cells[s]["wall_seconds"] / tr[s]["prune_and_finetune_seconds"] for s in seeds],
            }
        out[str(target)] = entry
    return out


# ---- oracle part ------------------------------------------------------------------------------------
def oracle_part(dense, train, test, seed) -> dict:
    """Criteria vs both oracles on the transferred (dense) network: every
    criterion scores the same `oracle_batches` target minibatches at learning
    rate 0 (as `criteria_study.py` does); the NVlabs oracle reruns exactly those
    minibatches in training mode; the held-out oracle pools the target test set."""
    from keras_taylor import oracle
    from keras_taylor.callbacks import ranking_context

    copy = keras.models.clone_model(dense)
    copy.set_weights(dense.get_weights())
    gated = compile_model(kt.add_gates(copy), 0.0)
    graph = kt.analyze(gated)
    labels = oracle.group_labels(graph)
    n = min(len(train[0]), FLAGS.oracle_batches * FLAGS.batch_size)
    pick = np.random.default_rng(seed + 7).permutation(len(train[0]))[:n]
    x, y = train[0][pick], train[1][pick]
    saved = gated.get_weights()
    scores = {}
    for name in FLAGS.criteria:
        scorer = kt.TaylorScorer(gated, graph, criteria_lib.Random(seed=seed) if name == "random" else name)
        scorer.install()
        scorer.reset()
        try:
            gated.fit(x, y, batch_size=FLAGS.batch_size, epochs=1, shuffle=False, verbose=0)
        finally:
            scorer.uninstall()
        mean, _ = scorer.read()
        scores[name] = np.asarray(scorer.criterion.rank(mean, ranking_context(graph, scorer)), dtype="float64")
        gated.set_weights(saved)  # BN moving statistics moved in training mode
    t0 = time.time()
    nvlabs = oracle.oracle_deltas(gated, (x, y), batch_size=FLAGS.batch_size, graph=graph, definition="nvlabs", progress=False)
    t1 = time.time()
    held = oracle.oracle_deltas(gated, test, batch_size=500, graph=graph, progress=False)
    t2 = time.time()
    out = {"groups": graph.num_groups, "minibatches": int(np.ceil(n / FLAGS.batch_size)), "test_images": len(test[0]),
           "seconds": {"nvlabs": t1 - t0, "heldout": t2 - t1}, "config": config()}
    for definition, deltas in (("nvlabs", nvlabs), ("heldout", held)):
        corr = oracle.rank_correlations(scores, deltas, labels)
        out[definition] = {k: {s: v[s] for s in ("spearman", "kendall", "pearson", "n", "layer_mean")} for k, v in corr.items()}
    return out


# ---- summary ------------------------------------------------------------------------------------------
def t_interval(diffs, level=0.95):
    """Mean and Student-t confidence interval of paired differences (NaN for n < 2)."""
    from scipy import stats

    d = np.asarray(diffs, dtype=np.float64)
    if len(d) < 2:
        return float(d.mean()) if len(d) else float("nan"), [float("nan"), float("nan")]
    half = float(stats.t.ppf(0.5 + level / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    return float(d.mean()), [float(d.mean() - half), float(d.mean() + half)]


def summarize(cells: dict, dense: dict) -> dict:
    rows = [c for c in cells.values() if c["config"] == config() and "torch_target" not in c]
    out = {}
    for crit in sorted({r["criterion"] for r in rows}):
        for target in sorted({r["target"] for r in rows}):
            mine = {r["seed"]: r for r in rows if r["criterion"] == crit and r["target"] == target}
            if not mine:
                continue
            acc = np.array([r["top1"] for r in mine.values()])
            entry = {
                "n": len(acc), "top1_mean": float(acc.mean()), "top1_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                "flops_mean": float(np.mean([r["flops_fraction"] for r in mine.values()])),
                "params_mean": float(np.mean([r["params_fraction"] for r in mine.values()])),
            }
            ref = {r["seed"]: r for r in rows if r["criterion"] == REFERENCE and r["target"] == target}
            paired = sorted(set(mine) & set(ref))
            if crit != REFERENCE and paired:
                diffs = [mine[s]["top1"] - ref[s]["top1"] for s in paired]
                mean, ci = t_interval(diffs)
                entry["margin_vs_" + REFERENCE] = {"seeds": paired, "mean": mean, "ci95": ci,
                                                    "excludes_zero": bool(ci[0] > 0 or ci[1] < 0)}
            out[f"{crit}|{target}"] = entry
    out["dense"] = {"top1_per_seed": dense}
    return out


def plot(summary: dict, path: str) -> None:
    from keras_taylor.plotting import new_figure

    fig = new_figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    crits = sorted({k.split("|")[0] for k in summary if "|" in k})
    for i, crit in enumerate(crits):
        pts = sorted((v["flops_mean"], v["top1_mean"], v["top1_std"]) for k, v in summary.items()
                     if "|" in k and k.split("|")[0] == crit)
        f, m, s = map(np.array, zip(*pts))
        ax.errorbar(f + (i - len(crits) / 2) * 0.0015, m, yerr=s, marker="o", capsize=3, label=crit,
                    linestyle="--" if "mean_group" in crit else "-")
    dense = [v for v in summary["dense"]["top1_per_seed"].values()]
    if dense:
        ax.axhline(float(np.mean(dense)), color="black", linestyle="--", linewidth=0.8, label="dense (transferred)")
    ax.set_xlabel("FLOPs kept (fraction of the unpruned network)")
    ax.set_ylabel("target top-1 (classes 5-9, test)")
    ax.set_title("Transfer 0-4 → 5-9: mean ± std over seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, format="png", dpi=100)


def load_results(path) -> dict:
    return _harness.read_json(path, lambda: {"cells": {}, "dense": {}})


def main(argv):
    del argv
    apply_smoke()
    results = load_results(FLAGS.results)
    if not FLAGS.report_only:
        seeds, targets = [int(s) for s in FLAGS.seeds], [float(t) for t in FLAGS.targets]
        for name in FLAGS.criteria:
            criteria_lib.get(name)  # unknown names fail before any training
        criteria_lib.check_normalization(FLAGS.normalization)
        tag = json.dumps(config(), sort_keys=True)
        for seed in seeds:
            source, train, test = load_data(seed)
            dense = transferred_model(source, train, test, seed)
            results["dense"][f"{seed}|{tag}"] = top1(dense, test)
            okey = f"{seed}|{FLAGS.oracle_batches}|{','.join(FLAGS.criteria)}|{tag}"
            if FLAGS.part in ("oracle", "both") and okey not in results.setdefault("oracle", {}):
                results["oracle"][okey] = oracle_part(dense, train, test, seed)
                results["oracle"][okey].update(
                    date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), load_average=list(os.getloadavg()),
                    command="python " + " ".join(sys.argv),
                    machine=f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}")
                _harness.write_json(results, FLAGS.results)
                for d in ("nvlabs", "heldout"):
                    for name, c in results["oracle"][okey][d].items():
                        print(f"oracle {d:8s} seed {seed} {name:14s} spearman {c['spearman']:+.3f} "
                              f"kendall {c['kendall']:+.3f} layer-mean spearman {c['layer_mean']['spearman']:+.3f}", flush=True)
            if FLAGS.part == "oracle":
                continue
            if FLAGS.part == "torch":
                btag = json.dumps(base_config(), sort_keys=True)
                for target in targets:
                    key = f"{target}|{seed}|{btag}" + ("" if FLAGS.switch == "epoch" else f"|switch={FLAGS.switch}")
                    if key in results.setdefault("torch", {}):
                        continue
                    results["torch"][key] = torch_cell(dense, train, test, target, seed)
                    results["torch"][key].update(
                        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), load_average=list(os.getloadavg()),
                        command="python " + " ".join(sys.argv))
                    _harness.write_json(results, FLAGS.results)
                    r = results["torch"][key]
                    print(f"torch-pruning  target {target:.2f} seed {seed}: top1 {r['top1_after']:.4f} "
                          f"FLOPs {r['flops_fraction']:.3f} ({r['prune_and_finetune_seconds']:.0f} s; keras_taylor "
                          f"{r['keras_same_load']['top1']:.4f} in {r['keras_same_load']['wall_seconds']:.0f} s)", flush=True)
                continue
            plan = [(t, t, "") for t in targets]
            if FLAGS.match_torch:  # Torch-Pruning's achieved FLOPs for this seed (its latest run per target)
                btag = json.dumps(base_config(), sort_keys=True)
                runs = sorted((r for r in results.get("torch", {}).values()
                               if r["seed"] == seed and json.dumps(r["config"], sort_keys=True) == btag), key=lambda r: r["date"])
                reached = {r["target"]: r["flops_fraction"] for r in runs}
                plan = [(t, reached[t], f"|torch{t}") for t in targets if t in reached]
            for target, goal, suffix in plan:
                for name in FLAGS.criteria:
                    key = f"{name}|{goal}|{seed}|{tag}{suffix}"
                    if key in results["cells"]:
                        continue
                    cell = run_cell(dense, train, test, name, goal, seed)
                    if suffix:
                        cell["torch_target"] = target
                    results["cells"][key] = cell
                    results["machine"] = f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}"
                    results["load_average"] = list(os.getloadavg())
                    results["command"] = "python " + " ".join(sys.argv)
                    results["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
                    _harness.write_json(results, FLAGS.results)
                    print(f"{name:14s} target {target:.2f} seed {seed}: top1 {cell['top1']:.4f} "
                          f"FLOPs {cell['flops_fraction']:.3f} ({cell['wall_seconds']:.0f} s)", flush=True)
    tag = json.dumps(config(), sort_keys=True)
    dense = {k.split("|")[0]: v for k, v in results["dense"].items() if k.split("|", 1)[1] == tag}
    summary = summarize(results["cells"], dense)
    results["summary"] = summary
    results["variants"] = compare_variants(results)
    for key, v in results["variants"].items():
        margins = "  ".join(f"{ref.split('/')[0]} {m['mean']:+.4f} [{m['ci95'][0]:+.4f}, {m['ci95'][1]:+.4f}]"
                            for ref, m in ((r[3:], v[r]) for r in v if r.startswith("vs ")))
        print(f"{key:30s} n={v['n']} {v['top1_mean']:.4f} ± {v['top1_std']:.4f} params {v['params_mean']:.3f}  {margins}")
    if results.get("torch"):
        results["torch_comparison"] = compare_torch(results)
        for target, e in results["torch_comparison"].items():
            t = e["torch"]
            print(f"Torch-Pruning {target}: n={t['n']} top1 {t['top1_mean']:.4f} ± {t['top1_std']:.4f} FLOPs {t['flops_mean']:.3f}")
            for name, k in e["equal_flops"].items():
                m = k["margin_vs_torch"]
                print(f"  at Torch-Pruning's FLOPs {name:18s} top1 {k['top1_mean']:.4f}  vs torch {m['mean']:+.4f} "
                      f"[{m['ci95'][0]:+.4f}, {m['ci95'][1]:+.4f}]")
            for switch, w in e["wall_by_switch"].items():
                print(f"  wall switch={switch}: keras/torch {' '.join(f'{r:.2f}' for r in w['ratio'])}")
            for name, k in e["keras"].items():
                m = k["margin_vs_torch"]
                print(f"  {name:26s} top1 {k['top1_mean']:.4f}  vs torch {m['mean']:+.4f} [{m['ci95'][0]:+.4f}, {m['ci95'][1]:+.4f}]"
                      f"  wall/torch {np.median(k['wall_ratio_vs_torch']):.2f}")
    _harness.write_json(results, FLAGS.results)
    # Every (criterion, normalisation) of this configuration, and Torch-Pruning where it ran.
    series = dict(results["variants"], dense=summary["dense"])
    for target, e in results.get("torch_comparison", {}).items():
        series[f"torch-pruning GroupTaylor|{target}"] = e["torch"]
    if any("|" in k for k in series):
        plot(series, FLAGS.plot)
    for key, v in sorted(summary.items()):
        if "|" not in key:
            continue
        m = v.get(f"margin_vs_{REFERENCE}")
        margin = f"  vs FO-BN {m['mean']:+.4f} [{m['ci95'][0]:+.4f}, {m['ci95'][1]:+.4f}]" if m else ""
        print(f"{key:22s} n={v['n']} top1 {v['top1_mean']:.4f} ± {v['top1_std']:.4f} FLOPs {v['flops_mean']:.3f}{margin}")


if __name__ == "__main__":
    app.run(main)
