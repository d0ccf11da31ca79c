"""Nested models: inline Functional/Sequential sub-models into one flat graph.

A model used as a layer of another model (a `keras.applications` backbone, a
`keras.Sequential` block inside a functional model, a siamese twin called
twice) hides its layers from the channel analysis. `inline_nested_models`
returns an equivalent Functional model in which every such sub-model,
recursively, is replaced by its own layers wired directly into the outer
graph, so `analyze`, `add_gates` and `apply_plan` see every Conv and BN.

How:

* The outer graph and each sub-model's graph are replayed node by node with
  the recorded call arguments (constants such as the `3.0` of `x + 3.0`,
  keyword arguments such as `training=False`) on the new tensors
  (`_compat.run_graph`). A node that calls a sub-model is replaced by a replay
  of that sub-model's graph on the node's input tensors; its `InputLayer`s
  disappear.
* Every layer (and `keras.ops` operation) is *cloned* from its config, and the
  weights (trainable and not: BN moving statistics) are copied afterwards. The
  user's layers are never called, so they get no new inbound nodes and their
  weights stay their own. Cloning from the config keeps the dtype policy and
  the `trainable` flag.
* One clone per original layer: a sub-model called twice (shared), or a layer
  shared between sub-models, maps to the same clone on every call, so weights
  stay tied.
* A sub-model called with `training=...` (the transfer-learning
  `backbone(x, training=False)`) passes that value to each of its layers that
  takes `training`, which is what `Functional.call` does; a `training` given
  to the outer model at run time still overrides it, as in Keras.

`keras.models.clone_model(..., recursive=True)` clones sub-models but keeps
them nested (and `clone_model(sub, input_tensors=...)` re-roots tensors of the
outer graph), so it cannot do this; the replay it uses internally is what
`_compat.run_graph` exposes.
"""

from __future__ import annotations

import collections
import inspect
import warnings

import keras

from keras_taylor import _compat

_SUBMODEL_CALL_ARGS = ("inputs", "training", "mask")


_LAYER_KWARGS = frozenset({"name", "trainable", "dtype", "autocast", "input_dim", "input_shape", "batch_input_shape", "batch_size", "weights", "activity_regularizer"})


def rebuild_layer(layer, config: dict | None = None):
    """A new layer of the class of `layer` from `config` (its own by default).

    Some library layers' `get_config` lists values their `__init__` does not
    take (KerasHub's `ViTPatchingAndEmbedding`: `num_patches`): then the
    config is retried without the keys the class's `__init__` does not
    accept. Raises the first error when that does not help either.
    """
    config = dict(layer.get_config() if config is None else config)
    if isinstance(layer, keras.layers.Lambda):
        # Keras's safe mode refuses a Lambda's Python code when *loading*
        # files; this config comes from a live layer the user holds, so
        # nothing is loaded.
        return layer.__class__.from_config(config, safe_mode=False)
    try:
        return layer.__class__.from_config(config)
    except Exception as first:  # noqa: BLE001 - retried below, re-raised if it fails too
        try:
            params = inspect.signature(layer.__class__.__init__).parameters
        except (TypeError, ValueError):
            raise first from None
        named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        trimmed = {k: v for k, v in config.items() if k in named or k in _LAYER_KWARGS}
        if trimmed == config:
            raise first from None
        try:
            return layer.__class__.from_config(trimmed)
        except Exception:  # noqa: BLE001
            raise first from None


def _check_rebuilt_weights(layer, new) -> None:
    """Raises ValueError when `new` (rebuilt from the config of built
    `layer`) makes other weights than `layer` holds: its config does not
    describe it (KerasHub's `HierarchicalTransformerEncoder.get_config`
    omits `sr_ratio`, so a copy lacks the attention's reduction conv).

    `new` is built here from `layer`'s build config, or, when that makes
    fewer weights (sublayers built in `call`), by a symbolic call on one
    input of the recorded shape. A copy that neither builds is not judged.
    """
    if not layer.built or not layer.weights or new.built:
        return
    want = [tuple(v.shape) for v in layer.weights]
    build_config = layer.get_build_config() or {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Keras: a default `build()` with sublayers
            new.build_from_config(build_config)
            shape = build_config.get("input_shape")
            if len(new.weights) < len(want) and isinstance(shape, (tuple, list)) and all(d is None or isinstance(d, int) for d in shape):
                new(keras.KerasTensor(tuple(shape), dtype=layer.compute_dtype))
    except Exception:  # noqa: BLE001 - not judged; the caller rebuilds it afresh
        raise _Unjudged() from None
    got = [tuple(v.shape) for v in new.weights]
    if got and got != want:
        raise ValueError(
            f"its copy makes {len(got)} weights where it has {len(want)}"
            + ("" if len(got) != len(want) else " (other shapes)")
            + ": its config does not describe it"
        )


class _Unjudged(Exception):
    """The copy could not be built ahead of its call (see `_check_rebuilt_weights`)."""


def copy_layer(layer, config: dict | None = None):
    """`(new_layer, copied)`: a copy of `layer` built from its config, or
    `layer` itself (with a warning) when no config rebuilds it.

    Used for layers whose channels do not change (add_gates, surgery,
    inlining): such a layer need not be re-created, so one whose config is
    broken is reused as is (its weights are then shared with the source
    model) instead of failing the whole model.
    """
    try:
        new = rebuild_layer(layer, config)
        try:
            _check_rebuilt_weights(layer, new)
        except _Unjudged:
            new = rebuild_layer(layer, config)  # unbuilt: built when called
        return new, True
    except Exception as e:  # noqa: BLE001 - reported, the layer is reused
        if isinstance(layer, keras.layers.Identity) and not layer.weights:
            # An Identity whose config is broken (made with unserialisable
            # arguments): a stock one does the same.
            return keras.layers.Identity(name=layer.name, dtype=layer.dtype_policy.name), True
        warnings.warn(
            f"Layer {layer.name!r} of class {type(layer).__name__} cannot be "
            f"rebuilt from its config ({type(e).__name__}: {str(e)[:200]}); it "
            "is reused as is (its channels do not change), so the new model "
            "shares its weights with the source model.",
            stacklevel=3,
        )
        return layer, False


def _graph_operations(model) -> list:
    """Distinct layers/ops called in the graph of `model`, in topological
    order, without `InputLayer`s."""
    seen, ops = set(), []
    for op, _, _ in _compat.nodes_in_order(model):
        if id(op) not in seen:
            seen.add(id(op))
            ops.append(op)
    return ops


def has_nested_models(model) -> bool:
    """True if a layer of the graph of `model` is itself a `keras.Model`.

    Returns False for a model whose graph cannot be read (a subclassed model);
    `analyze` reports that case.
    """
    try:
        ops = _graph_operations(model)
    except ValueError:
        return False
    return any(isinstance(op, keras.Model) for op in ops)


def _check_inlinable(sub, chain) -> None:
    if _compat.is_graph_model(sub):
        return
    where = " > ".join(m.name for m in (*chain, sub))
    raise ValueError(
        f"Cannot inline the nested model {sub.name!r} of class "
        f"{type(sub).__name__} (at {where}): it is a subclassed keras.Model "
        "(or its class overrides `call`), so its layer graph cannot be read. "
        "Rebuild it with the functional API (`keras.Model(inputs, outputs)`) "
        "or as a `keras.Sequential`, or call its layers directly in the outer "
        "model, then prune."
    )


def _plan_names(model) -> dict:
    """`{id(op): name}` for every layer/op of the flattened graph.

    Layers of the outer model keep their names. A layer of a sub-model keeps
    its name when no other layer of the flattened model has it; otherwise it
    gets the name of its sub-model as prefix (`"{sub}_{layer}"`, then
    `"{outer_sub}_{sub}_{layer}"`, then a numeric suffix) until unique.
    Validates every nested model on the way (raises for subclassed ones).
    """
    entries = []  # (op, chain of enclosing sub-models, outermost first)
    seen_ops, seen_models = set(), set()

    def collect(m, chain):
        for op in _graph_operations(m):
            if isinstance(op, keras.Model):
                _check_inlinable(op, chain)
                if id(op) not in seen_models:
                    seen_models.add(id(op))
                    collect(op, (*chain, op))
            elif id(op) not in seen_ops:
                seen_ops.add(id(op))
                entries.append((op, chain))

    collect(model, ())
    counts = collections.Counter(op.name for op, _ in entries)
    names, taken = {}, set()
    for op, chain in entries:
        if not chain or counts[op.name] == 1:
            names[id(op)] = op.name
            taken.add(op.name)
    for op, chain in entries:
        if id(op) in names:
            continue
        candidates = ["_".join(m.name for m in chain[-k:]) + "_" + op.name for k in range(1, len(chain) + 1)]
        free = [c for c in candidates if c not in taken and c not in counts]
        if free:
            name = free[0]
        else:
            i = 1
            while f"{candidates[0]}_{i}" in taken or f"{candidates[0]}_{i}" in counts:
                i += 1
            name = f"{candidates[0]}_{i}"
        names[id(op)] = name
        taken.add(name)
    return names


class _Inliner:
    def __init__(self, names: dict):
        self.names = names
        self.clones = {}  # id(original op) -> clone
        self.pairs = []  # (original layer, cloned layer), for the weights
        self._params = {}

    def clone(self, op):
        key = id(op)
        if key in self.clones:
            return self.clones[key]
        name = self.names[key]
        if isinstance(op, keras.layers.Layer):
            try:
                config = op.get_config()
                config["name"] = name
                new = rebuild_layer(op, config)
                try:
                    _check_rebuilt_weights(op, new)
                except _Unjudged:
                    new = rebuild_layer(op, config)  # unbuilt: built when called
            except Exception as e:
                if name != op.name:
                    raise ValueError(
                        f"Cannot copy layer {op.name!r} of class {type(op).__name__} "
                        f"from its config ({type(e).__name__}: {e}), and its name "
                        f"clashes in the inlined model. Give the layer a "
                        "`get_config()` that `from_config` accepts."
                    ) from e
                new, _ = copy_layer(op)
            if new is not op:
                self.pairs.append((op, new))
        else:
            # A stateless `keras.ops` operation (`x + 3.0`).
            try:
                config = op.get_config()
                config["name"] = name
                new = op.__class__.from_config(config)
            except Exception:
                if name != op.name:
                    raise ValueError(
                        f"Cannot rename operation {op.name!r} of class "
                        f"{type(op).__name__}, whose name clashes in the "
                        "inlined model, as it has no usable config."
                    ) from None
                new = op  # stateless: reusing it is harmless for the result
        self.clones[key] = new
        return new

    def _takes(self, layer, arg: str) -> bool:
        if isinstance(layer, keras.Model):
            return True  # inlined below: the value goes to its layers
        key = id(layer)
        if key not in self._params:
            self._params[key] = set(inspect.signature(layer.call).parameters)
        return arg in self._params[key]

    def call_fn(self, context: dict):
        """The replay function for one graph; `context` holds call-context
        arguments (`training`) given to the sub-model being inlined."""

        def call(op, *args, **kwargs):
            if context and isinstance(op, keras.layers.Layer):
                for arg, value in context.items():
                    if self._takes(op, arg):
                        kwargs[arg] = value  # as `Functional.call` does
            if isinstance(op, keras.Model):
                return self.inline_call(op, args, kwargs)
            return self.clone(op)(*args, **kwargs)

        return call

    def inline_call(self, sub, args, kwargs):
        if len(args) > len(_SUBMODEL_CALL_ARGS):
            raise ValueError(
                f"Cannot inline a call of nested model {sub.name!r} with "
                f"{len(args)} positional arguments."
            )
        bound = dict(zip(_SUBMODEL_CALL_ARGS, args))
        bound.update(kwargs)
        inputs = bound.pop("inputs")
        mask = bound.pop("mask", None)
        if any(m is not None for m in keras.tree.flatten(mask)):
            raise ValueError(
                f"Cannot inline nested model {sub.name!r}: it is called with an "
                "explicit `mask=`. Call it without `mask` (Keras masks travel "
                "with the tensors)."
            )
        context = {k: v for k, v in bound.items() if v is not None}
        fn = _compat.functional_of(sub)
        return _compat.run_graph(fn, _match_inputs(sub, fn, inputs), self.call_fn(context))


def _match_inputs(sub, fn, inputs) -> list:
    """The flat list of tensors for `fn.inputs`, converted like
    `Functional.call` converts them (dtype cast, rank off by a trailing 1)."""
    refs = list(fn.inputs)
    if isinstance(inputs, dict) and not isinstance(fn.input, dict) and {r.name for r in refs} <= set(inputs):
        flat = [inputs[r.name] for r in refs]
    else:
        flat = keras.tree.flatten(inputs)
    if len(flat) != len(refs):
        raise ValueError(
            f"Cannot inline nested model {sub.name!r}: it expects {len(refs)} "
            f"inputs and is called on {len(flat)}."
        )
    matched = []
    for x, ref in zip(flat, refs):
        if x is None:
            raise ValueError(f"Cannot inline nested model {sub.name!r}: an optional input is None.")
        if x.dtype != ref.dtype:
            x = keras.ops.cast(x, ref.dtype)
        rank, ref_rank = len(x.shape), len(ref.shape)
        if rank == ref_rank + 1 and x.shape[-1] == 1:
            x = keras.ops.squeeze(x, axis=-1)
        elif rank == ref_rank - 1 and ref.shape[-1] == 1:
            x = keras.ops.expand_dims(x, axis=-1)
        matched.append(x)
    return matched


def inline_nested_models(model: keras.Model) -> keras.Model:
    """Returns `model` with every nested Functional/Sequential model inlined.

    Args:
        model: a built Functional or Sequential model.

    Returns:
        `model` itself if no layer of it is a model. Otherwise a new Functional
        model (same name, inputs and output structure; output names are
        those of the layers that now make the outputs) computing the same
        function, whose layers are copies of the original layers (weights
        copied, nested ones renamed `"{submodel}_{layer}"` on a name clash);
        a sub-model called several times shares its copied layers between the
        calls. The user's model and layers are not modified.

    Raises:
        ValueError: if a nested model is a subclassed model (its graph cannot
            be read), or a layer cannot be copied from its config.
    """
    if not has_nested_models(model):
        return model
    names = _plan_names(model)
    fn = _compat.functional_of(model)
    inputs = keras.tree.map_structure(
        lambda x: keras.Input(batch_shape=x.shape, dtype=x.dtype, sparse=x.sparse, name=x.name),
        fn.input,
    )
    inliner = _Inliner(names)
    outputs = _compat.run_graph(fn, keras.tree.flatten(inputs), inliner.call_fn({}))
    flat = keras.Model(inputs, outputs, name=model.name)
    for src, dst in inliner.pairs:
        dst.set_weights(src.get_weights())
    if not model.trainable:
        flat.trainable = False
    if model.compiled:
        # As `keras.models.clone_model` does. Output names change (an output
        # made by a sub-model is now named after its inner layer), so a
        # compile config keyed by output name may not fit: then leave it.
        try:
            flat.compile_from_config(model.get_compile_config())
        except Exception as e:  # noqa: BLE001
            warnings.warn(
                f"The inlined model of {model.name!r} is not compiled: its "
                f"compile config did not apply ({type(e).__name__}: {e}). "
                "Compile it again.",
                stacklevel=2,
            )
    return flat
