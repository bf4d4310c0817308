"""Convolution, normalisation and activation building blocks shared by SpineNet and its heads."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from ..errors import ModelError

# Model Garden's BatchNormalization defaults (TF decay 0.99 is PyTorch momentum 0.01).
BN_MOMENTUM = 0.01
BN_EPS = 1e-3

NORMS = ("bn", "syncbn", "frozenbn", "gn")
ACTIVATIONS = {"relu": nn.ReLU, "swish": nn.SiLU, "silu": nn.SiLU}
DEFAULT_ACTIVATION = "relu"  # the paper's and Model Garden's default
# "same": TensorFlow's asymmetric "same" padding everywhere (Model Garden). "symmetric": pad
# like torchvision. "fixed": tensorflow/tpu's nn_ops.conv2d_fixed_padding, i.e. convolutions
# padded symmetrically but max pools padded "same" (tf.layers.max_pooling2d).
PADDINGS = ("same", "symmetric", "fixed")

NormFactory = Callable[[int], nn.Module]


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that counts its training batches on the host.

    PyTorch adds 1 to ``num_batches_tracked`` with one op per norm and step (on a GPU, a kernel
    launch: 170 of the ~1,650 kernels of a SpineNet-49S RetinaNet training step), though it
    reads the count only when ``momentum`` is None. Here the count collects in a Python int and
    reaches the buffer whenever the state dict is taken, so checkpoints hold the same value.
    Outputs, gradients and running statistics are those of ``nn.BatchNorm2d``; compiled and
    CUDA-graph-captured code takes the plain path (a host count would not be replayed), as does
    a norm switched by :meth:`count_on_device` (whose calls may be warm-ups of a capture).
    """

    _uncounted = 0  # training batches not yet added to num_batches_tracked
    _on_device = False

    def count_on_device(self) -> None:
        """Count batches in the buffer from now on, PyTorch's way (for CUDA graphs)."""
        self._count_batches()
        self._on_device = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.track_running_stats):
            return super().forward(x)  # the count is neither read nor advanced
        if (
            self.momentum is None
            or self._on_device
            or torch.compiler.is_compiling()
            or (x.is_cuda and torch.cuda.is_current_stream_capturing())
        ):
            self._count_batches()
            return super().forward(x)
        self._check_input_dim(x)
        self._uncounted += 1
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, True, self.momentum,
            self.eps,
        )  # fmt: skip

    def _count_batches(self) -> None:
        if self._uncounted:
            with torch.no_grad():
                self.num_batches_tracked.add_(self._uncounted)
            self._uncounted = 0

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        self._count_batches()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self._count_batches()  # a loaded count replaces it, as it would the plain module's
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def make_norm(norm: str = "bn", momentum: float = BN_MOMENTUM, eps: float = BN_EPS) -> NormFactory:
    """A factory ``channels -> norm module`` for ``bn`` (:class:`BatchNorm2d`), ``syncbn``,
    ``frozenbn`` or ``gn``."""
    if norm == "bn":
        return partial(BatchNorm2d, eps=eps, momentum=momentum)
    if norm == "syncbn":
        return partial(nn.SyncBatchNorm, eps=eps, momentum=momentum)
    if norm == "frozenbn":
        return partial(FrozenBatchNorm2d, eps=eps)
    if norm == "gn":
        # 32 groups where the width allows it; scaled widths such as 41 or 166 need fewer.
        return lambda channels: nn.GroupNorm(math.gcd(32, channels), channels, eps=eps)
    raise ModelError(f"unknown norm {norm!r}; expected one of {NORMS}")


def make_activation(name: str) -> Callable[[], nn.Module]:
    """Return a factory for ``relu`` or ``swish`` (SiLU)."""
    try:
        act = ACTIVATIONS[name]
    except KeyError:
        raise ModelError(
            f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}"
        ) from None
    return partial(act, inplace=True)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """Keras/TF "same" padding of one dimension: the odd extra pixel goes after (bottom/right).

    ``(ceil(size / stride) - 1) * stride + kernel - size`` written without a comparison when
    ``kernel >= stride`` (never negative then), so a traced size (a 0-dim tensor under
    ``torch.jit.trace``) stays symbolic instead of being frozen at the example's value.
    """
    total = kernel - stride + (-size) % stride
    if kernel < stride:
        total = max(total, 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, kernel: int, stride: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``(x, padding)`` such that a convolution of ``x`` with ``padding`` pads like TF "same".

    Symmetric cases (e.g. odd sizes) leave ``x`` as it is and let the convolution pad, with no
    padded copy; asymmetric ones return a padded copy and zero padding. Traced (for export),
    the padding depends on the input size, so it is always an explicit pad.
    """
    top, bottom = same_padding(x.shape[-2], kernel, stride)
    left, right = same_padding(x.shape[-1], kernel, stride)
    if not torch.jit.is_tracing() and top == bottom and left == right:
        return x, (top, left)
    return F.pad(x, (left, right, top, bottom)), (0, 0)


class SameConv2d(nn.Conv2d):
    """Strided convolution padded like TF "same", so TensorFlow weights give the same outputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, padding = pad_same(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)


class SameMaxPool2d(nn.MaxPool2d):
    """3x3 stride-2 max pooling padded like TF "same" (padding never wins the max).

    "Same" pads (1, 1) on an odd side and (0, 1) on an even one; pooling's implicit -inf
    padding of 1 and ``ceil_mode``'s partial last window express both without a padded copy.
    Traced (for export), where the padding must not depend on the example's size, it pads with
    -inf explicitly: the same maxima.
    """

    def __init__(self) -> None:
        super().__init__(3, 2, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing():
            return same_max_pool(x, 3, 2)
        padding = (x.shape[-2] % 2, x.shape[-1] % 2)
        return F.max_pool2d(x, 3, 2, padding, ceil_mode=True)


def same_max_pool(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Max pooling of any kernel and stride padded like TF "same" (-inf never wins the max)."""
    top, bottom = same_padding(x.shape[-2], kernel, stride)
    left, right = same_padding(x.shape[-1], kernel, stride)
    x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
    return F.max_pool2d(x, kernel, stride)


def conv2d(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    padding: str = "same",
    bias: bool = False,
) -> nn.Conv2d:
    """A square convolution whose output is ``ceil(input / stride)`` for any input size.

    Stride 1 with an odd kernel pads symmetrically in both modes; only strided convolutions
    differ, and ``padding="same"`` then reproduces TensorFlow's asymmetric rule.
    """
    if padding not in PADDINGS:
        raise ModelError(f"unknown padding {padding!r}; expected one of {PADDINGS}")
    if stride > 1 and padding == "same":
        return SameConv2d(in_channels, out_channels, kernel_size, stride, padding=0, bias=bias)
    return nn.Conv2d(
        in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=bias
    )


def max_pool(padding: str = "same") -> nn.MaxPool2d:
    """3x3 stride-2 max pooling with output ``ceil(input / 2)``."""
    if padding in ("same", "fixed"):
        return SameMaxPool2d()
    return nn.MaxPool2d(3, 2, padding=1)


class ConvNormAct(nn.Sequential):
    """Convolution without bias, normalisation, and an optional activation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        norm: NormFactory,
        act: Callable[[], nn.Module] | None = None,
        stride: int = 1,
        padding: str = "same",
    ) -> None:
        layers: dict[str, nn.Module] = {
            "conv": conv2d(in_channels, out_channels, kernel_size, stride, padding),
            "norm": norm(out_channels),
        }
        if act is not None:
            layers["act"] = act()
        super().__init__()
        for name, layer in layers.items():
            self.add_module(name, layer)
