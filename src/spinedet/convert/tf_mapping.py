"""Map a Model Garden checkpoint onto a spinedet model's state dict.

The backbone's layers are matched by position (see :mod:`.keras_order`); inside residual
blocks and the heads, Model Garden's attribute names (``_conv1``, ``_cls_norms``, ``rpn_head``,
``detection_head``) give the structure. Kernels go from TF's HWIO to PyTorch's OIHW; a conv
bias before a BatchNorm is folded into the BN mean.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torchvision.ops.misc import Conv2dNormActivation

from ..errors import SpinedetError
from ..models import describe
from ..models.spinenet import ScalePermutedBackbone
from .keras_order import keras_layers
from .tf_checkpoint import TFCheckpoint, TrackableNode

__all__ = [
    "ConversionError",
    "convert_checkpoint",
    "find_backbone",
    "model_garden_head_outputs",
    "model_garden_roi_outputs",
    "model_node",
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
# Model Garden's InvertedBottleneckBlock (with its SqueezeExcitation) -> spinedet's MBConv.
_MBCONV_LAYERS = {
    "_conv0": ("conv", "expand.conv"),
    "_norm0": ("bn", "expand.norm"),
    "_conv1": ("depthwise", "depthwise.conv"),
    "_norm1": ("bn", "depthwise.norm"),
    "_conv2": ("conv", "project.conv"),
    "_norm2": ("bn", "project.norm"),
}
_SE_LAYERS = {"_se_reduce": ("conv", "se.fc1"), "_se_expand": ("conv", "se.fc2")}
_BN = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean"}
_BN_VAR = ("moving_variance", "running_var")
# Box parameters: Model Garden (ty, tx, th, tw) <-> torchvision (tx, ty, tw, th), self-inverse.
_BOX_PARAMS = np.asarray([1, 0, 3, 2])


class ConversionError(SpinedetError):
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

    def conv(
        self,
        node: TrackableNode,
        module: str,
        out_perm: np.ndarray | None = None,
        dense_input: tuple[int, int] | None = None,
        kernel_name: str = "kernel",
    ) -> None:
        """A Conv2D (HWIO -> OIHW; Conv2DTranspose's HWOI becomes IOHW, as torch wants) or,
        with ``dense_input=(size, channels)``, a Dense layer reading flattened NHWC features
        (columns reordered to torch's NCHW flattening)."""
        kernel = self._var(node, kernel_name)
        if kernel is None:
            raise ConversionError(f"checkpoint layer for {module} has no {kernel_name}")
        weight = kernel[1]
        if weight.ndim == 4:
            weight = weight.transpose(3, 2, 0, 1)
        else:
            weight = weight.T
            size, channels = dense_input or (1, weight.shape[1])
            if weight.shape[1] == size * size * channels:
                weight = weight.reshape(-1, size, size, channels).transpose(0, 3, 1, 2)
                weight = weight.reshape(len(weight), -1)
        if out_perm is not None and len(out_perm) != len(weight):
            out_perm = None  # another class count: left for the shape check to report
        self.put(f"{module}.weight", kernel[0], weight if out_perm is None else weight[out_perm])
        bias = self._var(node, "bias")
        if bias is not None:
            self.put(f"{module}.bias", bias[0], bias[1] if out_perm is None else bias[1][out_perm])

    def depthwise(self, node: TrackableNode, module: str) -> None:
        """A DepthwiseConv2D: kernel (kh, kw, C, 1) -> PyTorch's grouped (C, 1, kh, kw)."""
        kernel = self._var(node, "depthwise_kernel")
        if kernel is None:
            raise ConversionError(f"checkpoint layer for {module} has no depthwise_kernel")
        self.put(f"{module}.weight", kernel[0], kernel[1].transpose(2, 3, 0, 1))

    def layer(self, node: TrackableNode, module: str, out_perm: np.ndarray | None = None) -> str:
        """A Conv2D, or a SeparableConv2D (-> ``module.depthwise`` and ``module.pointwise``);
        returns the key its bias went to."""
        if self._var(node, "pointwise_kernel") is None:
            self.conv(node, module, out_perm)
            return f"{module}.bias"
        self.depthwise(node, f"{module}.depthwise")
        self.conv(node, f"{module}.pointwise", out_perm, kernel_name="pointwise_kernel")
        return f"{module}.pointwise.bias"

    def conv_bn(self, conv: TrackableNode, module: str, norms: list[tuple[TrackableNode, str]]):
        """A biased conv (or separable conv) followed by BatchNorms (one per pyramid level, or
        just one): the spinedet conv has no bias, which is folded into each BN's mean."""
        bias_key = self.layer(conv, module)
        bias = self.state.pop(bias_key, None)
        self.source.pop(bias_key, None)  # still counted as used: folded into the BNs
        for norm, norm_module in norms:
            if norm is None:
                raise ConversionError(f"the checkpoint has no BatchNorm for {norm_module}")
            self.bn(norm, norm_module, None if bias is None else bias.numpy())

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

    def block(self, node: TrackableNode, module: str, layers: dict = _BLOCK_LAYERS) -> None:
        for attr, (kind, sub) in layers.items():
            child = self.ckpt.child(node, attr)
            if child is not None and child.children:
                getattr(self, kind)(child, f"{module}.{sub}")

    def mbconv(self, node: TrackableNode, module: str) -> None:
        self.block(node, module, _MBCONV_LAYERS)
        se = self.ckpt.child(node, "_squeeze_excitation")
        if se is not None and se.children:
            self.block(se, module, _SE_LAYERS)


def find_backbone(ckpt: TFCheckpoint) -> TrackableNode:
    """The Keras SpineNet in a checkpoint of a backbone, a RetinaNet or a Mask R-CNN."""
    frontier, seen = [0], {0}  # node ids: the object graph may hold cycles
    while frontier:
        node = ckpt.node(frontier.pop(0))
        if "layer_with_weights-0" in node.children:
            return node
        for name in ("model", "_backbone", "backbone"):
            child = node.children.get(name)
            if child is not None and child not in seen:
                seen.add(child)
                frontier.append(child)
    raise ConversionError(
        f"{ckpt.prefix}: no SpineNet backbone found (looked for model/_backbone, model/backbone "
        "and model)"
    )


def _convert_backbone(
    conv: _Converter, node: TrackableNode, backbone: ScalePermutedBackbone, prefix: str
):
    layers = keras_layers(backbone)
    found = [k for k in node.children if k.startswith("layer_with_weights-")]
    if len(found) != len(layers):
        raise ConversionError(
            f"the checkpoint backbone has {len(found)} layers with weights, this SpineNet "
            f"expects {len(layers)}: another variant (block repeats) or min/max level?"
        )
    for i, layer in enumerate(layers):
        child = conv.ckpt.node(node.children[f"layer_with_weights-{i}"])
        module = f"{prefix}{layer.module}"
        if layer.kind in ("bottleneck", "residual"):
            conv.block(child, module)
        else:  # conv, depthwise, bn, mbconv
            getattr(conv, layer.kind)(child, module)


def _anchor_permutation(generator, tf_ratios: list[float] | None = None) -> np.ndarray:
    """torchvision anchor index -> TensorFlow anchor index, for a spinedet anchor generator.

    torchvision orders anchors ratio-major with ratio = h / w; Model Garden and tensorflow/tpu
    scale-major with ratio = w / h, in the order ``tf_ratios`` (default: the generator's).
    """
    num_scales, ratios = len(generator.sizes[0]), list(generator.aspect_ratios[0])
    tf_ratios = ratios if tf_ratios is None else tf_ratios
    perm = []
    for ratio in ratios:
        tf_ratio = next(j for j, r in enumerate(tf_ratios) if np.isclose(r, 1.0 / ratio))
        perm += [scale * len(ratios) + tf_ratio for scale in range(num_scales)]
    return np.asarray(perm)


def _children(conv: _Converter, node: TrackableNode, attr: str) -> list[TrackableNode]:
    """The layers of a list attribute (``_convs``, ``_norms``), in order."""
    child = conv.ckpt.child(node, attr)
    if child is None:
        raise ConversionError(f"the checkpoint head has no {attr}")
    return [conv.ckpt.node(child.children[str(i)]) for i in range(len(child.children))]


def _check_depth(found: int, expected: int, what: str) -> None:
    if found != expected:
        raise ConversionError(f"the checkpoint head has {found} {what}, the model {expected}")


def _level_tower(conv: _Converter, head: TrackableNode, attrs: tuple[str, str], tower, module):
    """Shared convs with a BN per level (``norms[level][layer]``) -> a LevelConvNormAct tower."""
    convs, norms = (_children(conv, head, a) for a in attrs)
    _check_depth(len(convs), len(tower), f"{attrs[0]} layers")
    _check_depth(len(norms), len(tower[0][1]), "levels of norms")
    for i, tf_conv in enumerate(convs):
        per_level = [
            (conv.ckpt.child(norms[lvl], str(i)), f"{module}.{i}.1.{lvl}")
            for lvl in range(len(norms))
        ]
        conv.conv_bn(tf_conv, f"{module}.{i}.0", per_level)


def _anchor_outputs(generator, params: np.ndarray, tf_ratios: list[float] | None = None):
    """Output-channel permutation of a dense head predicting ``len(params)`` values per
    anchor (``params`` also reorders the values, e.g. box parameters)."""
    perm = _anchor_permutation(generator, tf_ratios)
    return (perm[:, None] * len(params) + params).reshape(-1)


def _convert_retinanet_head(conv: _Converter, head: TrackableNode, model: nn.Module) -> None:
    num_classes = model.head.classification_head.num_classes
    towers = [
        ("classification_head", "_cls_convs", "_cls_norms", "_classifier", "cls_logits"),
        ("regression_head", "_box_convs", "_box_norms", "_box_regressor", "bbox_reg"),
    ]
    for torch_name, convs_attr, norms_attr, predictor_attr, predictor in towers:
        tower = getattr(model.head, torch_name).conv
        _level_tower(conv, head, (convs_attr, norms_attr), tower, f"head.{torch_name}.conv")
        params = _BOX_PARAMS if predictor == "bbox_reg" else np.arange(num_classes)
        conv.layer(
            conv.ckpt.child(head, predictor_attr),
            f"head.{torch_name}.{predictor}",
            out_perm=_anchor_outputs(model.anchor_generator, params),
        )


def _conv_stack(conv: _Converter, head: TrackableNode, attrs: tuple[str, str], depth, module):
    """Convs each with its BN (``_convs[i]``, ``_conv_norms[i]``) -> Conv2dNormActivation."""
    convs, norms = (_children(conv, head, a) for a in attrs)
    _check_depth(len(convs), depth, f"{attrs[0]} layers")
    for i, (tf_conv, tf_norm) in enumerate(zip(convs, norms, strict=True)):
        conv.conv_bn(tf_conv, f"{module}.{i}.0", [(tf_norm, f"{module}.{i}.1")])


def _required(conv: _Converter, parent: TrackableNode, *path: str) -> TrackableNode:
    node = conv.ckpt.child(parent, *path)
    if node is None:
        raise ConversionError(f"{conv.ckpt.prefix} holds no {'/'.join(path)}")
    conv.searched.append(node)
    return node


def _convert_rcnn_heads(conv: _Converter, parent: TrackableNode, model: nn.Module) -> None:
    """Model Garden's RPNHead, DetectionHead and MaskHead -> torchvision's R-CNN modules."""
    ckpt = conv.ckpt
    rpn = _required(conv, parent, "rpn_head")
    head = model.rpn.head
    _level_tower(conv, rpn, ("_convs", "_norms"), head.conv, "rpn.head.conv")
    generator = model.rpn.anchor_generator
    for attr, module, params in [
        ("_classifier", "cls_logits", np.arange(1)),
        ("_box_regressor", "bbox_pred", _BOX_PARAMS),
    ]:
        perm = _anchor_outputs(generator, params)
        conv.conv(ckpt.child(rpn, attr), f"rpn.head.{module}", out_perm=perm)

    roi = model.roi_heads
    # All of detection_head is checked: a cascade's later heads are reported, not dropped.
    det = ckpt.child(_required(conv, parent, "detection_head"), "0")
    if det is None:
        raise ConversionError(f"{ckpt.prefix} holds no detection_head/0")
    depth = sum(isinstance(m, Conv2dNormActivation) for m in roi.box_head)
    _conv_stack(conv, det, ("_convs", "_conv_norms"), depth, "roi_heads.box_head")
    fcs, fc_norms = _children(conv, det, "_fcs"), _children(conv, det, "_fc_norms")
    _check_depth(len(fcs), 1, "FC layers")
    size = roi.box_roi_pool.output_size[0]
    channels = roi.box_head[depth + 1].in_features // size**2  # the last conv's, or pooled
    conv.conv(fcs[0], f"roi_heads.box_head.{depth + 1}", dense_input=(size, channels))
    conv.bn(fc_norms[0], f"roi_heads.box_head.{depth + 2}")
    num_classes = roi.box_predictor.cls_score.out_features
    conv.conv(ckpt.child(det, "_classifier"), "roi_heads.box_predictor.cls_score")
    box_perm = (np.arange(num_classes)[:, None] * 4 + _BOX_PARAMS).reshape(-1)
    conv.conv(ckpt.child(det, "_box_regressor"), "roi_heads.box_predictor.bbox_pred", box_perm)

    mask = ckpt.child(parent, "mask_head")
    if mask is not None:
        conv.searched.append(mask)  # a Faster R-CNN given a Mask R-CNN: reported as unexpected
    if not roi.has_mask():
        return
    if mask is None:
        raise ConversionError(f"{ckpt.prefix} holds no mask_head")
    _conv_stack(conv, mask, ("_convs", "_conv_norms"), len(roi.mask_head), "roi_heads.mask_head")
    conv.conv_bn(
        ckpt.child(mask, "_deconv"),
        "roi_heads.mask_predictor.conv5_mask",
        [(ckpt.child(mask, "_deconv_bn"), "roi_heads.mask_predictor.norm")],
    )
    conv.conv(ckpt.child(mask, "_mask_regressor"), "roi_heads.mask_predictor.mask_fcn_logits")


def model_node(ckpt: TFCheckpoint) -> TrackableNode:
    """The Keras model object: ``model`` in a training checkpoint, else the root."""
    return ckpt.child(ckpt.root, "model") or ckpt.root


def convert_checkpoint(ckpt: TFCheckpoint, model: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors for every parameter and BN statistic of ``model`` (a spinedet backbone,
    RetinaNet, Faster R-CNN or Mask R-CNN), read from a Model Garden checkpoint.

    Raises:
        ConversionError: naming the variables when the checkpoint does not fit the model.
    """
    conv = _Converter(ckpt)
    backbone_node = find_backbone(ckpt)
    task = describe(model).task
    is_detector = task != "backbone"
    backbone = model.backbone if is_detector else model
    conv.searched.append(backbone_node)
    _convert_backbone(conv, backbone_node, backbone, "backbone." if is_detector else "")
    if task == "retinanet":
        head = ckpt.child(model_node(ckpt), "_head")
        if head is None:
            raise ConversionError(
                f"{ckpt.prefix} holds no RetinaNet head (model/_head): convert the backbone "
                "alone with --model spinenetXX"
            )
        conv.searched.append(head)
        _convert_retinanet_head(conv, head, model)
    elif is_detector:
        _convert_rcnn_heads(conv, model_node(ckpt), model)
    expected = {k: v for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
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


def _model_garden_layout(
    x: torch.Tensor, generator, box: bool, tf_ratios: list[float] | None = None
) -> torch.Tensor:
    """A torchvision dense output (N, A * K, H, W) in Model Garden's layout: NHWC, channels
    ``anchor * K + k``, anchors scale-major (ratios in the order ``tf_ratios``), boxes
    ``ty, tx, th, tw``."""
    perm = torch.as_tensor(_anchor_permutation(generator, tf_ratios))
    x = x.permute(0, 2, 3, 1)
    x = x.reshape(*x.shape[:3], len(perm), -1)
    if box:
        x = x[..., torch.as_tensor(_BOX_PARAMS)]
    y = torch.empty_like(x)
    y[..., perm, :] = x
    return y.flatten(3)


def model_garden_head_outputs(
    model: nn.Module, features: dict[str, torch.Tensor], tf_ratios: list[float] | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Raw per-level class and box outputs of a spinedet RetinaNet head, or objectness and box
    outputs of an R-CNN's RPN, in Model Garden's layout (see :func:`_model_garden_layout`;
    tensorflow/tpu's with its ``tf_ratios``), to compare with TensorFlow."""
    from ..models.heads import apply_tower

    levels = list(features.values())
    if describe(model).task != "retinanet":
        generator = model.rpn.anchor_generator
        scores, boxes = model.rpn.head(levels)
    else:
        generator, head = model.anchor_generator, model.head
        cls, reg = head.classification_head, head.regression_head
        scores = [cls.cls_logits(apply_tower(cls.conv, f, i)) for i, f in enumerate(levels)]
        boxes = [reg.bbox_reg(apply_tower(reg.conv, f, i)) for i, f in enumerate(levels)]
    return (
        [_model_garden_layout(x, generator, False, tf_ratios) for x in scores],
        [_model_garden_layout(x, generator, True, tf_ratios) for x in boxes],
    )


def model_garden_roi_outputs(
    model: nn.Module,
    features: dict[str, torch.Tensor],
    image_size: tuple[int, int],
    rois: torch.Tensor,
    roi_classes: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """An R-CNN's second stage on given RoIs (``[R, 4]`` as ``y1, x1, y2, x2``, Model Garden's
    order) in Model Garden's layout: RoIAlign features NHWC, class logits, box deltas per class
    as ``ty, tx, th, tw``, and the mask logits of ``roi_classes`` (Mask R-CNN)."""
    roi = model.roi_heads
    boxes = [rois[:, [1, 0, 3, 2]]]
    box_features = roi.box_roi_pool(features, boxes, [image_size])
    classes, deltas = roi.box_predictor(roi.box_head(box_features))
    deltas = deltas.reshape(len(rois), -1, 4)[..., torch.as_tensor(_BOX_PARAMS)]
    out = {
        "box_features": box_features.permute(0, 2, 3, 1),
        "classes": classes,
        "deltas": deltas.flatten(1),
    }
    if roi.has_mask():
        mask_features = roi.mask_roi_pool(features, boxes, [image_size])
        logits = roi.mask_predictor(roi.mask_head(mask_features))
        out["mask_features"] = mask_features.permute(0, 2, 3, 1)
        out["masks"] = logits[torch.arange(len(rois)), roi_classes]
    return out
