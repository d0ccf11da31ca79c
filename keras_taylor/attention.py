"""Attention heads as prunable channel groups.

`keras.layers.MultiHeadAttention` (MHA) and `keras.layers.GroupQueryAttention`
(GQA) keep their heads on an explicit kernel axis: query/key/value kernels are
`(dim, heads, head_dim)`, biases `(heads, head_dim)`, the output kernel
`(heads, head_dim, dim)`. This module makes every head (for GQA: every
key/value group) one channel group of the analysis (`keras_taylor.graph`):

- **Gate, parameter-side** (`HeadGate`). Head `h` contributes
  `softmax(q_h k_hᵀ) v_h W_o[h]` to the output, and the attention weights do
  not depend on `v_h`, so scaling the head's value kernel slice and bias by
  `m_h` scales its contribution by `m_h`. `∂L/∂m_h = Σ (W_v·∂L/∂W_v +
  b_v·∂L/∂b_v)` over the head's slice: the gate gradient comes from the
  parameter gradients backprop computes anyway, and the gated layer adds no
  activation-sized operation (the same trick as the BN and conv gates of
  `keras_taylor.gates`). Michel et al. (NeurIPS 2019, "Are Sixteen Heads Really
  Better than One?") score heads by `|∂L/∂m_h|` on exactly this gate; the
  default criterion squares it (CVPR'19 Taylor-FO).
- **GQA**: query heads `u` share key/value head `u // (num_query_heads //
  num_key_value_heads)` (Keras repeats keys and values). A gate on the value of
  key/value head `k` scales the output of all the query heads of its group,
  so one gate = one group of `num_query_heads // num_key_value_heads` query
  heads plus their key/value head; removing it removes all of them and keeps
  the layer's query/key-value ratio. (A gate per query head is possible on
  the output kernel, but removing single query heads would break the ratio
  Keras requires.)
- **Surgery**: the layer is rebuilt with fewer `num_heads` (GQA:
  `num_query_heads`/`num_key_value_heads`) and its query/key/value/gate/output
  kernels and biases sliced on the head axis (Torch-Pruning's
  `prune_num_heads`); input channels of the query, key and value projections
  are sliced like a Dense layer's. The output channels of an attention layer
  are not pruned here.
- **Cost**: `attention_cost` counts the projections plus `QKᵀ` and `AV`
  multiply–accumulates, so `keras_taylor.profile` and the FLOPs target see
  what a head costs.
- **Embedding width (opt-in, `prune_embedding`)**: the residual stream's
  channels become one group across the patch embedding, `ClassTokenPosition`,
  every `Add`, every `LayerNormalization` (gated by `NormGate`, which
  normalises over the live channels so that surgery equals masking), the
  query/key/value and MLP inputs, the attention output projections, the MLP
  outputs and the head (NViT's embedding group); KerasHub's ViT, DeiT and
  DINOv2 patch embeddings through `PatchEmbeddingHandler`.

References:
    Michel, Levy, Neubig. "Are Sixteen Heads Really Better than One?"
    NeurIPS 2019.
    Yang, Yin, Shen, Molchanov, Li, Kautz. "Global Vision Transformer Pruning
    with Hessian-Aware Saliency" (NViT), CVPR 2023 (github.com/NVlabs/NViT).
    Fang et al. "DepGraph: Towards Any Structural Pruning", CVPR 2023
    (Torch-Pruning, github.com/VainF/Torch-Pruning: `num_heads`,
    `prune_num_heads`, `prune_head_dims`).
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from keras_taylor import _compat
from keras_taylor import criteria as criteria_lib
from keras_taylor import gates as gates_lib
from keras_taylor import handlers as handlers_lib
from keras_taylor import models as models_lib

L = keras.layers


def _is_gqa(layer) -> bool:
    return isinstance(layer, L.GroupQueryAttention)


def _parts(layer) -> dict:
    """`{role: EinsumDense}` of a built attention layer."""
    parts = {
        "query": getattr(layer, "_query_dense", None),
        "key": getattr(layer, "_key_dense", None),
        "value": getattr(layer, "_value_dense", None),
        "output": getattr(layer, "_output_dense", None),
    }
    if getattr(layer, "_use_gate", getattr(layer, "use_gate", False)):
        parts["gate"] = getattr(layer, "_gate_dense", None)
    missing = [k for k, v in parts.items() if v is None]
    if missing:
        raise ValueError(
            f"Expected a built {type(layer).__name__} with query/key/value/output "
            f"projections. Received: layer {layer.name!r} without {missing} (call it once "
            "on inputs first)."
        )
    return parts


def _shape_of(layer) -> dict:
    """Heads and per-head widths: `q_heads`, `kv_heads`, `key_dim`, `value_dim`."""
    if _is_gqa(layer):
        return dict(
            q_heads=int(layer.num_query_heads), kv_heads=int(layer.num_key_value_heads),
            key_dim=int(layer.head_dim), value_dim=int(layer.head_dim),
        )
    return dict(
        q_heads=int(layer.num_heads), kv_heads=int(layer.num_heads),
        key_dim=int(layer.key_dim), value_dim=int(layer.value_dim),
    )


def num_head_gates(layer) -> int:
    """Head gates of an attention layer: its heads (MHA) or key/value groups (GQA)."""
    return _shape_of(layer)["kv_heads"]


class AttentionHandler(handlers_lib.LayerHandler):
    """`MultiHeadAttention` and `GroupQueryAttention`: heads are channel groups.

    Channel maps: the layer makes one internal map of gate ids (heads; GQA:
    key/value groups; with `head_dims`, also value and QK dimensions), which
    is what its gate covers, followed by the maps of its query, value and key
    inputs (the value's when no key is passed), so that surgery and the cost
    model know which input is which. Output channels are new and fixed.
    Other tensors (an `attention_mask`) are fixed: their channels are not
    pruned.

    Args:
        head_dims: also gate value and QK dimensions of `MultiHeadAttention`
            (see `segments`). Defaults to `False`.
    """

    creates_channels = True
    needs_gate = True
    gate_wrapper = None  # set to `HeadGate` below

    def __init__(self, head_dims: bool = False, embedding: bool = False):
        for name, value in (("head_dims", head_dims), ("embedding", embedding)):
            if not isinstance(value, bool):
                raise TypeError(f"Expected {name} to be a bool. Received: {name}={value!r}")
        self.head_dims = head_dims
        self.embedding = embedding

    def prunes_output(self, layer) -> bool:
        """Whether the layer's output channels are prunable and gated: with
        `embedding=True`, for a `MultiHeadAttention` whose output projection
        makes one channel axis (GQA's output width follows its query's)."""
        return (
            self.embedding
            and not _is_gqa(layer)
            and len(_parts(layer)["output"].kernel.shape) == 3
        )

    def segments(self, layer) -> tuple:
        """`(heads, value dims, query/key dims)`: the gate slots of each kind.

        With `head_dims=True` a `MultiHeadAttention` also gets one gate per
        value dimension and one per query/key dimension, each shared by every
        head (Torch-Pruning's `prune_head_dims`: the same indices in every
        head). `GroupQueryAttention` has one `head_dim` for queries, keys and
        values, so it only gets head gates.
        """
        info = _shape_of(layer)
        if self.head_dims and not _is_gqa(layer):
            return info["kv_heads"], info["value_dim"], info["key_dim"]
        return info["kv_heads"], 0, 0

    def num_gates(self, layer) -> int:
        """Gate slots: heads (+ value and QK dims), then the output channels
        when `prunes_output` (they belong to the embedding group)."""
        out = int(_parts(layer)["output"].kernel.shape[-1]) if self.prunes_output(layer) else 0
        return sum(self.segments(layer)) + out

    def gate_needed(self, layer) -> bool:
        return True

    def mixes_inputs(self, layer, in_shapes) -> bool:
        return True

    @staticmethod
    def roles(layer, in_shapes, in_roles=None) -> tuple:
        """Indices of the `(query, value, key)` inputs among a call's tensors.

        From the call's argument names when the analysis knows them (a node's
        tensors are its positional arguments, then its keyword arguments by
        sorted name); otherwise the first two tensors are the query and the
        value, and a third is the key when it is shaped like the value (but
        for its channel axis) and as wide as the key projection's input.
        """
        if in_roles is not None and "query" in in_roles and "value" in in_roles:
            q, v = in_roles.index("query"), in_roles.index("value")
            return q, v, in_roles.index("key") if "key" in in_roles else v
        if (
            len(in_shapes) > 2
            and tuple(in_shapes[2][1:-1]) == tuple(in_shapes[1][1:-1])
            and in_shapes[2][-1] == _parts(layer)["key"].kernel.shape[0]
        ):
            return 0, 1, 2
        return 0, 1, 1

    def propagate(self, layer, in_maps, in_shapes, out_shapes, ctx):
        q, v, k = self.roles(layer, in_shapes, getattr(ctx, "in_roles", None))
        for i, m in enumerate(in_maps):
            if i not in (q, v, k):
                ctx.fix(m, f"is not the query, key or value of {layer.name!r} ({type(layer).__name__})")
        if _is_gqa(layer):  # its output width is its query width
            ctx.fix(in_maps[q], f"is the query of {layer.name!r} (GroupQueryAttention), whose output width follows it")
        heads = ctx.new_ids(sum(self.segments(layer)))
        h, nv, nq = self.segments(layer)
        if nv or nq or self.prunes_output(layer):
            # Keep one slot of each kind, so that no kind can empty the layer
            # while another is left (every head, or every value or QK dim; with
            # the output channels in the gate, a layer with output channels
            # left would not count as emptied by losing every head).
            keep = [0, h, h + nv] if nv or nq else [0]
            ctx.fix(heads[keep], f"is kept so that {layer.name!r} keeps a head, a value and a key dimension")
        outs = []
        for i, s in enumerate(out_shapes):
            ids = ctx.new_ids(s[-1] if len(s) > 1 else 1)
            if i or not self.prunes_output(layer):
                ctx.fix(ids, f"comes out of {layer.name!r} ({type(layer).__name__}), whose output channels are not pruned")
            outs.append(ids)
        gate_ids = np.concatenate([heads, outs[0]]) if self.prunes_output(layer) else heads
        internal = getattr(ctx, "internal", None)
        if internal is None:
            ctx.fix(gate_ids, "the analysis context keeps no internal maps")
        else:
            internal.extend([gate_ids, in_maps[q], in_maps[v], in_maps[k]])
        return outs

    def gate_variables(self, layer):
        parts = _parts(layer)
        names = ("value", "query") if self.segments(layer)[2] else ("value",)
        if self.prunes_output(layer):
            names = names + ("output",)
        return [v for n in names for v in (parts[n].kernel, getattr(parts[n], "bias", None)) if v is not None]

    def gate_scale(self, layer, variable, value, gate):
        # Value/query kernels (dim, heads, head_dim), biases (heads, head_dim):
        # heads on the second-to-last axis, head dimensions on the last.
        # Output kernel (heads, head_dim, dim) and bias (dim,): output
        # channels (the embedding) on the last axis, after the head slots.
        h, nv, nq = self.segments(layer)
        n = h + nv + nq
        output = _parts(layer)["output"]
        if variable is output.kernel or variable is getattr(output, "bias", None):
            return value * gate[n:]
        gate = gate[:n]
        if not nv and not nq:
            return value * ops.reshape(gate, (-1, 1))
        query = _parts(layer)["query"]
        if variable is query.kernel or variable is getattr(query, "bias", None):
            return value * gate[h + nv :]
        scale = ops.reshape(gate[:h], (-1, 1)) * ops.reshape(gate[h : h + nv], (1, -1))
        return value * scale

    def slice(self, layer, config, weights, kept_in, kept_out):
        info = _shape_of(layer)
        h, nv, nq = self.segments(layer)
        kept = np.asarray(kept_out[1], dtype=np.int64)
        kept = kept[kept < h + nv + nq]  # output slots (embedding) follow: kept_out[0]
        kept_groups = kept[kept < h]
        v_dims = kept[(kept >= h) & (kept < h + nv)] - h if nv else np.arange(info["value_dim"])
        qk_dims = kept[kept >= h + nv] - h - nv if nq else np.arange(info["key_dim"])
        if len(kept_groups) == 0 or len(v_dims) == 0 or len(qk_dims) == 0:
            raise ValueError(f"Expected at least one head left in layer {layer.name!r}. Received: a plan removing all.")
        ratio = info["q_heads"] // info["kv_heads"]
        q_heads = (kept_groups[:, None] * ratio + np.arange(ratio)[None, :]).reshape(-1)
        kv_heads = kept_groups
        # Internal maps after the output's: gates, query, value and key channels.
        rows = {"query": kept_out[2], "gate": kept_out[2], "value": kept_out[3], "key": kept_out[4]}
        heads = {"query": q_heads, "gate": q_heads, "key": kv_heads, "value": kv_heads}
        dims = {"query": qk_dims, "key": qk_dims, "value": v_dims, "gate": v_dims}
        # Keras scales queries by 1/sqrt(key_dim): fewer QK dims change it, so
        # the query projection absorbs the ratio (exact).
        q_scale = math.sqrt(len(qk_dims) / info["key_dim"])
        roles = {}
        for role, part in _parts(layer).items():
            roles[id(part.kernel)] = (role, "kernel")
            if getattr(part, "bias", None) is not None:
                roles[id(part.bias)] = (role, "bias")
        out = []
        for variable, w in zip(layer.weights, weights):
            role, kind = roles.get(id(variable), (None, None))
            if role is None:
                raise ValueError(
                    f"Expected only projection kernels and biases in {layer.name!r}. Received: "
                    f"variable {variable.path!r} (a LoRA or quantized layer?)."
                )
            if role == "output":
                w = w[q_heads][:, v_dims] if kind == "kernel" else w
                w = w[..., kept_out[0]]
            elif kind == "kernel":
                w = w[rows[role]][:, heads[role]][..., dims[role]]
            else:
                w = w[heads[role]][..., dims[role]]
            if role == "query" and q_scale != 1.0:
                w = (w * q_scale).astype(w.dtype)
            out.append(w)
        config = dict(config)
        if _is_gqa(layer):
            config["num_query_heads"] = int(len(q_heads))
            config["num_key_value_heads"] = int(len(kv_heads))
        else:
            config["num_heads"] = int(len(kv_heads))
            config["key_dim"] = int(len(qk_dims))
            config["value_dim"] = int(len(v_dims))
            if not config.get("output_shape"):
                # The output width defaults to the query width: pin it.
                config["output_shape"] = (int(len(kept_out[0])),)
        return config, out

    # ---- cost ------------------------------------------------------------------
    def cost_function(self, layer, node):
        return attention_cost(layer, node, self.segments(layer))


def attention_cost(layer, node, segments=None):
    """`fn(alive) -> (macs, params)` of one call of an attention layer.

    With `Pq`/`Pk` the query/key positions (product of the non-batch,
    non-channel dimensions), `Sk` the key positions over the attention axes,
    `Dq`/`Dk`/`Dv`/`Do` the query/key/value/output widths, `Hq`/`Hkv` the query
    and key/value heads (equal for MHA), `dk`/`dv` the per-head key and value
    widths, the multiply–accumulates are

        Q: Pq·Dq·Hq·dk    K: Pk·Dk·Hkv·dk    V: Pk·Dv·Hkv·dv
        QKᵀ: Pq·Sk·Hq·dk  AV: Pq·Sk·Hq·dv    out: Pq·Hq·dv·Do
        (+ gate, `use_gate=True`: Pq·Dq·Hq·dv)

    (Keras repeats GQA's keys and values, which costs no MACs; softmax and
    scaling count 0 like every activation). Params are the kernels and biases.
    """
    info = _shape_of(layer)
    ratio = info["q_heads"] // info["kv_heads"]
    h, nv, nq = segments or (info["kv_heads"], 0, 0)
    parts = _parts(layer)
    bias = getattr(layer, "_use_bias", getattr(layer, "use_bias", True))
    heads, q_ids, v_ids, k_ids = node.internal_maps[:4]
    q_shape = node.in_shapes[next(i for i, m in enumerate(node.in_maps) if m is q_ids)]
    v_shape = node.in_shapes[next(i for i, m in enumerate(node.in_maps) if m is v_ids)]
    pq = math.prod(q_shape[1:-1])
    pk = math.prod(v_shape[1:-1])
    axes = getattr(layer, "_attention_axes", None)
    if axes:
        rank = len(v_shape)
        sk = math.prod(v_shape[a % rank] for a in axes)
    else:
        sk = pk
    out_kernel = tuple(parts["output"].kernel.shape)
    out_extra = math.prod(out_kernel[2:-1])  # output_shape with more than one axis
    o_ids = node.out_maps[0]
    gate = "gate" in parts

    def count(ids, alive):
        return len(ids) if alive is None else int(np.count_nonzero(alive[ids]))

    def fn(alive):
        dq, dv_in, dk_in = count(q_ids, alive), count(v_ids, alive), count(k_ids, alive)
        hkv = count(heads[:h], alive)
        dv = count(heads[h : h + nv], alive) if nv else info["value_dim"]
        dk = count(heads[h + nv : h + nv + nq], alive) if nq else info["key_dim"]
        hq = hkv * ratio
        do = count(o_ids, alive) * out_extra
        macs = (
            pq * dq * hq * dk + pk * dk_in * hkv * dk + pk * dv_in * hkv * dv
            + pq * sk * hq * dk + pq * sk * hq * dv + pq * hq * dv * do
        )
        params = dq * hq * dk + dk_in * hkv * dk + dv_in * hkv * dv + hq * dv * do
        if bias:
            params += hq * dk + hkv * dk + hkv * dv + do
        if gate:
            macs += pq * dq * hq * dv
            params += dq * hq * dv + (hq * dv if bias else 0)
        return float(macs), float(params)

    return fn


@keras.saving.register_keras_serializable(package="keras_taylor")
class HeadGate(gates_lib.ChannelGate):
    """A gate per head of a `MultiHeadAttention` (per key/value group of a
    `GroupQueryAttention`), scaling the head's value projection.

    Called like the layer it wraps: `gate(query, value, key=None, **kwargs)`.
    Holds the same pruning state as `ChannelGate` (`gate`, `score`, `ema`,
    `counters`), one slot per head. Criteria that read activations
    (per-example Taylor, activation statistics) cannot score heads: the
    layer's output is not per head, and such a criterion is refused when the
    train step is traced.
    """

    def __init__(self, layer, mode: str | None = None, **kwargs):
        if mode not in (None, "params"):
            raise ValueError(f"Expected mode 'params' for a head gate. Received: mode={mode!r}")
        super().__init__(layer, mode="params", **kwargs)

    def build(self, query_shape, value_shape, key_shape=None):
        if not self.layer.built:
            self.layer.build(query_shape, value_shape, key_shape)
        self.mode = "params"
        self._axis = len(query_shape) - 1
        self._add_state(self._handler.num_gates(self.layer))
        self.built = True

    def call(self, query, value, key=None, **kwargs):
        if getattr(gates_lib._recorder, "calls", None) is not None:
            raise ValueError(
                f"Expected a criterion that scores gates from gradients (taylor_fo_bn, "
                f"taylor_so, taylor_fo_weight, ...). Received: a criterion that reads "
                f"activations, which cannot score the heads of {self.name!r}."
            )
        gated = self._handler.gate_variables(self.layer)
        mapping = [
            (v, self._handler.gate_scale(self.layer, v, v.value, ops.cast(self.gate, v.dtype))) for v in gated
        ]
        if key is not None:
            kwargs["key"] = key
        with keras.StatelessScope(state_mapping=mapping) as scope:
            y = self.layer(query, value, **kwargs)
        mapped = {id(v) for v in gated}
        for v in self.layer.variables:  # dropout seed state
            if id(v) not in mapped:
                new = scope.get_current_value(v)
                if new is not None:
                    v.assign(new)
        return y

    def compute_output_spec(self, *args, **kwargs):
        return self.layer.compute_output_spec(*args, **kwargs)

    def compute_output_shape(self, *args, **kwargs):
        return self.layer.compute_output_shape(*args, **kwargs)


AttentionHandler.gate_wrapper = HeadGate


class TokenHandler(handlers_lib.LayerHandler):
    """`keras_taylor.models.ClassTokenPosition`: per-channel class token and
    position embedding, so channels stay apart. It adds learned vectors, so a
    removed channel would become non-zero: a gate scales both (parameter-side,
    `cls·m` and `pos·m`), so the channel stays exactly zero when its group's
    gate is 0."""

    needs_gate = True

    def gate_variables(self, layer):
        return [layer.cls, layer.pos]

    def slice(self, layer, config, weights, kept_in, kept_out):
        return config, [w[..., kept_out[0]] for w in weights]

    def params(self, layer, in_shapes, out_shapes):
        return handlers_lib.Cost(b=float(out_shapes[0][-2] + 1))


class PatchEmbeddingHandler(handlers_lib.LayerHandler):
    """A patch-embedding layer that holds every parameter writing the
    embedding channels itself: KerasHub's `ViTPatchingAndEmbedding` (a
    Conv2D patch embedding, a class token and a position `Embedding`) and
    `DeiTEmbeddings` (also a distillation and a mask token). Registered by
    `prune_embedding` when keras_hub is importable.

    Every weight of the layer has the embedding channels on its last axis
    (the patch kernel `(ph, pw, C, D)`, its bias, the tokens `(1, 1, D)`, the
    positions `(P, D)` or `(1, P, D)`), and the output is
    `concat(tokens, conv(x)) + pos` per channel, so channels stay apart and
    the layer makes the group's channels, like a Conv. It adds learned
    vectors, so a gate scales all of them (parameter-side, as `TokenHandler`):
    a channel whose gate is 0 is exactly zero. Surgery slices every weight's
    last axis and writes the kept count into `hidden_dim`.
    """

    creates_channels = True
    needs_gate = True

    def propagate(self, layer, in_maps, in_shapes, out_shapes, ctx):
        return [ctx.new_ids(out_shapes[0][-1])]

    def gate_variables(self, layer):
        return list(layer.weights)

    @staticmethod
    def _conv(layer):
        convs = [l for l in layer._flatten_layers(include_self=False) if isinstance(l, L.Conv2D)]
        if len(convs) != 1:
            raise ValueError(
                f"Expected one Conv2D patch embedding in {layer.name!r} ({type(layer).__name__}). "
                f"Received: {len(convs)}."
            )
        return convs[0]

    def slice(self, layer, config, weights, kept_in, kept_out):
        config = dict(config)
        config["hidden_dim"] = int(len(kept_out[0]))
        if hasattr(layer, "use_patch_bias"):  # ViT: not in its get_config
            config["use_patch_bias"] = bool(layer.use_patch_bias)
        kernel_shape = tuple(self._conv(layer).kernel.shape)
        out = []
        for w in weights:
            if tuple(w.shape) == kernel_shape:  # (ph, pw, C, D): input channels too
                w = w[..., kept_in[0], :]
            out.append(w[..., kept_out[0]])
        return config, out

    def macs(self, layer, in_shapes, out_shapes):
        conv = self._conv(layer)
        spatial = in_shapes[0][1:3] if conv.data_format == "channels_last" else in_shapes[0][2:4]
        patches = math.prod(int(s) // int(k) for s, k in zip(spatial, conv.strides))
        return handlers_lib.Cost(a=float(patches * math.prod(conv.kernel_size)))

    def params(self, layer, in_shapes, out_shapes):
        conv = self._conv(layer)
        per_channel = sum(math.prod(w.shape) for w in layer.weights if w is not conv.kernel) / int(conv.kernel.shape[-1])
        return handlers_lib.Cost(a=float(math.prod(conv.kernel_size)), b=float(per_channel))


class EmbeddingNormHandler(handlers_lib.LayerHandler):
    """`LayerNormalization` over the channel axis as a member of the
    embedding (residual-stream) group, opt-in through `prune_embedding`.

    Removing a channel under a LayerNormalization changes the mean and
    variance of the others, so a stock LayerNormalization with a zero
    channel is not the pruned one. The gate (`NormGate`) therefore sits on
    the normalisation itself: with gate `m` it computes the statistics over
    the live channels only and scales the output (Keras's formula otherwise,
    `epsilon` included),

        μ = Σ_c m_c x_c / Σ_c m_c,   σ² = Σ_c m_c (x_c − μ)² / Σ_c m_c,
        y_c = m_c (γ_c (x_c − μ) / √(σ² + ε) + β_c),

    which for `m ∈ {0, 1}` is exactly the pruned layer (so surgery equals
    masking) and at `m = 1` is the layer itself (so the gated model computes
    the same function). `∂L/∂m_c` then includes the effect of channel `c` on
    the statistics, which a gate on `γ, β` alone would miss. The price: the
    gated LayerNormalization is computed by the gate (same work as the
    layer's own, activation-sized, unlike the parameter-side BN gate).

    A LayerNormalization over other axes, or over several, keeps its channels
    (as without embedding pruning).
    """

    needs_gate = True

    @staticmethod
    def _over_channels(layer, rank, axis) -> bool:
        axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
        return axis is not None and [int(a) % rank for a in axes] == [axis]

    def propagate(self, layer, in_maps, in_shapes, out_shapes, ctx):
        rank = len(in_shapes[0])
        axis = ctx.in_axes[0] if ctx.in_axes else rank - 1
        if not self._over_channels(layer, rank, axis):
            ctx.fix(in_maps[0], f"{layer.name!r} ({type(layer).__name__}) normalises over other axes than the channels")
        elif layer.rms_scaling:
            ctx.fix(in_maps[0], f"{layer.name!r} (LayerNormalization) uses the deprecated rms_scaling")
        return [in_maps[0]]

    def slice(self, layer, config, weights, kept_in, kept_out):
        return config, [w[kept_out[0]] for w in weights]

    def params(self, layer, in_shapes, out_shapes):
        return handlers_lib.Cost(b=float(layer.gamma is not None) + float(layer.beta is not None))


@keras.saving.register_keras_serializable(package="keras_taylor")
class NormGate(gates_lib.ChannelGate):
    """The gate of a `LayerNormalization` in the embedding group: it computes
    the normalisation over the live channels (see `EmbeddingNormHandler`).

    Its mode is `"output"`: `strip_gates` folds it only while every gate is
    1; `keras_taylor.prune` removes the gated channels.
    """

    def __init__(self, layer, mode: str | None = None, **kwargs):
        if mode not in (None, "output"):
            raise ValueError(f"Expected mode 'output' for a LayerNormalization gate. Received: mode={mode!r}")
        if not isinstance(layer, L.LayerNormalization):
            raise ValueError(
                f"Expected a LayerNormalization. Received: layer={getattr(layer, 'name', layer)!r} "
                f"of class {type(layer).__name__}."
            )
        super().__init__(layer, mode="output", **kwargs)

    def build(self, input_shape):
        super().build(input_shape)
        self.mode = "output"

    def call(self, inputs, training=None, mask=None):
        if getattr(gates_lib._recorder, "calls", None) is not None:
            raise ValueError(
                "Expected a criterion that scores gates from gradients (taylor_fo_bn, taylor_so, ...). "
                f"Received: a criterion that reads activations, which cannot score the embedding at {self.name!r}."
            )
        layer = self.layer
        dtype = "float32" if keras.backend.standardize_dtype(inputs.dtype) in ("float16", "bfloat16") else inputs.dtype
        x = ops.cast(inputs, dtype)
        m = ops.cast(self.gate, dtype)
        live = ops.maximum(ops.sum(m), 1.0)
        mean = ops.sum(m * x, axis=-1, keepdims=True) / live
        centred = x - mean
        var = ops.sum(m * centred * centred, axis=-1, keepdims=True) / live
        y = centred * ops.rsqrt(var + layer.epsilon)
        if layer.gamma is not None:
            y = y * ops.cast(layer.gamma, dtype)
        if layer.beta is not None:
            y = y + ops.cast(layer.beta, dtype)
        return ops.cast(y * m, inputs.dtype)


EmbeddingNormHandler.gate_wrapper = NormGate


def prune_embedding(enabled: bool = True, head_dims: bool = False) -> None:
    """Makes the embedding (residual-stream) width of transformers prunable.

    Registers `EmbeddingNormHandler` for `keras.layers.LayerNormalization`
    and `AttentionHandler(head_dims=head_dims, embedding=True)` for
    `keras.layers.MultiHeadAttention`, so the channels of a ViT's residual
    stream become one channel group: the patch embedding's filters, the
    class token and position embedding (`ClassTokenPosition`), every
    residual `Add`, every LayerNormalization's `gamma`/`beta`, the input
    channels of every query/key/value projection and MLP, the output
    channels of every attention output projection and MLP, and the input
    rows of the head. Each of them that makes or shifts the channel gets a
    gate (patch embedding, tokens, attention output, second MLP Dense, every
    LayerNormalization), and the group's score is the sum of their gate
    gradients (NViT's embedding score, Yang et al. CVPR 2023, sums
    `w·∂L/∂w` over the same parameters).

    Off by default: removing a channel under LayerNormalization changes the
    other channels' mean and variance, so a pruned model is close to, not
    equal to, the masked one (see `EmbeddingNormHandler` and
    docs/attention.md). Call it before `add_gates` (and keep it on while the
    gated model is trained and pruned); `prune_embedding(False)` restores
    the default handlers. `GroupQueryAttention` keeps its output width (it
    follows the query width), so a stream through GQA stays whole.

    When keras_hub is importable it also registers `PatchEmbeddingHandler`
    for KerasHub's `ViTPatchingAndEmbedding`, `DeiTEmbeddings` and
    `DINOV2Embedding`, and `ChannelScaleHandler` for `DINOV2LayerScale`, so
    the embedding width of `ViTBackbone`, `DeiTBackbone` and
    `DINOV2Backbone` prunes too (keras_hub is imported here, not when
    keras_taylor is); `prune_embedding(False)` removes them.

    Args:
        enabled: register the embedding handlers (`True`) or the defaults
            (`False`). Defaults to `True`.
        head_dims: passed to `AttentionHandler`. Defaults to `False`.

    Raises:
        TypeError: if `enabled` or `head_dims` is not a bool.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"Expected enabled to be a bool. Received: enabled={enabled!r}")
    handler = AttentionHandler(head_dims=head_dims, embedding=enabled)
    handlers_lib.register_handler(L.MultiHeadAttention, handler)
    handlers_lib.register_handler(L.LayerNormalization, EmbeddingNormHandler() if enabled else handlers_lib.FixingHandler())
    # KerasHub's patch embeddings and DINOv2's LayerScale: registered while
    # embedding pruning is on (without it the stream is fixed at the first
    # LayerNormalization anyway), and only then is keras_hub imported.
    handlers_lib._REGISTRY[:] = [e for e in handlers_lib._REGISTRY if not any(e is r for r in _KERASHUB_REGISTERED)]
    _KERASHUB_REGISTERED.clear()
    if enabled:
        found = _compat.kerashub_embedding_layers()
        for name, handler in (
            ("ViTPatchingAndEmbedding", PatchEmbeddingHandler()),
            ("DeiTEmbeddings", PatchEmbeddingHandler()),
            ("DINOV2Embedding", PatchEmbeddingHandler()),
            ("DINOV2LayerScale", handlers_lib.ChannelScaleHandler()),
        ):
            if name in found:
                handlers_lib.register_handler(found[name], handler)
                _KERASHUB_REGISTERED.append(handlers_lib._REGISTRY[0])


_KERASHUB_REGISTERED: list = []  # registry entries prune_embedding made for KerasHub layers


# ---- ranking across kinds ---------------------------------------------------------

@keras.saving.register_keras_serializable(package="keras_taylor")
class PerFlop(criteria_lib.Criterion):
    """Any criterion's score divided by the FLOPs of the group it scores.

    Heads, MLP units and conv channels cost very different FLOPs: a head of a
    ViT block costs `Pq·D·dk·2 + ...` MACs, an MLP unit `2·P·D`. Ranking by
    importance per unit of cost (`score / FLOPs_g`, FLOPs normalised by the
    largest group's, `RankingContext.group_flops`) removes first what buys
    the most FLOPs per unit of lost importance — NViT's latency-aware
    ranking with FLOPs as the cost. Groups whose removal saves no FLOPs are
    ranked last. The FLOPs/params target of `TaylorPruning` stays the one
    knob: only the order changes.

    The default Taylor-FO score is a square, `(∂L/∂m)²`, so it grows with
    the square of a unit's contribution while FLOPs grow linearly: `power=0.5`
    ranks by `|∂L/∂m|` per FLOP (Michel et al.'s head importance per unit of
    cost) instead.

    Args:
        criterion: the base criterion id or instance. Defaults to
            `"taylor_fo_bn"`.
        power: the base criterion's ranking score is raised to this power
            (> 0) before the division. Defaults to `1.0`.

    Example:

    ```python
    pruner = kt.TaylorPruning(target=0.5, criterion=kt.attention.PerFlop("taylor_fo_bn"))
    ```
    """

    name = "per_flop"

    def __init__(self, criterion="taylor_fo_bn", power: float = 1.0):
        if isinstance(criterion, PerFlop):
            raise ValueError("Expected a base criterion. Received: criterion=PerFlop(...)")
        if isinstance(power, bool) or not isinstance(power, (int, float)) or not power > 0:
            raise ValueError(f"Expected power to be a number > 0. Received: power={power!r}")
        self.power = float(power)
        self.base = criteria_lib.get(criterion)
        self.uses_activations = self.base.uses_activations

    def build(self, num_groups):
        self.base.build(num_groups)

    def batch_score(self, signals):
        return self.base.batch_score(signals)

    def rank(self, scores, context):
        ranked = np.asarray(self.base.rank(scores, context), dtype="float64")
        if self.power != 1.0:
            ranked = np.sign(ranked) * np.abs(ranked) ** self.power
        flops = context.group_flops()
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(flops > 0, ranked / np.where(flops > 0, flops, 1.0), np.inf)
        return out

    def get_config(self):
        return {"criterion": self.base if self.base.get_config() else self.base.name, "power": self.power}


for _cls in (L.MultiHeadAttention, L.GroupQueryAttention):
    handlers_lib.register_handler(_cls, AttentionHandler())
handlers_lib.register_handler(models_lib.ClassTokenPosition, TokenHandler())
del _cls
