"""The order in which Keras lists the layers of Model Garden's functional SpineNet.

A TF2 checkpoint names the layers of a functional model ``layer_with_weights-K`` in the order
of ``model.layers``: layers sorted by decreasing depth (longest path to an output), ties
broken by a depth-first walk from the outputs. That order is not the creation order, so the
graph Model Garden builds (weightless ops included, since they lengthen paths) is replayed here
from the block specs, and the Keras ordering rule applied to it. ``tf.train.Checkpoint`` itself
relies on this order to restore a functional model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import SpinedetError
from ..models import describe
from ..models.specs import NUM_STEM_BLOCKS
from ..models.spinenet import SpineNet
from ..models.spinenet_mobile import STEM_LEVELS, SpineNetMobile

__all__ = [
    "WeightedLayer",
    "keras_layers",
    "spinenet_keras_layers",
    "spinenet_mobile_keras_layers",
]


@dataclass(frozen=True)
class WeightedLayer:
    """A Keras layer with variables and the spinedet module that takes them.

    ``kind`` is ``conv``, ``depthwise``, ``bn``, ``bottleneck``, ``residual`` or ``mbconv``.
    """

    kind: str
    module: str


@dataclass
class _Node:
    inputs: list[int]
    layer: WeightedLayer | None


@dataclass
class _Graph:
    nodes: list[_Node] = field(default_factory=list)

    def op(self, *inputs: int, layer: WeightedLayer | None = None) -> int:
        self.nodes.append(_Node(list(inputs), layer))
        return len(self.nodes) - 1

    def conv_bn(self, x: int, module: str, act: bool) -> int:
        x = self.op(
            self.op(x, layer=WeightedLayer("conv", f"{module}.conv")),
            layer=WeightedLayer("bn", f"{module}.norm"),
        )
        return self.op(x) if act else x

    def upsample(self, x: int) -> int:
        # spatial_transform_ops.nearest_upsampling: shape, h, w, reshape, tile, h*s, w*s, reshape.
        shape = self.op(x)
        h, w = self.op(shape), self.op(shape)
        tiled = self.op(self.op(x, h, w))
        return self.op(tiled, self.op(h), self.op(w))

    def keras_order(self, outputs: list[int]) -> list[int]:
        """Node ids as ``Functional._map_graph_network`` orders the layers."""
        first_seen: dict[int, int] = {}
        post_order: list[int] = []
        done: set[int] = set()
        stack: list[tuple[int, int]] = []
        for out in outputs:
            if out in done:
                continue
            first_seen.setdefault(out, len(first_seen))
            stack.append((out, 0))
            while stack:  # iterative DFS: pre-order index on entry, post-order on exit
                node, i = stack.pop()
                inputs = self.nodes[node].inputs
                if i < len(inputs):
                    stack.append((node, i + 1))
                    child = inputs[i]
                    if child not in done and all(child != n for n, _ in stack):
                        first_seen.setdefault(child, len(first_seen))
                        stack.append((child, 0))
                else:
                    done.add(node)
                    post_order.append(node)
        depth: dict[int, int] = {}
        for node in reversed(post_order):
            d = depth.setdefault(node, 0)
            for parent in self.nodes[node].inputs:
                depth[parent] = max(d + 1, depth.get(parent, 0))
        return sorted(post_order, key=lambda n: (-depth[n], first_seen[n]))


def spinenet_keras_layers(backbone: SpineNet) -> list[WeightedLayer]:
    """The weighted layers of the equivalent Model Garden SpineNet, in checkpoint order."""
    g = _Graph()
    repeats = len(backbone.stem_blocks[0])

    def block_group(x: int, kind: str, module: str) -> int:
        for r in range(repeats):
            x = g.op(x, layer=WeightedLayer(kind, f"{module}.{r}"))
        return g.op(x)  # tf.identity

    x = g.conv_bn(g.op(), "stem.0", act=True)
    x = g.op(x)  # max pool
    net, levels, types = [], [], []
    for i in range(NUM_STEM_BLOCKS):
        x = block_group(x, "bottleneck", f"stem_blocks.{i}")
        net.append(x)
        levels.append(2)
        types.append("bottleneck")
    consumers = [0] * NUM_STEM_BLOCKS
    outputs: dict[int, int] = {}
    # Every spec is replayed, built by spinedet or not: unused ones never reach an output.
    for i, spec in enumerate(backbone.block_specs):
        index = i + NUM_STEM_BLOCKS
        parents = []
        for k, p in enumerate(spec.parents):
            module = f"resamplers.{index}.{k}"
            y = g.conv_bn(net[p], f"{module}.reduce", act=True)
            if levels[p] < spec.level:
                y = g.conv_bn(y, f"{module}.down.0", act=True)
                for _ in range(spec.level - levels[p] - 1):
                    y = g.op(y)  # max pool
            elif levels[p] > spec.level:
                y = g.upsample(y)
            parents.append(g.conv_bn(y, f"{module}.expand", act=False))
            consumers[p] += 1
        if spec.is_output:
            for j in range(len(net)):
                if consumers[j] == 0 and (levels[j], types[j]) == (spec.level, spec.block_type):
                    parents.append(net[j])
                    consumers[j] += 1
        x = g.op(g.op(*parents))  # add_n, activation
        net.append(block_group(x, spec.block_type, f"blocks.{index}"))
        levels.append(spec.level)
        types.append(spec.block_type)
        consumers.append(0)
        if spec.is_output:
            outputs[spec.level] = net[-1]
    ends = [g.conv_bn(outputs[lvl], f"endpoints.p{lvl}", act=True) for lvl in backbone.levels]
    # The outputs dict is flattened in sorted key order: str(level), i.e. numeric for 3..7.
    ends = [e for _, e in sorted(zip(map(str, backbone.levels), ends, strict=True))]
    return [g.nodes[n].layer for n in g.keras_order(ends) if g.nodes[n].layer is not None]


def spinenet_mobile_keras_layers(backbone: SpineNetMobile) -> list[WeightedLayer]:
    """The weighted layers of the equivalent Model Garden SpineNetMobile, in checkpoint order.

    Model Garden's graph differs from SpineNet's: resampling is depthwise stride-2 convs (or
    nearest upsampling) then a 1x1 conv, parents are summed by a chain of ``Add`` layers, and
    the stem is one 3x3 conv followed by two MBConv groups.
    """
    if len(backbone.stem_blocks[0]) != 1:
        # Model Garden's repeated MBConvs all read the group input (only the last is used).
        raise SpinedetError("SpineNet-Mobile conversion supports block_repeats=1 only")
    g = _Graph()

    def block_group(x: int, module: str) -> int:
        return g.op(g.op(x, layer=WeightedLayer("mbconv", f"{module}.0")))  # + linear identity

    def conv_bn(x: int, module: str, kind: str = "conv") -> int:
        x = g.op(x, layer=WeightedLayer(kind, f"{module}.conv"))
        return g.op(x, layer=WeightedLayer("bn", f"{module}.norm"))

    x = g.op(conv_bn(g.op(), "stem"))  # conv, BN, activation
    net, levels = [], []
    for i, level in enumerate(STEM_LEVELS):
        x = block_group(x, f"stem_blocks.{i}")
        net.append(x)
        levels.append(level)
    consumers = [0] * len(net)
    outputs: dict[int, int] = {}
    for i, spec in enumerate(backbone.block_specs):
        index = i + NUM_STEM_BLOCKS
        level = min(spec.level, backbone.max_level)
        parents = []
        for k, p in enumerate(spec.parents):
            module = f"resamplers.{index}.{k}"
            y = net[p]
            for d in range(level - levels[p]):
                y = g.op(conv_bn(y, f"{module}.down.{d}", "depthwise"))
            if levels[p] > level:
                y = g.upsample(y)
            parents.append(conv_bn(y, f"{module}.project"))
            consumers[p] += 1
        if spec.is_output:
            for j in range(len(net)):
                if consumers[j] == 0 and levels[j] == level:  # same width, same channels
                    parents.append(net[j])
                    consumers[j] += 1
        x = parents[0]
        for other in parents[1:]:
            x = g.op(x, other)  # Add
        net.append(block_group(g.op(x), f"blocks.{index}"))  # activation, block group
        levels.append(level)
        consumers.append(0)
        if spec.is_output:
            outputs[level] = net[-1]
    ends = [g.op(conv_bn(outputs[lvl], f"endpoints.p{lvl}")) for lvl in backbone.levels]
    ends = [e for _, e in sorted(zip(map(str, backbone.levels), ends, strict=True))]
    return [g.nodes[n].layer for n in g.keras_order(ends) if g.nodes[n].layer is not None]


# The Keras layer order of each backbone family Model Garden has.
_FAMILY_LAYERS = {
    "spinenet": spinenet_keras_layers,
    "spinenet_mobile": spinenet_mobile_keras_layers,
}


def keras_layers(backbone: nn.Module) -> list[WeightedLayer]:
    """The weighted layers of ``backbone`` in the order its Model Garden twin saves them."""
    family = describe(backbone).family
    if family not in _FAMILY_LAYERS:
        raise SpinedetError(f"no Model Garden layout for {family} backbones")
    return _FAMILY_LAYERS[family](backbone)
