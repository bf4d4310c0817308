"""Map a tensorflow/tpu (TF1, name-based) checkpoint onto a spinedet model's state dict.

tensorflow/tpu builds its layers with ``tf.layers``, which name them ``conv2d``, ``conv2d_1``,
... and ``batch_normalization``, ... in creation order within each variable scope:

* ``spinenet/``: the stem conv, the stem block groups, then the endpoint convs P3..P7;
* ``spinenet/sub_policy{i}/resample_with_alpha_resample_{i}_{j}/``: parent ``j`` of block ``i``;
* ``spinenet/sub_policy{i}/scale_permuted_block_{i + 2}/``: the block group of block ``i``;
* SpineNet-Mobile (``spinenet_mbconv.py``) likewise under ``spinenet_mbconv/``, its parents in
  ``resample_with_sepconv_resample_{i}_{j}/``; an MBConv block's squeeze-excitation adds two
  biased ``conv2d`` and its depthwise convs are ``depthwise_conv2d[_k]``;
* ``classification_head/dense/``; ``retinanet/{class,box}_net/{class,box}-{k}`` (shared convs),
  ``...-{k}-{level}`` (their BatchNorm per level) and ``...-predict``;
* ``rpn_head/rpn[-k]``, ``rpn-l{level}-bn[-k]``, ``rpn-class``, ``rpn-box``;
  ``fast_rcnn_head/conv_{i}``, ``fc6``, ``class-predict``, ``box-predict`` and
  ``mask_head/mask-conv-l{i}``, ``conv5-mask``, ``mask_fcn_logits``, each head's BatchNorms
  auto-named in order.

spinedet registers its layers in that same order, so a scope's ``k``-th ``conv2d`` (or
``depthwise_conv2d``, ``batch_normalization``) is the ``k``-th of that kind in the matching
modules.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from torch import nn
from torchvision.ops import SqueezeExcitation
from torchvision.ops.misc import Conv2dNormActivation

from ..models.layers import ConvNormAct
from ..models.specs import NUM_STEM_BLOCKS
from ..models.spinenet import ScalePermutedBackbone, SpineNet
from ..models.spinenet_mobile import DepthwiseConvNormAct, SpineNetMobile
from .tf_checkpoint import TensorBundle
from .tf_mapping import _BOX_PARAMS, ConversionError, _anchor_outputs, _check, _Converter

__all__ = [
    "TPU_ANCHOR_RATIOS",
    "convert_tpu_checkpoint",
    "tpu_backbone_scope",
    "tpu_inference_options",
    "tpu_model_kind",
]

# tensorflow/tpu's anchor aspect ratios (w / h) in its order (configs/detection_config.py).
TPU_ANCHOR_RATIOS = [1.0, 2.0, 0.5]
# Variables of the network; anything else (global_step, optimizer slots) is not converted.
_VARIABLES = ("kernel", "bias", "gamma", "beta", "moving_mean", "moving_variance")


class _NameConverter(_Converter):
    """A :class:`_Converter` whose "nodes" are variable scopes of a name-based checkpoint."""

    def _var(self, scope: str, name: str) -> tuple[str, np.ndarray] | None:
        key = f"{scope}/{name}"
        if key not in self.ckpt.entries:
            return None
        return key, self.ckpt.tensor(key)

    def unused(self) -> list[str]:
        return sorted(
            key
            for key in self.ckpt.entries
            if key.startswith(tuple(self.searched))
            and key.rsplit("/", 1)[-1] in _VARIABLES
            and key not in self.used
        )

    def scope(self, scope: str, modules: list[tuple[str, nn.Module]]) -> None:
        """The auto-named layers of ``scope`` (``conv2d[_k]``, ``depthwise_conv2d[_k]``,
        ``batch_normalization[_k]``) -> the layers of ``modules`` (``(prefix, module)``): its
        ConvNormActs, depthwise ConvNormActs and squeeze-excitations, in order."""
        counts: Counter[str] = Counter()

        def name(kind: str) -> str:
            k = counts[kind]
            counts[kind] += 1
            return f"{scope}/{kind}_{k}" if k else f"{scope}/{kind}"

        for prefix, module in modules:
            for sub, m in module.named_modules():
                path = f"{prefix}.{sub}" if sub else prefix
                if isinstance(m, ConvNormAct | DepthwiseConvNormAct):
                    if isinstance(m, ConvNormAct):
                        self.conv(name("conv2d"), f"{path}.conv")
                    else:
                        self.depthwise(name("depthwise_conv2d"), f"{path}.conv")
                    self.bn(name("batch_normalization"), f"{path}.norm")
                elif isinstance(m, SqueezeExcitation):
                    self.conv(name("conv2d"), f"{path}.fc1")
                    self.conv(name("conv2d"), f"{path}.fc2")


def tpu_backbone_scope(ckpt: TensorBundle) -> str:
    """``"spinenet"`` or ``"spinenet_mbconv"`` (SpineNet-Mobile): the variable scope of a
    tensorflow/tpu checkpoint's backbone."""
    for scope in ("spinenet", "spinenet_mbconv"):
        if any(key.startswith(f"{scope}/") for key in ckpt.entries):
            return scope
    raise ConversionError(
        f"{ckpt.prefix}: no tensorflow/tpu SpineNet in this TF1 checkpoint (no spinenet/ or "
        "spinenet_mbconv/ variables)"
    )


def tpu_model_kind(ckpt: TensorBundle) -> str:
    """``"classifier"``, ``"retinanet"``, ``"maskrcnn"`` or ``"backbone"``: what a
    tensorflow/tpu checkpoint holds besides its SpineNet."""
    tpu_backbone_scope(ckpt)
    for kind, scope in [
        ("classifier", "classification_head/"),
        ("retinanet", "retinanet/"),
        ("maskrcnn", "rpn_head/"),
    ]:
        if any(key.startswith(scope) for key in ckpt.entries):
            return kind
    return "backbone"


def tpu_inference_options(kind: str, num_classes: int) -> dict:
    """Detector options reproducing tensorflow/tpu's inference (``ops/postprocess_ops.py``,
    ``ops/roi_ops.py`` as ``configs/retinanet_config.py`` and ``maskrcnn_config.py`` set them;
    the zoo's SpineNet configs keep them): its pixel-index boxes, and for RetinaNet its 100
    detections and no per-level cut (it takes the top 5000 per class over all levels, NMS 0.5
    per class, scores over 0.05: torchvision's cut per level is set to 5000 per class, which
    binds only where one level alone holds more candidates than that). Its Mask R-CNN
    settings equal torchvision's defaults (1000 proposals per level and in all, RPN NMS 0.7,
    NMS 0.5 per class, scores over 0.05, 100 detections)."""
    if kind == "retinanet":
        return {
            "box_convention": "tpu",
            "detections_per_img": 100,
            "topk_candidates": 5000 * (num_classes - 1),
        }
    if kind == "maskrcnn":
        return {"box_convention": "tpu"}
    return {}


def _convert_backbone(conv: _NameConverter, backbone: ScalePermutedBackbone, prefix: str) -> None:
    """SpineNet under ``spinenet/``, SpineNet-Mobile under ``spinenet_mbconv/``: the same
    layout, resampling scopes named after their functions."""
    root, resample = "spinenet", "resample_with_alpha"
    if isinstance(backbone, SpineNetMobile):
        root, resample = "spinenet_mbconv", "resample_with_sepconv"
    conv.searched.append(f"{root}/")
    conv.scope(
        root,
        [(f"{prefix}stem", backbone.stem), (f"{prefix}stem_blocks", backbone.stem_blocks)]
        + [(f"{prefix}endpoints.{name}", m) for name, m in backbone.endpoints.items()],
    )
    for block in backbone.plan:
        i, key = block.index - NUM_STEM_BLOCKS, str(block.index)
        policy = f"{root}/sub_policy{i}"
        for j, resample_module in enumerate(backbone.resamplers[key]):
            scope = f"{policy}/{resample}_resample_{i}_{j}"
            conv.scope(scope, [(f"{prefix}resamplers.{key}.{j}", resample_module)])
        block_scope = f"{policy}/scale_permuted_block_{block.index}"
        conv.scope(block_scope, [(f"{prefix}blocks.{key}", backbone.blocks[key])])


def _convert_retinanet_head(conv: _NameConverter, model: nn.Module) -> None:
    conv.searched.append("retinanet/")
    levels = model.backbone.levels
    for net, short, torch_name, predictor in [
        ("class_net", "class", "classification_head", "cls_logits"),
        ("box_net", "box", "regression_head", "bbox_reg"),
    ]:
        module = f"head.{torch_name}"
        scope = f"retinanet/{net}/{short}"
        tower = getattr(model.head, torch_name).conv
        found = sum(
            f"{scope}-{k}/{kernel}" in conv.ckpt.entries
            for k in range(len(tower) + 1)
            for kernel in ("kernel", "pointwise_kernel")  # plain or separable
        )
        if found != len(tower):
            raise ConversionError(
                f"the checkpoint head has {found} {net} convs, the model {len(tower)}"
            )
        for k in range(len(tower)):
            norms = [
                (f"{scope}-{k}-{lvl}", f"{module}.conv.{k}.1.{i}") for i, lvl in enumerate(levels)
            ]
            conv.conv_bn(f"{scope}-{k}", f"{module}.conv.{k}.0", norms)
        num_classes = model.head.classification_head.num_classes
        params = _BOX_PARAMS if predictor == "bbox_reg" else np.arange(num_classes)
        perm = _anchor_outputs(model.anchor_generator, params, TPU_ANCHOR_RATIOS)
        conv.layer(f"{scope}-predict", f"{module}.{predictor}", out_perm=perm)


def _bn(k: int) -> str:
    """The ``k``-th auto-named BatchNorm of a scope."""
    return f"batch_normalization_{k}" if k else "batch_normalization"


def _convert_rcnn_heads(conv: _NameConverter, model: nn.Module) -> None:
    """tensorflow/tpu's RpnHead, FastrcnnHead and MaskrcnnHead (``modeling/architecture/
    heads.py``, with BatchNorm as its SpineNet configs) -> torchvision's R-CNN modules."""
    conv.searched += ["rpn_head/", "fast_rcnn_head/", "mask_head/"]
    levels = model.backbone.levels
    for k in range(len(model.rpn.head.conv)):
        suffix = f"-{k}" if k else ""
        norms = [
            (f"rpn_head/rpn-l{lvl}-bn{suffix}", f"rpn.head.conv.{k}.1.{i}")
            for i, lvl in enumerate(levels)
        ]
        conv.conv_bn(f"rpn_head/rpn{suffix}", f"rpn.head.conv.{k}.0", norms)
    generator = model.rpn.anchor_generator
    for tf_name, module, params in [
        ("rpn-class", "cls_logits", np.arange(1)),
        ("rpn-box", "bbox_pred", _BOX_PARAMS),
    ]:
        perm = _anchor_outputs(generator, params, TPU_ANCHOR_RATIOS)
        conv.conv(f"rpn_head/{tf_name}", f"rpn.head.{module}", out_perm=perm)

    roi = model.roi_heads
    depth = sum(isinstance(m, Conv2dNormActivation) for m in roi.box_head)
    for i in range(depth):
        norm = [(f"fast_rcnn_head/{_bn(i)}", f"roi_heads.box_head.{i}.1")]
        conv.conv_bn(f"fast_rcnn_head/conv_{i}", f"roi_heads.box_head.{i}.0", norm)
    size = roi.box_roi_pool.output_size[0]
    channels = roi.box_head[depth + 1].in_features // size**2  # the last conv's, or pooled
    conv.conv("fast_rcnn_head/fc6", f"roi_heads.box_head.{depth + 1}", dense_input=(size, channels))
    conv.bn(f"fast_rcnn_head/{_bn(depth)}", f"roi_heads.box_head.{depth + 2}")
    conv.conv("fast_rcnn_head/class-predict", "roi_heads.box_predictor.cls_score")
    num_classes = roi.box_predictor.cls_score.out_features
    box_perm = (np.arange(num_classes)[:, None] * 4 + _BOX_PARAMS).reshape(-1)
    conv.conv("fast_rcnn_head/box-predict", "roi_heads.box_predictor.bbox_pred", box_perm)
    if not roi.has_mask():
        return
    depth = len(roi.mask_head)
    for i in range(depth):
        norm = [(f"mask_head/{_bn(i)}", f"roi_heads.mask_head.{i}.1")]
        conv.conv_bn(f"mask_head/mask-conv-l{i}", f"roi_heads.mask_head.{i}.0", norm)
    norm = [(f"mask_head/{_bn(depth)}", "roi_heads.mask_predictor.norm")]
    conv.conv_bn("mask_head/conv5-mask", "roi_heads.mask_predictor.conv5_mask", norm)
    conv.conv("mask_head/mask_fcn_logits", "roi_heads.mask_predictor.mask_fcn_logits")


def convert_tpu_checkpoint(ckpt: TensorBundle, model: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors for every parameter and BN statistic of ``model`` (a spinedet SpineNet,
    SpineNet classifier, RetinaNet or Mask R-CNN, or a SpineNet-Mobile or its RetinaNet), read
    from a tensorflow/tpu checkpoint.

    Raises:
        ConversionError: naming the variables when the checkpoint does not fit the model.
    """
    conv = _NameConverter(ckpt)
    backbone = getattr(model, "backbone", model)
    if not isinstance(backbone, SpineNet | SpineNetMobile):
        raise ConversionError(f"{type(backbone).__name__}: only SpineNet backbones convert")
    _convert_backbone(conv, backbone, "backbone." if backbone is not model else "")
    if hasattr(model, "fc"):
        conv.searched.append("classification_head/")
        conv.conv("classification_head/dense", "fc")
    elif hasattr(model, "head"):
        _convert_retinanet_head(conv, model)
    elif hasattr(model, "rpn"):
        _convert_rcnn_heads(conv, model)
    expected = {k: v for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
    _check(conv, expected)
    return conv.state
