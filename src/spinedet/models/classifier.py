"""SpineNet ImageNet classifiers, built as tensorflow/tpu's ``ClassificationModel`` builds them
(``models/official/detection/modeling/classification_model.py`` with the ``all`` aggregation of
``heads.ClassificationHead``, as the zoo's ``spinenet*_classification.yaml`` configure it).

Input: the network reads images already normalised, ``(x - mean) / std`` of RGB in [0, 1]
with ImageNet's mean and std (what tensorflow/tpu's classification parser feeds it, so
converted zoo weights see what they were trained on). Unlike torchvision's detectors the model
does not normalise by itself: ``spinedet.data.transforms.classification_eval_transforms`` (used
by eval, predict and the Predictor) and ``classification_train_transforms`` do, and an ONNX
export takes the normalised input as is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
        label_smoothing: of the training loss (cross-entropy), as in ``F.cross_entropy``.
    """

    def __init__(self, backbone: SpineNet, num_classes: int = 1000, dropout: float = 0.0,
                 label_smoothing: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        if num_classes < 1:
            raise ModelError(f"num_classes must be positive, got {num_classes}")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ModelError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
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

    def loss(
        self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
        """Cross-entropy with the model's label smoothing (``reduction`` as in torch)."""
        return F.cross_entropy(logits, labels, reduction=reduction,
                               label_smoothing=self.label_smoothing)  # fmt: skip

    def forward(
        self,
        x: torch.Tensor | Sequence[torch.Tensor],
        targets: Sequence[dict[str, Any]] | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Logits ``[N, num_classes]`` of NCHW images (or a list of equally sized CHW images).

        In training mode with ``targets`` (``{"labels": class index}`` per image), the losses
        as torchvision's detectors return them: ``{"loss_classifier": ...}``, so the engine
        trains classifiers and detectors alike.
        """
        if not isinstance(x, torch.Tensor):
            x = torch.stack(list(x))
        logits = self.fc(self.dropout(self.features(x)))
        if targets is None or not self.training:
            return logits
        labels = torch.stack([torch.as_tensor(t["labels"]) for t in targets]).to(logits.device)
        return {"loss_classifier": self.loss(logits, labels.view(-1))}


@register_task(
    "classifier",
    families={"spinenet": None},
    runtime={"dropout", "image_size", "label_smoothing"},
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
        **kwargs: ``dropout``, ``label_smoothing``, or any
            :class:`~spinedet.models.spinenet.SpineNet` option (``activation="swish"``,
            ``stochastic_depth_rate=0.2``, ...), which override the tensorflow/tpu defaults in
            :data:`TPU_CLASSIFIER_OPTIONS`.

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
    label_smoothing = kwargs.pop("label_smoothing", 0.0)
    backbone = spinenet(variant, **{**TPU_CLASSIFIER_OPTIONS, **kwargs})
    model = SpineNetClassifier(backbone, num_classes, dropout, label_smoothing)
    model.class_names = (
        list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    )
    model.image_size = image_size
    return model
