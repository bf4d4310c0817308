"""SpineNet ImageNet classifiers, built as tensorflow/tpu's ``ClassificationModel`` builds them
(``models/official/detection/modeling/classification_model.py`` with the ``all`` aggregation of
``heads.ClassificationHead``, as the zoo's ``spinenet*_classification.yaml`` configure it)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from .registry import register_task
from .specs import SPINENET_BLOCK_SPECS
from .spinenet import SpineNet, spinenet

__all__ = ["SpineNetClassifier", "spinenet_classifier", "TPU_CLASSIFIER_OPTIONS"]

# The backbone as tensorflow/tpu's classification configs build it: BN momentum 0.9 (PyTorch
# 0.1) and epsilon 1e-5, convolutions padded symmetrically, tensorflow/tpu's downsampling, and
# its 15-block list (no trailing level-2 block: stochastic depth rates are (i + 1) / 15).
TPU_CLASSIFIER_OPTIONS = {
    "bn_momentum": 0.1,
    "bn_eps": 1e-5,
    "padding": "fixed",
    "downsample": "tpu",
    "block_specs": SPINENET_BLOCK_SPECS[:-1],
}


class SpineNetClassifier(nn.Module):
    """A SpineNet backbone, its P3-P7 averaged at P3's size, global average pooling, and one
    linear layer.

    The ``all`` aggregation: from P7 down, the running sum is resized (nearest neighbour) to
    the next level's size and that level is added; the sum is divided by the number of levels.

    Args:
        backbone: a SpineNet (its tensors keep their detector names under ``backbone.``).
        num_classes: outputs of the linear layer (the zoo's checkpoints have 1001: class 0 is
            an unused background class).
        dropout: dropout rate before the linear layer (training only).
    """

    def __init__(self, backbone: SpineNet, num_classes: int = 1000, dropout: float = 0.0) -> None:
        super().__init__()
        if num_classes < 1:
            raise ModelError(f"num_classes must be positive, got {num_classes}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(backbone.out_channels, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)  # tensorflow/tpu's dense initializer
        nn.init.zeros_(self.fc.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled ``[N, endpoint_filters]`` embedding the linear layer reads."""
        levels = list(self.backbone(x).values())
        out = levels[-1]
        for level in reversed(levels[:-1]):
            out = F.interpolate(out, size=level.shape[-2:], mode="nearest") + level
        return (out / len(levels)).mean(dim=(-2, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, num_classes]`` of NCHW images."""
        return self.fc(self.dropout(self.features(x)))


@register_task(
    "classifier",
    families={"spinenet": None},
    runtime={"dropout", "image_size"},
    background=False,
    default_classes=1000,
)
def spinenet_classifier(
    variant: str = "49",
    num_classes: int | None = 1000,
    *,
    class_names: Sequence[str] | None = None,
    image_size: int = 224,
    **kwargs,
) -> SpineNetClassifier:
    """SpineNet-``variant`` ImageNet classifier of the tensorflow/tpu model zoo.

    At 1001 classes (the zoo's checkpoints) the parameter counts are those of the TensorFlow
    models: 22,088,745 (49), 36,520,233 (96), 60,504,873 (143) and 127,101,177 (190).

    Args:
        variant: ``"49s"``, ``"49"``, ``"96"``, ``"143"`` or ``"190"``.
        num_classes: number of output classes; inferred from ``class_names`` when given.
        class_names: names of classes 0..num_classes-1, kept on the model.
        image_size: the square input size it is trained and evaluated at (kept on the model).
        **kwargs: ``dropout``, or any :class:`~spinedet.models.spinenet.SpineNet` option
            (``activation="swish"``, ``stochastic_depth_rate=0.2``, ...), which override the
            tensorflow/tpu defaults in :data:`TPU_CLASSIFIER_OPTIONS`.

    Example:
        >>> model = spinenet_classifier("49", num_classes=10, activation="swish")
        >>> model(torch.zeros(1, 3, 224, 224)).shape
        torch.Size([1, 10])
    """
    if class_names is not None:
        if num_classes is not None and num_classes != len(class_names):
            raise ModelError(f"num_classes={num_classes} but {len(class_names)} class names")
        num_classes = len(class_names)
    dropout = kwargs.pop("dropout", 0.0)
    backbone = spinenet(variant, **{**TPU_CLASSIFIER_OPTIONS, **kwargs})
    model = SpineNetClassifier(backbone, num_classes, dropout)
    model.class_names = (
        list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    )
    model.image_size = image_size
    return model
