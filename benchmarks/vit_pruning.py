"""A small ViT on Fashion-MNIST, pruned to 50% FLOPs with Taylor scores while
fine-tuning: MLP units only, heads + MLP units, heads + MLP units + embedding
width, and a dense ViT of about half the FLOPs trained as long (control).

    python benchmarks/vit_pruning.py --seed 0 --train_subset 6000 --dense_epochs 5 --prune_epochs 3 \
        --prune_every 5 --out benchmarks/results/vit_pruning_seed0.json   # ≈4 min; seeds 0-3 in docs/attention.md
    python benchmarks/vit_pruning.py --quick    # smoke run, ≈1 min

One dense ViT (`keras_taylor.models.vit`: 7×7 patches, width 64, 4 pre-norm
blocks of 4 heads, MLP 256) is trained on a training subset; copies of it
are then pruned with `TaylorPruning(target=0.5, metric="flops")` while
training continues for the same number of epochs and with the same data order:

- `heads+mlp`: every attention head and MLP hidden unit in one global ranking;
- `mlp_only`: the heads are never removed (their groups ranked last), which is
  what keras_taylor did before attention layers had a handler;
- `heads+mlp_per_flop`: heads and MLP units ranked by Taylor score per FLOP
  (`keras_taylor.attention.PerFlop`);
- `heads+mlp_abs_per_flop`: ranked by `|∂L/∂m|` per FLOP (`PerFlop(power=0.5)`);
- `heads+mlp+emb`: the same ranking, with the embedding (residual-stream)
  width as one more group kind (`keras_taylor.attention.prune_embedding`);
- `control`: a dense ViT (width 48, 4 heads of 12, MLP 152: ≈ half the FLOPs)
  trained from scratch for `dense_epochs + prune_epochs` epochs with the same
  optimiser schedule (the equal-budget baseline).

Top-1 on the 10,000 test images, FLOPs (MACs, attention `QKᵀ`/`AV` included),
params and CPU latency (`keras_taylor.latency`, interleaved) go to
`benchmarks/results/vit_pruning.json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_taylor as kt  # noqa: E402
from keras_taylor import criteria, datasets, latency  # noqa: E402

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class HeadsLast(criteria.Criterion):
    """Taylor-FO-BN with the attention heads ranked last: MLP-only pruning."""

    name = "heads_last"

    def __init__(self, head_groups):
        self.head_groups = np.asarray(sorted(head_groups), dtype=np.int64)
        self.base = criteria.get("taylor_fo_bn")

    def batch_score(self, signals):
        return self.base.batch_score(signals)

    def rank(self, scores, context):
        out = np.asarray(scores, dtype="float64").copy()
        out[self.head_groups] = np.inf
        return out


def _head_groups(gated) -> list:
    graph = kt.analyze(gated)
    return [
        int(g)
        for l in gated.layers
        if isinstance(l, kt.attention.HeadGate)
        for g in graph.groups_of_layer_output(l.name).tolist()
    ]


def evaluate(model, x, y) -> float:
    logits = model.predict(x, batch_size=500, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == y))


def _control(args, x_tr, y_tr, x_te, y_te, base):
    """A dense ViT of about half the FLOPs, trained as long as the pruned ones
    (same epochs, batch, optimiser and learning-rate switch)."""
    keras.utils.set_random_seed(args.seed)
    model = kt.models.vit(input_shape=(28, 28, 1), patch_size=7, dim=48, depth=4, num_heads=4, key_dim=12, mlp_dim=152)
    t0 = time.time()
    for lr, epochs in ((1e-3, args.dense_epochs), (5e-4, args.prune_epochs)):
        model.compile(optimizer=keras.optimizers.Adam(lr), loss=LOSS, metrics=["accuracy"])
        model.fit(x_tr, y_tr, batch_size=args.batch_size, epochs=epochs, verbose=2)
    prof = kt.profile(model)
    run = {
        "model": "kt.models.vit(dim 48, depth 4, heads 4, key_dim 12, mlp 152), trained from scratch",
        "top1": evaluate(model, x_te, y_te),
        "flops": prof.flops,
        "params": prof.params,
        "flops_ratio": prof.flops / base.flops,
        "params_ratio": prof.params / base.params,
        "train_seconds": time.time() - t0,
    }
    return run, model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train_subset", type=int, default=20000)
    p.add_argument("--dense_epochs", type=int, default=6)
    p.add_argument("--prune_epochs", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--prune_every", type=int, default=10)
    p.add_argument("--channels_per_step", type=int, default=32)
    p.add_argument("--variants", default="mlp_only,heads+mlp_abs_per_flop,heads+mlp+emb,control",
                   help="comma-separated subset of heads+mlp, mlp_only, heads+mlp_per_flop, heads+mlp_abs_per_flop, heads+mlp+emb, control")
    p.add_argument("--seed", type=int, default=0, help="weights and data order (the training subset is fixed)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "vit_pruning.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.train_subset, args.dense_epochs, args.prune_epochs = 2048, 1, 1
    started = time.time()
    load = os.getloadavg()
    keras.utils.set_random_seed(args.seed)
    (x_tr, y_tr), (x_te, y_te) = datasets.load_fashion_mnist()
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(x_tr))[: args.train_subset]
    x_tr, y_tr = datasets.as_float_images(x_tr[idx]), y_tr[idx].astype("int64")
    x_te, y_te = datasets.as_float_images(x_te), y_te.astype("int64")

    model = kt.models.vit(input_shape=(28, 28, 1), patch_size=7, dim=64, depth=4, num_heads=4, mlp_dim=256)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=LOSS, metrics=["accuracy"])
    t0 = time.time()
    model.fit(x_tr, y_tr, batch_size=args.batch_size, epochs=args.dense_epochs, verbose=2)
    dense_seconds = time.time() - t0
    dense_top1 = evaluate(model, x_te, y_te)
    base = kt.profile(model)
    results = {
        "command": "python benchmarks/vit_pruning.py" + (" " + " ".join(sys.argv[1:]) if argv is None and sys.argv[1:] else ""),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPU cores, {platform.platform()}",
        "load_average_at_start": load,
        "keras": keras.__version__,
        "args": vars(args),
        "model": "kt.models.vit(28x28x1, patch 7, dim 64, depth 4, heads 4, key_dim 16, mlp 256)",
        "dense": {"top1": dense_top1, "flops": base.flops, "params": base.params, "train_seconds": dense_seconds},
        "runs": {},
    }
    pruned_models = {"dense": model}
    variants = args.variants.split(",")
    known = {"heads+mlp", "mlp_only", "heads+mlp_per_flop", "heads+mlp_abs_per_flop", "heads+mlp+emb", "control"}
    unknown = set(variants) - known
    if unknown:
        raise ValueError(f"Expected variants among {sorted(known)}. Received: {sorted(unknown)}")
    for variant in variants:
        if variant == "control":
            results["runs"][variant], pruned_models[variant] = _control(args, x_tr, y_tr, x_te, y_te, base)
            continue
        keras.utils.set_random_seed(args.seed + 1)  # same data order for every variant
        kt.attention.prune_embedding(variant == "heads+mlp+emb")
        gated = kt.add_gates(model)
        criterion = {
            "heads+mlp": "taylor_fo_bn",
            "heads+mlp_per_flop": kt.attention.PerFlop("taylor_fo_bn"),
            "heads+mlp_abs_per_flop": kt.attention.PerFlop("taylor_fo_bn", power=0.5),
            "heads+mlp+emb": kt.attention.PerFlop("taylor_fo_bn", power=0.5),
        }.get(variant) or HeadsLast(_head_groups(gated))
        pruner = kt.TaylorPruning(
            target=0.5, metric="flops", prune_every=args.prune_every,
            channels_per_step=args.channels_per_step, criterion=criterion,
        )
        gated.compile(optimizer=keras.optimizers.Adam(5e-4), loss=LOSS, metrics=["accuracy"])
        t0 = time.time()
        gated.fit(x_tr, y_tr, batch_size=args.batch_size, epochs=args.prune_epochs, verbose=2, callbacks=[pruner])
        seconds = time.time() - t0
        pruned = kt.prune(gated)
        kt.attention.prune_embedding(False)
        prof = kt.profile(pruned)
        heads = {l.name: int(l.num_heads) for l in pruned.layers if isinstance(l, keras.layers.MultiHeadAttention)}
        mlp = {l.name: int(l.units) for l in pruned.layers if l.name.endswith("_mlp1")}
        events = [h for h in pruner.history]
        results["runs"][variant] = {
            "top1": evaluate(pruned, x_te, y_te),
            "top1_gated": evaluate(gated, x_te, y_te),
            "flops": prof.flops,
            "params": prof.params,
            "flops_ratio": prof.flops / base.flops,
            "params_ratio": prof.params / base.params,
            "heads_left": heads,
            "mlp_units_left": mlp,
            "embedding_width": int(pruned.get_layer("patch_embed").filters),
            "pruning_steps": len(events),
            "done_at_minibatch": events[-1].get("step") if events else None,
            "train_seconds": seconds,
        }
        pruned_models[variant] = pruned
    lat = {}
    for batch in (1, 64):
        lat[str(batch)] = latency.measure_latency(pruned_models, batch_size=batch, rounds=5 if args.quick else 15)
    results["latency_ms"] = lat
    results["total_seconds"] = time.time() - started
    results["load_average_at_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    sys.stdout.write(json.dumps({k: results[k] for k in ("dense", "runs", "latency_ms", "total_seconds")}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
