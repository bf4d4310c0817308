"""Map a Model Garden checkpoint onto a spinedet model's state dict.

The backbone's layers are matched by position (see :mod:`.keras_order`); inside residual
blocks and the RetinaNet head, Model Garden's attribute names (``_conv1``, ``_cls_norms``) give
the structure. Kernels go from TF's HWIO to PyTorch's OIHW.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..models.spinenet import SpineNet
from .keras_order import spinenet_keras_layers
from .tf_checkpoint import TFCheckpoint, TrackableNode

__all__ = [
    "ConversionError",
    "convert_checkpoint",
    "find_backbone",
    "model_garden_head_outputs",
]

# Residual-block attributes of Model Garden's nn_blocks -> spinedet module names.
_BLOCK_LAYERS = {
    "_shortcut": ("conv", "shortcut.conv"),
    "_norm0": ("bn", "shortcut.norm"),
    "_conv1": ("conv", "conv1.conv"),
    "_norm1": ("bn", "conv1.norm"),
    "_conv2": ("conv", "conv2.conv"),
    "_norm2": ("bn", "conv2.norm"),
    "_conv3": ("conv", "conv3.conv"),
    "_norm3": ("bn", "conv3.norm"),
}
_BN = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean"}
_BN_VAR = ("moving_variance", "running_var")
# Box parameters: Model Garden (ty, tx, th, tw) <-> torchvision (tx, ty, tw, th), self-inverse.
_BOX_PARAMS = np.asarray([1, 0, 3, 2])


class ConversionError(ValueError):
    """A checkpoint that does not fit the requested model."""


class _Converter:
    """Collects ``torch key -> tensor`` and remembers which checkpoint keys were used."""

    def __init__(self, ckpt: TFCheckpoint) -> None:
        self.ckpt = ckpt
        self.state: dict[str, torch.Tensor] = {}
        self.source: dict[str, str] = {}
        self.used: set[str] = set()
        self.searched: list[TrackableNode] = []  # subtrees whose every variable must be used

    def _var(self, node: TrackableNode, name: str) -> tuple[str, np.ndarray] | None:
        child = self.ckpt.child(node, name)
        if child is None or child.tensor is None:
            return None
        return child.tensor, self.ckpt.tensor(child.tensor)

    def put(self, key: str, source: str, value: np.ndarray) -> None:
        self.state[key] = torch.tensor(np.asarray(value, dtype=np.float32))
        self.source[key] = source
        self.used.add(source)

    def unused(self) -> list[str]:
        """Checkpoint variables under the converted objects that went nowhere."""
        seen: set[int] = set()
        stack = list(self.searched)
        found = []
        while stack:
            node = stack.pop()
            if node.id in seen:
                continue
            seen.add(node.id)
            if node.tensor is not None and node.tensor not in self.used:
                found.append(node.tensor)
            stack += [self.ckpt.node(i) for i in node.children.values()]
        return sorted(found)

    def conv(self, node: TrackableNode, module: str, out_perm: np.ndarray | None = None) -> None:
        kernel = self._var(node, "kernel")
        if kernel is None:
            raise ConversionError(f"checkpoint layer for {module} has no kernel")
        weight = kernel[1].transpose(3, 2, 0, 1)  # HWIO -> OIHW
        if out_perm is not None and len(out_perm) != len(weight):
            out_perm = None  # another class count: left for the shape check to report
        self.put(f"{module}.weight", kernel[0], weight if out_perm is None else weight[out_perm])
        bias = self._var(node, "bias")
        if bias is not None:
            self.put(f"{module}.bias", bias[0], bias[1] if out_perm is None else bias[1][out_perm])

    def bn(self, node: TrackableNode, module: str, conv_bias: np.ndarray | None = None) -> None:
        for tf_name, torch_name in [*_BN.items(), _BN_VAR]:
            var = self._var(node, tf_name)
            if var is None:
                raise ConversionError(f"checkpoint BatchNorm for {module} has no {tf_name}")
            value = var[1]
            if tf_name == "moving_mean" and conv_bias is not None:
                # A conv bias before BN only shifts the mean BN subtracts: fold it in exactly.
                value = value - conv_bias
            self.put(f"{module}.{torch_name}", var[0], value)

    def block(self, node: TrackableNode, module: str) -> None:
        for attr, (kind, sub) in _BLOCK_LAYERS.items():
            child = self.ckpt.child(node, attr)
            if child is not None and child.children:
                getattr(self, kind)(child, f"{module}.{sub}")


def find_backbone(ckpt: TFCheckpoint) -> TrackableNode:
    """The Keras SpineNet in a checkpoint of a backbone, a RetinaNet or a Mask R-CNN."""
    frontier = [ckpt.root]
    while frontier:
        node = frontier.pop(0)
        if "layer_with_weights-0" in node.children:
            return node
        frontier += [
            ckpt.node(node.children[name])
            for name in ("model", "_backbone", "backbone")
            if name in node.children
        ]
    raise ConversionError(
        f"{ckpt.prefix}: no SpineNet backbone found (looked for model/_backbone, model/backbone "
        "and model)"
    )


def _convert_backbone(conv: _Converter, node: TrackableNode, backbone: SpineNet, prefix: str):
    layers = spinenet_keras_layers(backbone)
    found = [k for k in node.children if k.startswith("layer_with_weights-")]
    if len(found) != len(layers):
        raise ConversionError(
            f"the checkpoint backbone has {len(found)} layers with weights, this SpineNet "
            f"expects {len(layers)}: another variant (block repeats) or min/max level?"
        )
    for i, layer in enumerate(layers):
        child = conv.ckpt.node(node.children[f"layer_with_weights-{i}"])
        module = f"{prefix}{layer.module}"
        if layer.kind in ("conv", "bn"):
            getattr(conv, layer.kind)(child, module)
        else:
            conv.block(child, module)


def _anchor_permutation(num_scales: int, ratios: list[float]) -> np.ndarray:
    """torchvision anchor index -> Model Garden anchor index.

    torchvision orders anchors ratio-major with ratio = h / w; Model Garden scale-major with
    ratio = w / h.
    """
    perm = []
    for ratio in ratios:
        tf_ratio = next(j for j, r in enumerate(ratios) if np.isclose(r, 1.0 / ratio))
        perm += [scale * len(ratios) + tf_ratio for scale in range(num_scales)]
    return np.asarray(perm)


def _convert_retinanet_head(conv: _Converter, head: TrackableNode, model: nn.Module) -> None:
    ckpt = conv.ckpt
    generator = model.anchor_generator
    ratios = list(generator.aspect_ratios[0])
    num_scales = len(generator.sizes[0])
    anchors = _anchor_permutation(num_scales, ratios)
    num_classes = model.head.classification_head.num_classes
    towers = [
        ("classification_head", "_cls_convs", "_cls_norms", "_classifier", "cls_logits"),
        ("regression_head", "_box_convs", "_box_norms", "_box_regressor", "bbox_reg"),
    ]
    for torch_name, convs_attr, norms_attr, predictor_attr, predictor in towers:
        tower = getattr(model.head, torch_name)
        convs, norms = ckpt.child(head, convs_attr), ckpt.child(head, norms_attr)
        if convs is None or norms is None:
            raise ConversionError(f"the checkpoint head has no {convs_attr}/{norms_attr}")
        if len(convs.children) != len(tower.conv):
            raise ConversionError(
                f"the checkpoint head has {len(convs.children)} convs per tower, the model "
                f"{len(tower.conv)}"
            )
        levels = len(norms.children)
        if levels != len(tower.conv[0][1]):
            raise ConversionError(
                f"the checkpoint head has norms for {levels} levels, the model "
                f"{len(tower.conv[0][1])}"
            )
        for i in range(len(tower.conv)):
            tf_conv = ckpt.node(convs.children[str(i)])
            conv.conv(tf_conv, f"head.{torch_name}.conv.{i}.0")
            bias_key = f"head.{torch_name}.conv.{i}.0.bias"
            bias = conv.state.pop(bias_key).numpy() if bias_key in conv.state else None
            conv.source.pop(bias_key, None)  # still counted as used: folded into the BNs
            for lvl in range(levels):
                norm = ckpt.child(norms, str(lvl), str(i))
                conv.bn(norm, f"head.{torch_name}.conv.{i}.1.{lvl}", conv_bias=bias)
        params = _BOX_PARAMS if predictor == "bbox_reg" else np.arange(num_classes)
        out_perm = anchors[:, None] * len(params) + params
        conv.conv(
            ckpt.child(head, predictor_attr),
            f"head.{torch_name}.{predictor}",
            out_perm=out_perm.reshape(-1),
        )


def convert_checkpoint(ckpt: TFCheckpoint, model: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors for every parameter and BN statistic of ``model`` (a spinedet backbone or
    RetinaNet), read from a Model Garden checkpoint.

    For a two-stage detector only the backbone is converted (keys prefixed ``backbone.``).

    Raises:
        ConversionError: naming the variables when the checkpoint does not fit the model.
    """
    conv = _Converter(ckpt)
    backbone_node = find_backbone(ckpt)
    is_detector = hasattr(model, "backbone")
    backbone = model.backbone if is_detector else model
    conv.searched.append(backbone_node)
    _convert_backbone(conv, backbone_node, backbone, "backbone." if is_detector else "")
    expected = {k: v for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
    if hasattr(model, "head"):
        parent = next(
            (ckpt.child(ckpt.root, *p) for p in [("model",), ()] if ckpt.child(ckpt.root, *p)),
            ckpt.root,
        )
        head = ckpt.child(parent, "_head")
        if head is None:
            raise ConversionError(
                f"{ckpt.prefix} holds no RetinaNet head (model/_head): convert the backbone "
                "alone with --model spinenetXX"
            )
        conv.searched.append(head)
        _convert_retinanet_head(conv, head, model)
    elif is_detector:
        expected = {k: v for k, v in expected.items() if k.startswith("backbone.")}
    _check(conv, expected)
    return conv.state


def _check(conv: _Converter, expected: dict[str, torch.Tensor]) -> None:
    problems = []
    unused = [f"{k} (no model variable)" for k in conv.unused()]
    missing = sorted(set(expected) - set(conv.state))
    extra = sorted(f"{conv.source[k]} (-> {k})" for k in set(conv.state) - set(expected))
    shapes = sorted(
        f"{conv.source[k]} {tuple(conv.state[k].shape)} -> {k} {tuple(expected[k].shape)}"
        for k in set(expected) & set(conv.state)
        if conv.state[k].shape != expected[k].shape
    )
    for label, names in [
        ("missing", missing),
        ("unexpected", extra + unused),
        ("mis-shaped", shapes),
    ]:
        if names:
            shown = "; ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            problems.append(f"{len(names)} {label}: {shown}")
    if problems:
        raise ConversionError(
            "the checkpoint does not fit the model (another variant?): " + " | ".join(problems)
        )


def model_garden_head_outputs(
    model: nn.Module, features: dict[str, torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A spinedet RetinaNet head's raw per-level outputs in Model Garden's layout (NHWC,
    channels ``anchor * K + k``, anchors scale-major, boxes ``ty, tx, th, tw``), to compare
    with TensorFlow."""
    from ..models.heads import apply_tower

    head = model.head
    generator = model.anchor_generator
    perm = torch.as_tensor(
        _anchor_permutation(len(generator.sizes[0]), list(generator.aspect_ratios[0]))
    )
    scores, boxes = [], []
    for i, f in enumerate(features.values()):
        for tower, predictor, size, out in [
            (head.classification_head.conv, head.classification_head.cls_logits, None, scores),
            (head.regression_head.conv, head.regression_head.bbox_reg, 4, boxes),
        ]:
            x = predictor(apply_tower(tower, f, i)).permute(0, 2, 3, 1)
            x = x.reshape(*x.shape[:3], len(perm), -1)
            if size == 4:
                x = x[..., torch.as_tensor(_BOX_PARAMS)]
            y = torch.empty_like(x)
            y[..., perm, :] = x
            out.append(y.flatten(3))
    return scores, boxes
