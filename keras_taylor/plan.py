"""`PruningPlan`: which channels to remove, as plain JSON-able data.

A plan maps layer names to the output channel indices to remove. Plans that
keras_taylor writes are keyed by gate sites: the BatchNormalization after a
Conv/Dense when one follows, else the Conv/Dense itself. A plan written by
hand may name the Conv/Dense instead (or any layer that creates channels):
its output channel `i` is the BN's channel `i`, so both name the same
channel. Channels tied in a group (residual adds) are removed together:
naming one member removes the whole group, and `PruningPlan.from_groups`
always lists every member.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import keras
import numpy as np

from keras_taylor import graph as graph_lib

FORMAT = "keras_taylor.plan/1"


def _is_index(i) -> bool:
    return isinstance(i, (int, np.integer)) and not isinstance(i, bool)


@dataclass
class PruningPlan:
    """Channels to remove, per gated layer.

    Attributes:
        removed: `{layer_name: sorted list of removed output channel indices}`,
            keyed by gate sites (`keras_taylor.analyze(model).gate_sites`) or
            by the Conv/Dense layers that create the channels.
        model_name: name of the model the plan was made for (informative).
    """

    removed: dict = field(default_factory=dict)
    model_name: str = ""

    def __post_init__(self):
        if not isinstance(self.removed, dict):
            raise ValueError(
                "Expected 'removed' to map layer names to lists of integer "
                f"channel indices. Received: removed={str(self.removed)[:200]}"
            )
        for name, idx in self.removed.items():
            if not isinstance(name, str) or isinstance(idx, (str, bytes)) or not hasattr(idx, "__iter__"):
                raise ValueError(
                    "Expected 'removed' to map layer names to lists of integer "
                    f"channel indices. Received: {name!r}: {str(idx)[:100]}"
                )
            bad = [i for i in idx if not _is_index(i)]
            if bad:
                raise ValueError(
                    f"Expected integer channel indices for layer {name!r}. "
                    f"Received: {bad[:5]}"
                )
        self.removed = {k: sorted(int(i) for i in v) for k, v in self.removed.items()}

    # ---- construction ---------------------------------------------------
    @classmethod
    def from_groups(cls, graph: graph_lib.ChannelGraph, groups) -> "PruningPlan":
        """The plan that removes the given channel groups of `graph`."""
        groups = set(int(g) for g in groups)
        removed = {}
        for name in graph.gate_sites:
            of = graph.groups_of_layer_output(name)
            idx = [i for i, g in enumerate(of.tolist()) if g in groups]
            if idx:
                removed[name] = idx
        return cls(removed=removed, model_name=graph.model_name)

    @classmethod
    def from_gates(cls, model: keras.Model) -> "PruningPlan":
        """The plan that removes every channel whose gate is 0 in a gated model."""
        from keras_taylor.flops import removed_groups_from_gates

        graph = graph_lib.analyze(model, on_unknown="freeze")
        return cls.from_groups(graph, removed_groups_from_gates(model, graph))

    # ---- use ---------------------------------------------------------------
    @property
    def num_removed(self) -> int:
        return sum(len(v) for v in self.removed.values())

    def removed_groups(self, graph: graph_lib.ChannelGraph) -> set:
        """Group indices of `graph` that this plan removes.

        Raises:
            ValueError: if the plan names a layer that is neither a gate site
                nor a channel-creating (Conv/Dense) layer of the model, a
                channel index out of range, or a channel that cannot be pruned.
        """
        sites = set(graph.gate_sites)
        creating = graph.creating_layers()
        groups = set()
        for name, idx in self.removed.items():
            if name not in sites and not (
                name in creating and (graph.groups_of_layer_output(name) >= 0).any()
            ):
                raise ValueError(
                    f"Expected the plan's layers to be prunable layers of model "
                    f"{graph.model_name!r} (gate sites {sorted(sites)}, or the "
                    f"Conv/Dense layers that feed them). Received: a plan "
                    f"that prunes layer {name!r}."
                )
            of = graph.groups_of_layer_output(name)
            for i in idx:
                if not 0 <= int(i) < len(of):
                    raise ValueError(
                        f"Expected channel indices of layer {name!r} in [0, {len(of)}). "
                        f"Received: {i}."
                    )
                if of[int(i)] < 0:
                    raise ValueError(
                        f"Channel {i} of layer {name!r} cannot be pruned. Received: "
                        f"a plan that removes it."
                    )
                groups.add(int(of[int(i)]))
        return groups

    # ---- serialization --------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "model_name": self.model_name,
            "removed": {k: [int(i) for i in v] for k, v in self.removed.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> "PruningPlan":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(
                f"Expected a plan dict with format={FORMAT!r}. Received: "
                f"{str(data)[:200]!r}"
            )
        removed = data.get("removed")
        if not isinstance(removed, dict) or not all(
            isinstance(k, str) and isinstance(v, list) and all(_is_index(i) for i in v)
            for k, v in removed.items()
        ):
            raise ValueError(
                "Expected 'removed' to map layer names to lists of channel "
                f"indices. Received: {str(removed)[:200]!r}"
            )
        return cls(removed={k: sorted(v) for k, v in removed.items()}, model_name=str(data.get("model_name", "")))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "PruningPlan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"Expected a JSON pruning plan. Received text that does not parse: {e}") from e
        return cls.from_dict(data)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path: str) -> "PruningPlan":
        with open(path) as f:
            text = f.read()
        try:
            return cls.from_json(text)
        except ValueError as e:
            raise ValueError(f"{e} (in {str(path)!r})") from e
