"""Inference-time optimisations: BatchNorm folding, channels-last layout, CUDA graphs,
``torch.compile``, and bfloat16 networks on CPUs with AMX.

Each transformation but bfloat16 keeps the model's outputs equal to the plain model's (to float
rounding); ``tests/test_optimize.py`` checks this, and that bfloat16 stays close.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils._pytree import tree_map
from torchvision.ops.misc import FrozenBatchNorm2d

from .cuda_graphs import cuda_graph_parts, pad_to_square, use_cuda_graphs
from .models.layers import SameConv2d, pad_same

__all__ = [
    "OneDNNConv2d",
    "amx_available",
    "fold_bn_into_conv",
    "fuse_bn",
    "optimize_for_inference",
    "use_bf16",
    "use_onednn",
]

_FOLDABLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d)
# Layers whose output channels a following norm scales: the R-CNN box head's FC and the mask
# head's upsampling (whose weight holds output channels in dim 1) besides convolutions.
_LINEAR = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def _is_separable(module: nn.Module) -> bool:
    # models.heads.separable_conv: depthwise then pointwise, applied in order.
    return isinstance(module, nn.Sequential) and isinstance(
        getattr(module, "pointwise", None), nn.Conv2d
    )


@torch.no_grad()
def fold_bn_into_conv(conv: nn.Module, norm: nn.Module) -> nn.Module:
    """Return a copy of ``conv`` (a Conv2d of any class, e.g. ``SameConv2d``, a ConvTranspose2d,
    a Linear, or a separable conv ending in a pointwise conv) computing ``norm(conv(x))`` with
    the normalisation's running statistics folded into weight and bias."""
    if _is_separable(conv):
        fused = copy.deepcopy(conv)
        fused.pointwise = fold_bn_into_conv(conv.pointwise, norm)
        return fused
    mean, var = norm.running_mean, norm.running_var
    gamma = norm.weight if norm.weight is not None else torch.ones_like(mean)
    beta = norm.bias if norm.bias is not None else torch.zeros_like(mean)
    scale = gamma * torch.rsqrt(var + norm.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(mean)
    fused = copy.deepcopy(conv)
    shape = [1] * conv.weight.dim()
    shape[1 if isinstance(conv, nn.ConvTranspose2d) else 0] = -1
    fused.weight = nn.Parameter(conv.weight * scale.reshape(shape), requires_grad=False)
    fused.bias = nn.Parameter((bias - mean) * scale + beta, requires_grad=False)
    return fused


def _foldable(norm: nn.Module) -> bool:
    # A norm without running statistics normalises with batch statistics even in eval mode.
    return isinstance(norm, _FOLDABLE) and getattr(norm, "track_running_stats", True)


def _fuse_sequential(seq: nn.Sequential) -> None:
    # Conv and norm are adjacent children in our ConvNormAct (conv/norm/act) and torchvision's
    # Conv2dNormActivation (0/1/2). The RetinaNet head's LevelConvNormAct shares one conv across
    # levels with a norm per level (a ModuleList) and computes ``norms[level](conv(x))``: there
    # the conv becomes an identity and each norm the conv folded with that norm.
    names = list(seq._modules)
    for conv_name, norm_name in zip(names, names[1:], strict=False):
        conv, norm = seq._modules[conv_name], seq._modules[norm_name]
        if not (isinstance(conv, _LINEAR) or _is_separable(conv)):
            continue
        if _foldable(norm):
            seq._modules[conv_name] = fold_bn_into_conv(conv, norm)
            seq._modules[norm_name] = nn.Identity()
        elif isinstance(norm, nn.ModuleList) and len(norm) and all(map(_foldable, norm)):
            for i, level_norm in enumerate(norm):
                norm[i] = fold_bn_into_conv(conv, level_norm)
            seq._modules[conv_name] = nn.Identity()


def fuse_bn(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every BatchNorm / SyncBatchNorm / FrozenBatchNorm2d that directly follows a
    convolution, transposed convolution or linear layer into that layer (GroupNorm is left
    alone), including the per-level norms after the RetinaNet and RPN heads' shared convs (each
    level then gets its own folded conv).

    Only valid for inference: the model must be in eval mode. Returns a fused copy and leaves
    ``model`` untouched unless ``inplace=True``. The folded norms become ``nn.Identity``, so the
    result's state dict no longer matches the unfused model's.
    """
    if model.training:
        raise ValueError("fuse_bn folds running statistics and needs model.eval() first")
    if not inplace:
        model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, nn.Sequential):
            _fuse_sequential(module)
    return model


class OneDNNConv2d(nn.Conv2d):
    """A CPU convolution (plain or TF-"same" padded) that always runs oneDNN.

    PyTorch sends 1x1 convolutions on one thread, and batch-1 inputs of under 20,480 values,
    to its im2col/GEMM path, which on CPUs where oneDNN has AVX-512 kernels is about 2.5x
    slower for SpineNet's 1x1 convolutions (and copies channels-last inputs).
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            device="meta",  # no new storage: the original parameters are shared below
        )
        self.weight, self.bias = conv.weight, conv.bias
        self.same = isinstance(conv, SameConv2d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = self.padding
        if self.same:
            x, padding = pad_same(x, self.kernel_size[0], self.stride[0])
        return torch.mkldnn_convolution(
            x, self.weight, self.bias, padding, self.stride, self.dilation, self.groups
        )


def use_onednn(model: nn.Module) -> nn.Module:
    """Replace (in place) every zero-padded ``nn.Conv2d`` / ``SameConv2d`` of a CPU model by an
    :class:`OneDNNConv2d` sharing its parameters."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            plain = type(child) in (nn.Conv2d, SameConv2d)
            if plain and child.padding_mode == "zeros" and not isinstance(child.padding, str):
                setattr(parent, name, OneDNNConv2d(child))
    return model


def amx_available() -> bool:
    """Whether this CPU has AMX tiles, where oneDNN runs bfloat16 convolutions ~9x faster than
    float32 (a 256 -> 256 3x3 conv at 80 x 80: 5 ms vs 45 ms on a 2-core Sapphire Rapids VM)."""
    return torch.cpu._is_amx_tile_supported()


def _floats_to(tree, dtype: torch.dtype):
    floating = lambda v: isinstance(v, torch.Tensor) and v.is_floating_point()  # noqa: E731
    return tree_map(lambda v: v.to(dtype) if floating(v) else v, tree)


class _BF16Forward:
    """A part's forward in bfloat16: floating inputs cast to it, floating outputs back to
    float32, so box decoding, RoIAlign and post-processing stay in float32."""

    def __init__(self, forward) -> None:
        self.forward = forward

    def __call__(self, *args, **kwargs):
        out = self.forward(*_floats_to(args, torch.bfloat16), **kwargs)
        return _floats_to(out, torch.float32)


def use_bf16(model: nn.Module) -> nn.Module:
    """Run (in place) the convolutional parts of ``model`` (:func:`~spinedet.cuda_graphs.
    cuda_graph_parts`: backbone, dense head, box head) and a Mask R-CNN's mask head with
    bfloat16 weights and activations; everything between them stays float32."""
    parts = cuda_graph_parts(model)
    roi_heads = getattr(model, "roi_heads", None)
    if getattr(roi_heads, "mask_head", None) is not None:
        parts += [roi_heads.mask_head, roi_heads.mask_predictor]
    for part in parts:
        part.to(torch.bfloat16)
        part.forward = _BF16Forward(part.forward)
    return model


def optimize_for_inference(
    model: nn.Module,
    channels_last: bool = True,
    compile: bool = False,
    inplace: bool = False,
    onednn: bool | None = None,
    cuda_graphs: bool | None = None,
    bf16: bool | None = None,
) -> nn.Module:
    """Eval mode, BatchNorm folding, channels-last weights, oneDNN convolutions on CPU, CUDA
    graphs on a GPU, and optionally ``torch.compile``.

    Channels-last weights make oneDNN/cuDNN pick NHWC kernels; the first convolution's output is
    then channels-last and the layout carries through the network, whatever the input layout.
    ``onednn`` (default: on CPUs with oneDNN, unless compiling) applies :func:`use_onednn`.
    ``cuda_graphs`` (default: for a model on CUDA, unless compiling) pads a detector's inputs to
    its ``image_size`` square and replays the backbone and dense head as CUDA graphs
    (:mod:`spinedet.cuda_graphs`). ``compile=True`` compiles the backbone and, for detectors,
    the dense heads (torchvision's pre- and post-processing is dynamic Python and stays eager).
    ``bf16`` (default: a spinedet model on a CPU with AMX, :func:`amx_available`, unless
    compiling) applies :func:`use_bf16`: not equal to float32, but close (on the quickstart's
    test split, mask AP50 within 0.005). Returns a new model unless ``inplace=True``; gradients
    are disabled on it.
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval().requires_grad_(False)
    fuse_bn(model, inplace=True)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    devices = {p.device.type for p in model.parameters()}
    if onednn is None:  # Dynamo cannot trace mkldnn_convolution: compiling leaves convs to Inductor
        onednn = devices == {"cpu"} and torch.backends.mkldnn.is_available() and not compile
    if onednn:
        use_onednn(model)
    if bf16 is None:  # spinedet's models: its parts are known (a torchvision one's are not)
        spinedet_model = hasattr(model, "description")
        bf16 = devices == {"cpu"} and amx_available() and not compile and spinedet_model
    if bf16:
        use_bf16(model)
    if cuda_graphs is None:
        cuda_graphs = devices == {"cuda"} and not compile
    if cuda_graphs:
        pad_to_square(model)
        use_cuda_graphs(model)
    if compile:
        _compile_parts(model)
    return model


def _compile_parts(model: nn.Module) -> None:
    # The parts CUDA graphs capture, whose input shapes repeat. Freezing turns the (frozen)
    # weights into constants, which lets Inductor prepack them for oneDNN and fuse each
    # convolution with its bias, activation and residual add.
    for part in cuda_graph_parts(model):
        part.forward = torch.compile(part.forward, dynamic=False, options={"freezing": True})
