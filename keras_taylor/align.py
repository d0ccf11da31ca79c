"""Channel alignment: round each layer's kept channels to a multiple (8, 16).

Pruning leaves layers with arbitrary widths (37, 101, ...). Dense linear
algebra runs in tiles: NVIDIA tensor cores want channel counts that are
multiples of 8 (fp16/bf16) or 16 (int8) before cuDNN/cuBLAS pick their
tensor-core kernels, and CPU kernels vectorize channels in 8 or 16 float
lanes (AVX2/AVX-512, XNNPACK's tiles). A misaligned width is padded or runs a
remainder loop, so a model with fewer FLOPs can be no faster, or slower
("Why Smaller Is Slower? Dimensional Misalignment in Compressed LLMs", 2026).
On this project's CPU machine (AVX-512), aligned pruned ResNet50/MobileNetV2
ran about 5% (to 8) and 10% (to 16) faster at nearly the same FLOPs, in noisy
measurements (`benchmarks/sections/channel_alignment.md`); GPU effects were
not measured.

`align_removed` takes a set of removed channel groups (what global Taylor
ranking chose) and returns a nearby set in which every channel-creating layer
(Conv, Dense, SeparableConv, ConvTranspose: `ChannelGraph.creating_layers`)
keeps a multiple of `multiple` output channels, or all of them. Depthwise
convolutions follow their input's count (times their depth multiplier), so
they are aligned when their producer is.

Everything here is pure numpy over a `ChannelGraph`; nothing touches a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from keras_taylor import graph as graph_lib

_MODES = ("nearest", "up", "down")


@dataclass(frozen=True)
class LayerAlignment:
    """Kept output channels of one channel-creating layer.

    Attributes:
        name: the layer's name.
        kept: live output channels (fixed channels included).
        full: the layer's output channels before pruning.
        fixed: output channels that can never be removed.
        aligned: `kept` is a positive multiple of the multiple, or `full`.
    """

    name: str
    kept: int
    full: int
    fixed: int
    aligned: bool


# The group -> (layer, channels) table now lives on the graph; the old name
# stays for callers (benchmarks) that used it.
_Layers = graph_lib.GroupIndex


def _check_multiple(multiple) -> int:
    if isinstance(multiple, bool) or not isinstance(multiple, (int, np.integer)) or multiple < 1:
        raise ValueError(f"Expected multiple to be an integer >= 1. Received: multiple={multiple!r}")
    return int(multiple)


def _is_aligned(kept: int, full: int, multiple: int) -> bool:
    return kept == full or (kept > 0 and kept % multiple == 0)


def _removed_mask(graph, removed) -> np.ndarray:
    mask = np.zeros(graph.num_groups, dtype=bool)
    idx = []
    for g in removed:
        if isinstance(g, bool) or not isinstance(g, (int, np.integer)) or not 0 <= int(g) < graph.num_groups:
            raise ValueError(
                f"Expected removed to hold group indices in [0, {graph.num_groups}). "
                f"Received: {g!r}"
            )
        idx.append(int(g))
    mask[idx] = True
    return mask


def alignment_report(graph: graph_lib.ChannelGraph, removed, multiple: int) -> list:
    """Kept output channels of every channel-creating layer, and whether aligned.

    Args:
        graph: the model's `ChannelGraph` (`keras_taylor.analyze`).
        removed: iterable of removed group indices.
        multiple: the channel multiple, an integer >= 1.

    Returns:
        A list of `LayerAlignment`, one per channel-creating layer in
        topological order. A layer is aligned when it keeps a positive
        multiple of `multiple` channels, or all of its channels.

    Raises:
        ValueError: for a `multiple` that is not an integer >= 1, or a group
            index out of range.
    """
    multiple = _check_multiple(multiple)
    layers = graph.group_index
    kept = layers.kept(_removed_mask(graph, removed))
    return [
        LayerAlignment(n, int(k), int(w), int(f), _is_aligned(int(k), int(w), multiple))
        for n, k, w, f in zip(layers.names, kept, layers.full, layers.fixed)
    ]


class _State:
    def __init__(self, layers: _Layers, removed: np.ndarray, min_channels: int):
        self.layers = layers
        self.removed = removed
        self.kept = layers.kept(removed)
        self.min_channels = min_channels

    def toggle(self, g: int) -> None:
        sign = -1 if not self.removed[g] else 1  # removing lowers the counts
        self.removed[g] = not self.removed[g]
        for i, c in self.layers.of_group[g]:
            self.kept[i] += sign * c

    def plan_up(self, i: int, target: int, order: list) -> list | None:
        """Removed groups of layer `i` to restore, best-scored first, to reach `target`."""
        need = target - int(self.kept[i])
        picks = []
        for g, c in order:
            if need == 0:
                break
            if self.removed[g] and c <= need:
                picks.append(g)
                need -= c
        return picks if need == 0 else None

    def plan_down(self, i: int, target: int, order: list) -> list | None:
        """Kept groups of layer `i` to remove, worst-scored first, to reach `target`."""
        need = int(self.kept[i]) - target
        picks = []
        drop: dict = {}  # layer -> channels the picks so far take from it
        for g, c in order[::-1]:
            if need == 0:
                break
            if self.removed[g] or c > need:
                continue
            hits = self.layers.of_group[g]
            if any(self.kept[j] - drop.get(j, 0) - cj < self.min_channels for j, cj in hits):
                continue
            for j, cj in hits:
                drop[j] = drop.get(j, 0) + cj
            picks.append(g)
            need -= c
        return picks if need == 0 else None


def _sorted_groups(layers: _Layers, i: int, scores: np.ndarray) -> list:
    """Layer `i`'s `(group, count)` pairs, highest score first (ties: lower id first)."""
    g, c = layers.groups[i], layers.counts[i]
    order = np.lexsort((g, -scores[g]))
    return list(zip(g[order].tolist(), c[order].tolist()))


def align_removed(
    graph: graph_lib.ChannelGraph,
    removed,
    scores,
    multiple: int,
    *,
    min_channels: int = 1,
    mode: str = "nearest",
    max_passes: int = 20,
) -> set:
    """Rounds every layer's kept output channels to a multiple of `multiple`.

    Returns a new set of removed channel groups in which every
    channel-creating layer of `graph` (Conv, Dense, SeparableConv,
    ConvTranspose; fixed channels included in the count) keeps either a
    positive multiple of `multiple` output channels or all of its channels.
    The input set is not modified.

    Per misaligned layer, with `k` kept channels, the two candidates are the
    multiples just below and just above `k` (above: capped at the layer's full
    width, which always counts as aligned; below: never under `min_channels`
    and never 0):

    - rounding **up** restores the layer's *highest-scored removed* groups;
    - rounding **down** removes its *lowest-scored kept* groups, skipping any
      whose removal would leave some layer it belongs to with fewer than
      `min_channels` channels.

    `mode="nearest"` takes the closer candidate (fewer channels changed), so
    over many layers the changes roughly cancel: the FLOPs of the result are
    close to, but not exactly, those of the input set, and can be above or
    below it. A tie (`k` exactly halfway) goes against the running balance of
    channels changed so far in this call (restore first when balanced), which
    keeps the drift small. `mode="up"` only restores (FLOPs never fall, no
    layer loses more channels than the ranking chose); `mode="down"` only
    removes, except where a layer cannot go down (its lower multiple would be
    0 or under `min_channels`, or cannot be hit exactly), where it rounds up.
    How big in practice (`benchmarks/channel_alignment.py`: keras.applications
    ResNet50, MobileNetV2, EfficientNetB0 and DenseNet121 at 224², 5 random
    global rankings each, pruned to 0.50 of the dense FLOPs): "nearest" gave
    0.485–0.520 at `multiple=8` and 0.474–0.528 at 16 (within 3 points of the
    dense FLOPs; means per model 0.485–0.512). "up" gave up to 0.58 (8) and
    0.74 (16), "down" down to 0.41 (8) and 0.34 (16). Narrow models move
    more: a ResNet-14 with 16/32/64-channel stages went from 0.50 to
    0.55–0.71 at 16, since a 16-channel layer pruned to 9+ channels rounds up
    to all 16. Use `keras_taylor.selection.align_to_target` to land at or
    under a FLOPs target.

    A channel group can span several layers: a residual stream's channel is
    an output channel of every conv added into the stream, and all those
    layers hold the same groups, so they are aligned together. Layers are
    visited in topological order, and the visit repeats until no layer
    changes (a fixed point). Where layers share only some groups (a conv
    added to a concatenation of two convs), aligning one can misalign
    another; if the passes do not settle within `max_passes`, or come back to
    a set already seen, the remaining misaligned layers are rounded up only
    (restoring highest-scored groups, down to the full width if need be),
    which always ends with every layer aligned (nothing removed is aligned).

    Groups holding several channels of one layer (channel `j` tied across
    the groups of a grouped conv) are picked so that the count lands exactly
    on the multiple; groups that would overshoot are skipped. The result is
    deterministic: ties in score are broken by group index.

    Args:
        graph: the model's `ChannelGraph` (`keras_taylor.analyze`).
        removed: iterable of removed group indices (what the ranking chose).
        scores: per-group importance, shape `(graph.num_groups,)`, higher =
            more important (the callback's EMA of Taylor scores). Non-finite
            scores rank lowest.
        multiple: the channel multiple, an integer >= 1 (8 or 16 for GPUs;
            1 returns the input set unchanged).
        min_channels: fewest output channels any channel-creating layer keeps
            when groups are removed. Defaults to `1`.
        mode: `"nearest"`, `"up"` or `"down"`, see above. Defaults to
            `"nearest"`.
        max_passes: passes over the layers before falling back to rounding
            up only. Defaults to `20`.

    Returns:
        A new `set` of removed group indices.

    Raises:
        ValueError: for a `multiple` that is not an integer >= 1, a bad
            `min_channels`, `mode` or `max_passes`, `scores` of the wrong
            shape, or a group index out of range.

    Example:

    ```python
    graph = keras_taylor.analyze(gated)
    aligned = keras_taylor.align.align_removed(graph, pruner.removed, pruner.ema, 8)
    plan = keras_taylor.PruningPlan.from_groups(graph, aligned)
    small = keras_taylor.apply_plan(gated, plan)
    ```

    References:
        NVIDIA, "Deep Learning Performance Guide: Matrix Multiplication /
        Convolutional Layers" (tensor-core channel multiples). "Why Smaller Is
        Slower? Dimensional Misalignment in Compressed LLMs", 2026.
    """
    multiple = _check_multiple(multiple)
    if isinstance(min_channels, bool) or not isinstance(min_channels, (int, np.integer)) or min_channels < 1:
        raise ValueError(f"Expected min_channels to be an integer >= 1. Received: min_channels={min_channels!r}")
    if mode not in _MODES:
        raise ValueError(f"Expected mode in {_MODES}. Received: mode={mode!r}")
    if isinstance(max_passes, bool) or not isinstance(max_passes, (int, np.integer)) or max_passes < 0:
        raise ValueError(f"Expected max_passes to be an integer >= 0. Received: max_passes={max_passes!r}")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (graph.num_groups,):
        raise ValueError(
            f"Expected scores of shape ({graph.num_groups},), one per channel group. "
            f"Received: shape {scores.shape}"
        )
    scores = np.where(np.isfinite(scores), scores, -np.inf)
    mask = _removed_mask(graph, removed)
    if multiple == 1 or not mask.any():
        return set(np.flatnonzero(mask).tolist())

    layers = graph.group_index
    state = _State(layers, mask, int(min_channels))
    orders = [_sorted_groups(layers, i, scores) for i in range(len(layers.names))]
    balance = 0  # channels restored minus channels removed, over this call

    def aligned(i):
        return _is_aligned(int(state.kept[i]), int(layers.full[i]), multiple)

    def round_up(i):
        """Restores groups of layer `i` until it is aligned (always possible)."""
        k, full = int(state.kept[i]), int(layers.full[i])
        target = (k // multiple + 1) * multiple
        while target < full:
            picks = state.plan_up(i, target, orders[i])
            if picks is not None:
                return picks
            target += multiple
        return [g for g, _ in orders[i] if state.removed[g]]  # everything: full width

    def round_down(i):
        k = int(state.kept[i])
        target = (k // multiple) * multiple
        if target < max(1, state.min_channels, int(layers.fixed[i])):
            return None
        return state.plan_down(i, target, orders[i])

    def step(i, allowed):
        nonlocal balance
        up = round_up(i) if allowed != "down" else None
        down = round_down(i) if allowed != "up" else None
        if allowed == "down" and down is None:
            up = round_up(i)
        if up is None and down is None:
            return False
        if up is not None and down is not None:
            picked = set(up)
            n_up = sum(c for g, c in orders[i] if g in picked)
            n_down = int(state.kept[i]) - (int(state.kept[i]) // multiple) * multiple
            go_up = n_up < n_down or (n_up == n_down and balance <= 0)
        else:
            go_up = up is not None
        before = int(state.kept[i])
        for g in (up if go_up else down):
            state.toggle(g)
        balance += int(state.kept[i]) - before
        return True

    seen = {state.removed.tobytes()}
    settled = False
    for _ in range(max_passes):
        changed = False
        for i in range(len(layers.names)):
            if not aligned(i):
                changed |= step(i, mode)
        if not changed:
            settled = all(aligned(i) for i in range(len(layers.names)))
            break
        key = state.removed.tobytes()
        if key in seen:
            break  # a cycle: fall back to rounding up
        seen.add(key)
    if not settled:
        # Restore-only: every step restores at least one group, and the set
        # with nothing removed is aligned, so this ends with all layers aligned.
        while True:
            bad = [i for i in range(len(layers.names)) if not aligned(i)]
            if not bad:
                break
            for g in round_up(bad[0]):
                state.toggle(g)
    return set(np.flatnonzero(state.removed).tolist())
