"""Running a chain of convolutions and norms on a batch padded to one of a few sizes, so that
cuDNN plans each convolution for those sizes only (the R-CNN mask head, whose batch is the
positives of each step)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd
from torchvision.ops.misc import FrozenBatchNorm2d

__all__ = ["bucket_size", "bucketed"]

# Modules that compute each row from that row alone, so padded rows cannot reach real ones.
_ROW_BY_ROW = (_ConvNd, nn.ReLU, nn.SiLU, nn.Identity, nn.GroupNorm, FrozenBatchNorm2d)


def bucket_size(n: int) -> int:
    """The number of rows ``n`` rows are padded to: the smallest ``m * 2**k >= n`` with ``m`` in
    4, 5, 6, 7 (0 for 0)."""
    # Four sizes an octave: under 25% more rows (compute) than n from 4 rows up, and a few dozen
    # sizes (cuDNN plans, made once per size) for any run up to thousands of RoIs. Fewer than 4
    # rows pad to 4: too little work to matter.
    if n <= 4:
        return 4 if n else 0
    shift = (n - 1).bit_length() - 3  # 4 << shift < n <= 8 << shift
    return -(-n >> shift) << shift  # n rounded up to a multiple of 2**shift


def bucketed(x: Tensor, *chain: nn.Module, enabled: bool | None = None) -> Tensor:
    """Apply ``chain`` (each module to the previous one's output) to ``x`` padded to
    :func:`bucket_size` rows, computing what the plain calls compute.

    cuDNN makes a plan for every batch size a convolution meets, forward and backward, which a
    batch of changing size pays every step (the Mask R-CNN's mask head on a GPU: ~13 ms of host
    time in a 118 ms training step, measured).
    Padded, the convolutions, transposed convolutions and activations run on every row, while
    each norm with batch statistics (``_NormBase``: BatchNorm, SyncBatchNorm) sees only the real
    rows, the rest zero-filled again after it: the same outputs, gradients and running
    statistics for the real rows.

    Args:
        x (Tensor): input of ``N`` rows.
        chain (nn.Module): modules run in turn; each of nested plain ``nn.Sequential`` of
            convolutions, norms, ReLU / SiLU, else the chain runs unpadded.
        enabled (bool, optional): pad; ``None``: where ``x`` is on a CUDA device (a CPU has no
            plans to save and would only compute the padding).

    Returns:
        Tensor: the chain's output, ``N`` rows.
    """
    n, rows = x.shape[0], bucket_size(x.shape[0])
    pad = (x.is_cuda if enabled is None else enabled) and rows != n
    layers = _row_layers(chain) if pad else None
    if layers is None:
        for module in chain:
            x = module(x)
        return x
    padding = (0, 0) * (x.dim() - 1) + (0, rows - n)  # rows appended at the end
    x = F.pad(x, padding)
    for layer in layers:
        if isinstance(layer, _NormBase):  # batch statistics: the real rows', as unpadded
            x = F.pad(layer(x[:n]), padding)
        else:
            x = layer(x)
    return x[:n]


def _row_layers(chain: tuple[nn.Module, ...]) -> list[nn.Module] | None:
    """The modules ``chain`` calls, in order, where it is nested plain ``nn.Sequential`` of
    :data:`_ROW_BY_ROW` modules and norms; else None."""
    layers = []
    for module in chain:
        for _, m in module.named_modules(remove_duplicate=False):  # depth first: call order
            if "forward" in vars(m):  # replaced on the instance (bf16, compiled)
                return None
            if isinstance(m, (*_ROW_BY_ROW, _NormBase)):
                layers.append(m)
            elif not isinstance(m, nn.Sequential) or type(m).forward is not nn.Sequential.forward:
                return None  # e.g. a norm per pyramid level (heads.LevelConvNormAct)
            elif (
                m._forward_hooks
                or m._forward_pre_hooks
                or m._backward_hooks
                or m._backward_pre_hooks
            ):
                return None  # walked, not called: its hooks would not run
    return layers
