"""The inner loop: which samples each rank sees in which order, and one optimizer step over
``train.accumulate`` batches with AMP, gradient clipping and a guard against non-finite losses."""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from ..errors import SpinedetError, Stopped
from .distributed import DistInfo

__all__ = ["SeededSamples", "Stepper", "StopSignal", "amp_mode", "epoch_order"]


class SeededSamples(Dataset):
    """Reseeds torch's RNG from (seed, epoch, index) before each sample's augmentation, so a
    sample looks the same whether the run was interrupted or not, in any worker."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
        return self.dataset[index]


def epoch_order(n: int, seed: int, epoch: int, info: DistInfo) -> list[int]:
    """This rank's share of a seeded shuffle, padded so every rank gets as many samples."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    order = order.tolist()
    order += order[: (-len(order)) % info.world_size]
    return order[info.rank :: info.world_size]


def amp_mode(setting: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a GradScaler is needed). Mixed precision on CUDA only."""
    if device.type != "cuda" or setting == "none":
        return None, False
    if setting == "fp16" or (setting == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16, True
    if setting in ("bf16", "auto"):
        return torch.bfloat16, False
    raise SpinedetError(f"train.amp must be auto, bf16, fp16 or none, got {setting!r}")


class StopSignal:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next step boundary and exits, or
    gives up validation after the current batch (the epoch's checkpoint precedes it, and
    resuming validates that epoch again). A second signal stops at once, leaving the checkpoint
    on disk as it is.

    With ``early``, a signal before :meth:`begin` stops at once (:class:`Stopped` saying
    ``early``): before the first step there is nothing to finish or save."""

    def __init__(self, early: str | None = None) -> None:
        self.signal: int | None = None
        self.early = early
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        self._pid = os.getpid()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            return  # a loader worker forked with the handler: the training process decides
        if self.early is not None:
            raise Stopped(self.early, signum)
        if self.signal is not None:
            raise KeyboardInterrupt(
                "stopped at once on a second signal; a checkpoint on disk stands: continue "
                "with --resume where there is one"
            )
        self.signal = signum
        # os.write, not print or logging: safe inside a signal handler.
        os.write(2, b"\nstopping after the current step or validation batch (signal again to "
                 b"stop at once)\n")  # fmt: skip

    def begin(self) -> None:
        """From now on a first signal only sets the flag."""
        self.early = None

    def requested(self) -> bool:
        """Whether a signal has come (on this rank)."""
        return self.signal is not None

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


Batch = tuple[Sequence[torch.Tensor], Sequence[dict[str, Any]]]


class Stepper:
    """One optimizer step from ``len(batches)`` batches: each batch's loss is divided by their
    number, so the gradients are those of the mean over the whole effective batch (exactly so
    for losses that are means over images). DDP synchronises on the last batch only."""

    def __init__(self, net: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 info: DistInfo, amp: str = "none", clip_grad: float = 0.0,
                 seed: int = 0) -> None:  # fmt: skip
        self.net, self.optimizer, self.device, self.info = net, optimizer, device, info
        self.clip_grad, self.seed = clip_grad, seed
        self.amp_dtype, use_scaler = amp_mode(amp, device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.stopping = False

    def _to_device(self, batch: Batch) -> Batch:
        images, targets = batch
        images = [img.to(self.device, non_blocking=True) for img in images]
        # Queued, not waited for: the loader pins the batch on a GPU, so the copies overlap.
        targets = [{k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                    for k, v in t.items()} for t in targets]  # fmt: skip
        return images, targets

    def backward(
        self, batches: Sequence[Batch], step: int, stop: bool = False
    ) -> dict[str, float] | None:
        """Accumulate the gradients of ``batches``; None (gradients cleared) when a loss on any
        rank was not finite. The mean losses otherwise. ``stop``: this rank was asked to stop;
        afterwards :attr:`stopping` says whether any rank was, the same on every rank, so all
        stop after the same step and none waits in a collective for one that left.

        The losses reach the host once per step, after every backward pass is queued: a check
        after each forward would stall a GPU's queue (a non-finite loss only makes the
        gradients non-finite, and they are thrown away)."""
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, torch.Tensor] = {}
        autocast = (torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype
                    else nullcontext())  # fmt: skip
        for micro, batch in enumerate(batches):
            # Proposal sampling and drop-path draw from this seed: resume is bit-identical.
            torch.manual_seed(self.seed * 1_000_033 + (step * len(batches) + micro) * 101
                              + self.info.rank)  # fmt: skip
            last = micro == len(batches) - 1
            sync = nullcontext() if last or not self.info.enabled else self.net.no_sync()
            with sync:
                with autocast:
                    losses = self.net(*self._to_device(batch))
                loss = sum(losses.values())
                self.scaler.scale(loss / len(batches)).backward()
            for key, value in {"loss": loss, **losses}.items():
                totals[key] = totals.get(key, 0.0) + value.detach().float() / len(batches)
        values = torch.stack(list(totals.values()))
        # [any loss not finite, asked to stop]; torch.full is a fill, no copy to the device.
        flags = torch.cat([(~torch.isfinite(values).all()).float().view(1),
                           torch.full((1,), float(stop), device=values.device)])  # fmt: skip
        if self.info.enabled:  # every rank skips (and stops) together, or DDP would hang
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        host = torch.cat([flags, values]).tolist()
        self.stopping = host[1] == 1
        if host[0] == 1:
            self.optimizer.zero_grad(set_to_none=True)
            return None
        return dict(zip(totals, host[2:], strict=True))

    def step(self) -> None:
        """Clip (when set) and apply the accumulated gradients."""
        if self.clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.net.parameters(), self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
