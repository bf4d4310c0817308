"""CUDA graphs for the parts of a model whose input shapes repeat from call to call.

On a GPU, SpineNet's step is launch-bound: thousands of small kernels (convolutions 41 to 332
channels wide, BatchNorm, resampling), each taking the host longer to launch than the device to
run. A CUDA graph launches a captured sequence with one call. The backbone and the dense head
(RetinaNet's towers, the RPN's convolutions) see the same shapes on every training step, whose
batches are ``image_size``-square crops, and at inference when images are padded to that square
(:func:`pad_to_square`), as does the R-CNN box head on its fixed number of proposals per
image; anchor matching, proposal selection and the mask head depend on the data and stay eager.

:func:`use_cuda_graphs` replaces such a part's ``forward`` by a :class:`CudaGraphs`, which
captures one graph per call signature (shapes, dtypes, autocast type, training or inference)
when it sees the signature a second time, and replays it from then on: training graphs hold the
forward and the backward pass (``torch.cuda.make_graphed_callables``), inference graphs the
forward alone. Calls on the CPU, while tracing or compiling, with a new signature, and beyond
``max_graphs`` signatures run the module as it is. Parameters, buffers and state dicts are
untouched: checkpoints load either way.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .models import describe
from .models.layers import BatchNorm2d

__all__ = ["CudaGraphs", "cuda_graph_parts", "pad_to_square", "use_cuda_graphs"]


class _Shell(nn.Module):
    """``module`` called with flattened tensor arguments, the form make_graphed_callables takes;
    its parameters are the module's, so the captured backward computes their gradients."""

    def __init__(self, module: nn.Module, spec: Any) -> None:
        super().__init__()
        self.inner, self.spec = module, spec

    def forward(self, *flat: torch.Tensor) -> Any:
        return type(self.inner).forward(self.inner, *tree_unflatten(list(flat), self.spec))


class CudaGraphs:
    """A module's ``forward`` that replays CUDA graphs of the signatures it has seen twice.

    A training graph (module in training mode, gradients enabled) replays the forward pass and
    puts one autograd node on the tape whose backward replays the captured backward pass; an
    inference graph (eval mode, gradients off) replays the forward. Outputs are the graph's own
    buffers, overwritten by the next replay, as a training step or a detector's postprocessing
    consumes them before that.

    Capturing runs the module a few times on a side stream; BatchNorm running statistics are
    restored afterwards, so a graphed step updates them exactly once, as the eager one does.
    """

    def __init__(self, module: nn.Module, max_graphs: int = 4) -> None:
        if "forward" in module.__dict__:
            raise ValueError(f"{type(module).__name__}.forward is already replaced")
        self.module, self.max_graphs = module, max_graphs
        self.graphs: dict[tuple, Callable[..., Any]] = {}
        self.seen: set[tuple] = set()
        for m in module.modules():
            if isinstance(m, BatchNorm2d):  # a replay cannot advance a host-side count
                m.count_on_device()

    def __deepcopy__(self, memo: dict) -> CudaGraphs:
        # A copy of the module gets its own graphs (these replay the original's parameters).
        # It is met while the module itself is copied, before the copy has its submodules.
        fresh = CudaGraphs.__new__(CudaGraphs)
        fresh.module, fresh.max_graphs = copy.deepcopy(self.module, memo), self.max_graphs
        fresh.graphs, fresh.seen = {}, set()
        return fresh

    def eager(self, *args: Any) -> Any:
        return type(self.module).forward(self.module, *args)

    def __call__(self, *args: Any) -> Any:
        flat, spec = tree_flatten(args)
        key = self._signature(flat, spec)
        if key is None:
            return self.eager(*args)
        graph = self.graphs.get(key)
        if graph is None:
            if key not in self.seen or len(self.graphs) >= self.max_graphs:
                if len(self.seen) >= 64:  # shapes that never repeat: forget them
                    self.seen.clear()
                self.seen.add(key)  # a shape seen once (an odd evaluation image) stays eager
                return self.eager(*args)
            training, amp = key[:2]
            graph = self.graphs[key] = self._capture(flat, spec, training, amp)
        return graph(*flat)

    def _signature(self, flat: list, spec: Any) -> tuple | None:
        if not flat or not all(isinstance(t, torch.Tensor) and t.is_cuda for t in flat):
            return None
        if (
            torch.jit.is_tracing()
            or torch.compiler.is_compiling()
            or torch.cuda.is_current_stream_capturing()
        ):
            return None
        training = self.module.training
        if training != torch.is_grad_enabled():  # train mode without gradients, or the reverse
            return None
        amp = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        tensors = tuple((t.shape, t.stride(), t.dtype, t.device, t.requires_grad) for t in flat)
        # Graphs read parameters at fixed addresses: a model moved since (.to(), .half()) has
        # new ones, and a new signature.
        first = next(self.module.parameters(), None)
        weights = first.data_ptr() if first is not None else 0
        return training, amp, torch.is_inference_mode_enabled(), spec, tensors, weights

    def _capture(
        self, flat: list, spec: Any, training: bool, amp: torch.dtype | None
    ) -> Callable[..., Any]:
        static = [t.detach().clone().requires_grad_(t.requires_grad) for t in flat]
        if not training:
            return self._capture_inference(static, spec)
        saved = [b.clone() for b in self.module.buffers()]
        shell = _Shell(self.module, spec)
        # make_graphed_callables needs autocast's weight-cast cache off while it captures.
        with torch.autocast("cuda", dtype=amp, enabled=amp is not None, cache_enabled=False):
            graphed = torch.cuda.make_graphed_callables(shell, tuple(static))
        with torch.no_grad():  # the warm-up passes updated the running statistics
            for buffer, value in zip(self.module.buffers(), saved, strict=True):
                buffer.copy_(value)
        return graphed

    def _capture_inference(self, static: list, spec: Any) -> Callable[..., Any]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: cuDNN's choices and workspaces, off the graph
            for _ in range(2):
                self.eager(*tree_unflatten(static, spec))
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs, out_spec = tree_flatten(self.eager(*tree_unflatten(static, spec)))

        def replay(*inputs: torch.Tensor) -> Any:
            for buffer, x in zip(static, inputs, strict=True):
                if buffer.data_ptr() != x.data_ptr():
                    buffer.copy_(x)
            graph.replay()
            return tree_unflatten(outputs, out_spec)

        return replay

    def remove(self) -> None:
        """Give the module back its own ``forward`` and free the graphs."""
        if self.module.__dict__.get("forward") is self:
            del self.module.forward
        self.graphs.clear()


def cuda_graph_parts(model: nn.Module) -> list[nn.Module]:
    """The parts of a spinedet model whose input shapes are fixed by the input size: a
    detector's backbone and dense head (RetinaNet's head, the R-CNNs' RPN head), a classifier's
    backbone, or a bare backbone; and the R-CNNs' box head, which sees a fixed number of
    proposals per image wherever the RPN finds enough (training: the ``box_batch_size_per_image``
    sampled, inference: ``rpn_post_nms_top_n_test``)."""
    task = describe(model).task
    if task == "backbone":
        return [model]
    if task == "classifier":
        return [model.backbone]
    if task == "retinanet":
        return [model.backbone, model.head]
    return [model.backbone, model.rpn.head, model.roi_heads.box_head]


def use_cuda_graphs(model: nn.Module, max_graphs: int = 4) -> list[CudaGraphs]:
    """Replay :func:`cuda_graph_parts` of ``model`` (in place) as CUDA graphs where their calls
    run on CUDA (see :class:`CudaGraphs`). Returns the replacements; ``remove()`` undoes each.

    Graphs hold the addresses of the parameters: move the model to its device first, and
    change which parameters require gradients only before the first calls (or remove and use
    again). Not for a model inside DistributedDataParallel, whose gradient hooks run during
    the backward pass.
    """
    graphed = []
    for part in cuda_graph_parts(model):
        part.forward = CudaGraphs(part, max_graphs)
        graphed.append(part.forward)
    return graphed


def pad_to_square(model: nn.Module) -> bool:
    """Pad a detector's inputs to the ``image_size`` square (the paper's fixed training and
    evaluation input) instead of the batch's size rounded up to ``size_divisible``, so that
    every batch has one shape and the backbone's graph can replay. Whether it applied: only
    where ``image_size`` is itself a multiple of ``size_divisible``, which keeps what that
    requires (e.g. tensorflow/tpu's pooling, at multiples of the coarsest stride)."""
    transform = getattr(model, "transform", None)
    if transform is None or transform.max_size % transform.size_divisible:
        return False
    transform.size_divisible = transform.max_size
    return True
