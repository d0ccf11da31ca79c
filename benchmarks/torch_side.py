"""PyTorch side of `benchmarks/torch_pruning_compare.py` (runs in `.venv-torch`).

Replicates `keras_taylor.models.resnet(widths=(16, 32, 64), blocks_per_stage=B)`
layer for layer in PyTorch, starts from the Keras model's initial weights
(exported by the driver), trains it with the driver's schedule on the driver's
exact minibatch order, then prunes it with Torch-Pruning's
`GroupTaylorImportance` + `BasePruner(global_pruning=True)` interleaved with
training (one `pruner.step()` every `prune_every` minibatches, on gradients
accumulated over those minibatches) until the conv+linear MACs are at most
`target` of the unpruned net's, and fine-tunes for the rest of the budget.

Not meant to be run by hand; the driver calls

    .venv-torch/bin/python benchmarks/torch_side.py --data D.npz --output T.json [...]

Details that make it match the Keras side:
  * Keras "same" padding with stride 2 on an even input pads (0 before, 1
    after), so stride-2 3x3 convs get a `ZeroPad2d((0, 1, 0, 1))` and no
    padding of their own; BatchNorm epsilon 1e-3, momentum 0.1 (= Keras 0.9).
  * The optimizer is Keras 3's SGD(momentum=0.9, nesterov=True) update,
    written out (`m = 0.9 m - lr g; w += 0.9 m - lr g`), with Keras's
    `CosineDecay` evaluated at the optimizer's step count. Momentum buffers
    survive pruning steps (Torch-Pruning slices `.grad` with the weights, so
    the buffers ride along in `.grad` through `group.prune()`), as the Keras
    side's optimizer state survives gating.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn


# ------------------------------------------------------------------ model
class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride = stride
        self.pad = nn.ZeroPad2d((0, 1, 0, 1)) if stride == 2 else nn.Identity()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=0 if stride == 2 else 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout, eps=1e-3, momentum=0.1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-3, momentum=0.1)
        if stride != 1 or cin != cout:
            self.proj = nn.Conv2d(cin, cout, 1, stride, bias=False)
            self.proj_bn = nn.BatchNorm2d(cout, eps=1e-3, momentum=0.1)
        else:
            self.proj = None
        self.out = nn.ReLU()

    def forward(self, x):
        y = self.relu1(self.bn1(self.conv1(self.pad(x))))
        y = self.bn2(self.conv2(y))
        s = self.proj_bn(self.proj(x)) if self.proj is not None else x
        return self.out(s + y)


class ResNet(nn.Module):
    def __init__(self, widths=(16, 32, 64), blocks_per_stage=2, num_classes=10, head_name="logits"):
        super().__init__()
        self.head_name = head_name
        self.stem_conv = nn.Conv2d(1, widths[0], 3, 1, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(widths[0], eps=1e-3, momentum=0.1)
        self.stem_relu = nn.ReLU()
        blocks, names, cin = [], [], widths[0]
        for s, w in enumerate(widths):
            for b in range(blocks_per_stage):
                stride = 2 if (s > 0 and b == 0) else 1
                blocks.append(Block(cin, w, stride))
                names.append(f"s{s}b{b}")
                cin = w
        self.blocks = nn.ModuleList(blocks)
        self.block_names = names
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.logits = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.stem_relu(self.stem_bn(self.stem_conv(x)))
        for blk in self.blocks:
            x = blk(x)
        return self.logits(torch.flatten(self.pool(x), 1))

    def keras_names(self):
        """Keras layer name -> (torch module, kind)."""
        out = {"stem_conv": (self.stem_conv, "conv"), "stem_bn": (self.stem_bn, "bn"), self.head_name: (self.logits, "dense")}
        for name, blk in zip(self.block_names, self.blocks):
            out[f"{name}_conv1"] = (blk.conv1, "conv")
            out[f"{name}_bn1"] = (blk.bn1, "bn")
            out[f"{name}_conv2"] = (blk.conv2, "conv")
            out[f"{name}_bn2"] = (blk.bn2, "bn")
            if blk.proj is not None:
                out[f"{name}_proj"] = (blk.proj, "conv")
                out[f"{name}_proj_bn"] = (blk.proj_bn, "bn")
        return out


def load_keras_weights(model: ResNet, data, prefix: str = "w") -> int:
    """Copies Keras weights (`<prefix>/<layer>/<i>` arrays) into `model`."""
    n = 0
    with torch.no_grad():
        for kname, (mod, kind) in model.keras_names().items():
            w = [data[f"{prefix}/{kname}/{i}"] for i in range(4 if kind == "bn" else (2 if kind == "dense" else 1))]
            if kind == "conv":  # HWIO -> OIHW
                mod.weight.copy_(torch.from_numpy(np.ascontiguousarray(w[0].transpose(3, 2, 0, 1))))
            elif kind == "dense":  # (in, out) -> (out, in)
                mod.weight.copy_(torch.from_numpy(np.ascontiguousarray(w[0].T)))
                mod.bias.copy_(torch.from_numpy(w[1]))
            else:  # gamma, beta, moving mean, moving variance
                mod.weight.copy_(torch.from_numpy(w[0]))
                mod.bias.copy_(torch.from_numpy(w[1]))
                mod.running_mean.copy_(torch.from_numpy(w[2]))
                mod.running_var.copy_(torch.from_numpy(w[3]))
            n += 1
    return n


# ------------------------------------------------------------------ counting
def conv_linear_macs(model, example):
    """MACs of Conv2d and Linear layers (no bias adds): keras_taylor.flops's definition."""
    total = [0]

    def hook(mod, inp, out):
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * (mod.in_channels // mod.groups)
            total[0] += int(out.numel() // out.shape[0]) * k
        else:
            total[0] += mod.in_features * mod.out_features

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was = model.training
    model.eval()
    with torch.no_grad():
        model(example)
    model.train(was)
    for h in hs:
        h.remove()
    return total[0]


def keras_style_params(model):
    """Trainable params + BN running statistics (what Keras's count_params counts)."""
    n = sum(p.numel() for p in model.parameters())
    n += sum(m.running_mean.numel() + m.running_var.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    return n


def layer_channels(model):
    out = {}
    for kname, (mod, kind) in model.keras_names().items():
        if kind == "conv":
            out[kname] = mod.out_channels
        elif kind == "dense":
            out[kname] = mod.out_features
    return out


# ------------------------------------------------------------------ training
def cosine(initial, decay_steps, alpha):
    def lr(step):
        frac = min(step, decay_steps) / decay_steps
        return initial * ((1 - alpha) * 0.5 * (1 + math.cos(math.pi * frac)) + alpha)
    return lr


class KerasSGD:
    """Keras 3 SGD(momentum, nesterov) in PyTorch; buffers keyed by parameter."""

    def __init__(self, schedule, momentum=0.9, nesterov=True):
        self.schedule, self.momentum, self.nesterov, self.iterations, self.buf = schedule, momentum, nesterov, 0, {}

    @torch.no_grad()
    def step(self, params):
        lr, m = self.schedule(self.iterations), self.momentum
        for p in params:
            if p.grad is None:
                continue
            b = self.buf.get(p)
            if b is None:
                b = self.buf[p] = torch.zeros_like(p)
            b.mul_(m).add_(p.grad, alpha=-lr)
            if self.nesterov:
                p.add_(b, alpha=m).add_(p.grad, alpha=-lr)
            else:
                p.add_(b)
        self.iterations += 1


def batches(x, y, order, bs):
    for i in range(0, len(order), bs):
        idx = order[i:i + bs]
        xb = torch.from_numpy(x[idx].astype(np.float32) / np.float32(255.0)).unsqueeze(1)
        yield xb, torch.from_numpy(y[idx].astype(np.int64))


def evaluate(model, x, y, bs=1000):
    model.eval()
    correct = 0
    with torch.no_grad():
        for xb, yb in batches(x, y, np.arange(len(x)), bs):
            correct += int((model(xb).argmax(1) == yb).sum())
    model.train()
    return correct / len(x)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--prune_epochs", type=int, default=4)
    ap.add_argument("--prune_every", type=int, default=30)
    ap.add_argument("--channels_per_step", type=int, default=8)
    ap.add_argument("--pruning_ratio", type=float, default=0.5, help="BasePruner pruning_ratio (channel fraction at its last iterative step).")
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--batch_size", type=int, default=128)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--from_keras_dense", action="store_true",
                    help="Skip training: start pruning from the Keras side's trained weights (`dense/...` in --data).")
    ap.add_argument("--widths", default="16,32,64", help="Stage widths of the ResNet.")
    ap.add_argument("--num_classes", type=int, default=10)
    ap.add_argument("--head_name", default="logits", help="Keras name of the classification Dense layer.")
    ap.add_argument("--prune_lr", type=float, default=None,
                    help="Constant learning rate for the pruning phase (default: cosine 0.02 -> 0.001).")
    ap.add_argument("--round_to", type=int, default=None, help="BasePruner(round_to=): channels kept per layer rounded to a multiple.")
    ap.add_argument("--no_nesterov", action="store_true", help="Plain momentum (Keras SGD(momentum=0.9)).")
    args = ap.parse_args()

    import torch_pruning as tp

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()
    d = np.load(args.data)
    x_train, y_train, x_test, y_test, perms = d["x_train"], d["y_train"], d["x_test"], d["y_test"], d["perms"]
    bs = args.batch_size
    steps = math.ceil(len(x_train) / bs)
    assert perms.shape[0] >= args.epochs + args.prune_epochs

    model = ResNet(widths=tuple(int(w) for w in args.widths.split(",")), blocks_per_stage=args.blocks,
                   num_classes=args.num_classes, head_name=args.head_name)
    n_loaded = load_keras_weights(model, d)
    example = torch.zeros(1, 1, 28, 28)
    # Equivalence check: the Keras model's initial logits on the first test images.
    model.eval()
    with torch.no_grad():
        xc = torch.from_numpy(x_test[: len(d["check_logits"])].astype(np.float32) / 255.0).unsqueeze(1)
        check_diff = float((model(xc) - torch.from_numpy(d["check_logits"])).abs().max())
    model.train()
    macs0 = conv_linear_macs(model, example)
    tp_ops0, tp_params0 = tp.utils.count_ops_and_params(model, example)
    params0 = keras_style_params(model)
    print(f"[torch] loaded {n_loaded} layers from Keras; max |logit diff| vs Keras = {check_diff:.2e}; "
          f"conv+linear MACs {macs0:,}; tp ops {tp_ops0:,.0f}; tp params {tp_params0:,}; params+BN stats {params0:,}", flush=True)
    loss_fn = nn.CrossEntropyLoss()

    # 1. Dense training (or the Keras side's trained weights).
    t0 = time.time()
    opt = KerasSGD(cosine(0.1, args.epochs * steps, 0.01))
    dense_check = None
    if args.from_keras_dense:
        load_keras_weights(model, d, prefix="dense")
        model.eval()
        with torch.no_grad():
            dense_check = float((model(xc) - torch.from_numpy(d["dense_check_logits"])).abs().max())
        model.train()
        print(f"[torch] loaded the Keras trained weights; max |logit diff| vs Keras = {dense_check:.2e}", flush=True)
    for e in range(0 if args.from_keras_dense else args.epochs):
        te, losses = time.time(), []
        for xb, yb in batches(x_train, y_train, perms[e], bs):
            for p in model.parameters():
                p.grad = None
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step(list(model.parameters()))
            losses.append(float(loss.detach()))
        print(f"[torch] epoch {e + 1}/{args.epochs} loss {np.mean(losses):.4f} ({time.time() - te:.0f}s)", flush=True)
    train_s = time.time() - t0
    if os.environ.get("TS_SAVE_DENSE"):
        torch.save(model.state_dict(), os.environ["TS_SAVE_DENSE"])
    acc_before = evaluate(model, x_test, y_test)
    print(f"[torch] top-1 before pruning {acc_before:.4f}", flush=True)

    # 2. Prune while training (Torch-Pruning, global Taylor), then fine-tune.
    t_phase = time.time()
    t_setup = time.perf_counter()
    imp = tp.importance.GroupTaylorImportance()
    n_groups_total = None
    per_step_ratio = None
    # iterative_steps chosen so each step removes `channels_per_step` channel groups.
    pruner_cls = getattr(tp.pruner, "BasePruner", None) or tp.pruner.MetaPruner
    probe = pruner_cls(model, example, importance=imp, global_pruning=True, pruning_ratio=args.pruning_ratio,
                       iterative_steps=1, ignored_layers=[model.logits], round_to=args.round_to)
    n_groups_total = probe.initial_total_channels
    del probe
    iterative_steps = max(1, round(n_groups_total * args.pruning_ratio / args.channels_per_step))
    pruner = pruner_cls(model, example, importance=imp, global_pruning=True, pruning_ratio=args.pruning_ratio,
                        iterative_steps=iterative_steps, ignored_layers=[model.logits], round_to=args.round_to)
    setup_s = time.perf_counter() - t_setup
    model.train()  # building the dependency graph leaves the model in eval mode
    per_step_ratio = args.pruning_ratio / iterative_steps
    print(f"[torch] BasePruner: {n_groups_total} channel groups, pruning_ratio={args.pruning_ratio}, "
          f"iterative_steps={iterative_steps} (~{n_groups_total * per_step_ratio:.1f} groups/step); setup {setup_s:.2f}s", flush=True)

    schedule = (lambda _: args.prune_lr) if args.prune_lr is not None else cosine(0.02, args.prune_epochs * steps, 0.05)
    opt = KerasSGD(schedule, nesterov=not args.no_nesterov)
    epoch_log = []
    acc = None  # gradient sums since the last pruning step
    done, step, history = False, 0, []
    accum_s, prune_s = 0.0, 0.0
    step_log = []  # (seconds, pruning done when the minibatch began) per minibatch, in order
    done_at_s = None
    for e in range(args.prune_epochs):
        te, losses = time.time(), []
        for xb, yb in batches(x_train, y_train, perms[args.epochs + e], bs):
            ts = time.perf_counter()
            model.train()
            params = list(model.parameters())
            for p in params:
                p.grad = None
            loss = loss_fn(model(xb), yb)
            loss.backward()
            if not done:
                ta = time.perf_counter()
                with torch.no_grad():
                    if acc is None:
                        acc = {p: p.grad.detach().clone() for p in params}
                    else:
                        for p in params:
                            acc[p].add_(p.grad)
                accum_s += time.perf_counter() - ta
            opt.step(params)
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"non-finite loss at pruning-phase minibatch {step + 1}")
            step += 1
            step_log.append((time.perf_counter() - ts, done))
            if not done and step % args.prune_every == 0:
                tpr = time.perf_counter()
                for p in params:  # Taylor importance reads .grad: the sum over the last K minibatches
                    p.grad = acc[p]
                first = True
                for group in pruner.step(interactive=True):
                    if first:  # importance is computed; let .grad carry the momentum buffers through pruning
                        for p in params:
                            p.grad = opt.buf[p].clone()
                        first = False
                    group.prune()
                new_params = list(model.parameters())
                if not first:  # something was pruned: the momentum buffers come back sliced in .grad
                    opt.buf = {p: p.grad.detach().clone() for p in new_params}
                for p in new_params:
                    p.grad = None
                acc = None
                macs = conv_linear_macs(model, example)
                prune_s += time.perf_counter() - tpr
                frac = macs / macs0
                done = frac <= args.target or pruner.current_step >= iterative_steps
                rec = {"step": step, "flops_fraction": frac, "params_fraction": keras_style_params(model) / params0,
                       "channels": sum(layer_channels(model).values())}
                history.append(rec)
                print(f"[torch] prune step {len(history)} at minibatch {step}: conv+linear MACs {frac:.3f}", flush=True)
                if done:
                    done_at_s = time.time() - t_phase
        epoch_log.append({"epoch": e, "seconds": time.time() - te, "params": keras_style_params(model)})
        print(f"[torch] prune epoch {e + 1}/{args.prune_epochs} loss {np.mean(losses):.4f} ({time.time() - te:.0f}s)", flush=True)
    phase_s = time.time() - t_phase
    acc_after = evaluate(model, x_test, y_test)
    macs1 = conv_linear_macs(model, example)
    tp_ops1, tp_params1 = tp.utils.count_ops_and_params(model, example)
    params1 = keras_style_params(model)
    print(f"[torch] top-1 after {acc_after:.4f}; conv+linear MACs {macs1 / macs0:.3f}; tp ops {tp_ops1 / tp_ops0:.3f}", flush=True)
    med = lambda v: float(np.median(v)) if v else None
    step_times_scoring = [sec for sec, d in step_log if not d]
    step_times_after = [sec for sec, d in step_log if d]
    out = {
        "torch_version": torch.__version__,
        "torch_pruning_version": importlib.metadata.version("torch-pruning"),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "threads": torch.get_num_threads(),
        "init_logit_max_abs_diff_vs_keras": check_diff,
        "from_keras_dense": args.from_keras_dense,
        "dense_logit_max_abs_diff_vs_keras": dense_check,
        "top1_before": acc_before,
        "top1_after": acc_after,
        "macs_before": macs0, "macs_after": macs1, "flops_fraction": macs1 / macs0,
        "tp_ops_before": float(tp_ops0), "tp_ops_after": float(tp_ops1), "tp_ops_fraction": float(tp_ops1 / tp_ops0),
        "tp_params_before": int(tp_params0), "tp_params_after": int(tp_params1),
        "params_before": params0, "params_after": params1, "params_fraction": params1 / params0,
        "channels_after": layer_channels(model),
        "pruner": {"class": pruner_cls.__name__, "importance": "GroupTaylorImportance()", "global_pruning": True,
                   "pruning_ratio": args.pruning_ratio, "iterative_steps": iterative_steps,
                   "initial_total_channels": n_groups_total, "ignored_layers": ["logits"], "round_to": args.round_to,
                   "steps_taken": pruner.current_step},
        "pruning_history": history,
        "epochs": epoch_log,
        "pruning_done": done,
        "pruning_done_at_minibatch": history[-1]["step"] if done else None,
        "train_seconds": train_s,
        "pruning_phase_seconds": done_at_s,
        "prune_and_finetune_seconds": phase_s,
        "pruning_steps_seconds": prune_s,
        "pruner_setup_seconds": setup_s,
        "scoring_accumulate_seconds": accum_s,
        "scoring_accumulate_ms_per_step": 1000 * accum_s / max(1, len(step_times_scoring)),
        "step_ms_median_while_scoring": 1000 * med(step_times_scoring) if step_times_scoring else None,
        "step_ms_median_after_pruning": 1000 * med(step_times_after) if step_times_after else None,
        "step_log": {"step_ms": [round(1000 * sec, 3) for sec, _ in step_log], "pruned": [d for _, d in step_log]},
        "wall_seconds": time.time() - started,
    }
    with open(args.output, "w") as f:
        json.dump(out, f, indent=1)
    print(f"[torch] done in {out['wall_seconds'] / 60:.1f} min", flush=True)


if __name__ == "__main__":
    sys.exit(main())
