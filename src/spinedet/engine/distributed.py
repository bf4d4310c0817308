"""torch.distributed set-up for runs launched by ``torchrun`` (any number of nodes)."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..device import default_device

__all__ = ["DistInfo", "any_rank", "broadcast_buffers", "exchange", "flush_denormals", "from_main",
           "gather_objects", "gather_to", "is_main", "lost_peer", "setup", "teardown"]  # fmt: skip


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str | None = None, timeout_min: float = 30) -> DistInfo:
    """Join the process group torchrun describes in the environment, or run single-process.

    NCCL on GPUs, gloo on CPU. ``device`` forces ``cpu``/``cuda``; by default CUDA is used
    when present. A collective that waits longer than ``timeout_min`` minutes fails the run
    (instead of hanging when one rank died).
    """
    flush_denormals()
    use_cuda = default_device(device).type == "cuda"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        with _killable():
            dist.init_process_group("nccl" if use_cuda else "gloo",
                                    timeout=timedelta(minutes=timeout_min))  # fmt: skip
    return DistInfo(rank, local_rank, world_size, dev)


@contextmanager
def _killable() -> Iterator[None]:
    """SIGINT and SIGTERM kill at once inside the block. Waiting for peers that never come,
    ``init_process_group`` stays in C++ until its timeout (30 minutes by default), and Python
    runs a signal handler only after that: a stuck rank would ignore ``kill`` and Ctrl-C. Before
    the group exists there is nothing to save or report."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal.signal works in the main thread only
        return
    previous = {s: signal.signal(s, signal.SIG_DFL) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def flush_denormals() -> None:
    """Treat denormal floats as zero on the CPU. Zero-initialised residual branches and BN
    produce many of them early in training, and x86 arithmetic on denormals is so slow that a
    training step took 15x longer (17 s instead of 1.1 s for the quickstart)."""
    torch.set_flush_denormal(True)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-element list when not distributed)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def gather_to(obj: Any, dst: int, info: DistInfo) -> list[Any] | None:
    """Every rank's ``obj``, in rank order, on rank ``dst`` alone (None on the others)."""
    if not info.enabled:
        return [obj]
    out: list[Any] | None = [None] * info.world_size if info.rank == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def exchange(parts: list[Any], info: DistInfo) -> list[Any]:
    """All-to-all of objects: rank ``r`` sends ``parts[d]`` to rank ``d`` and receives every
    rank's ``parts[r]``, in rank order; each rank holds only what is meant for it."""
    if not info.enabled:
        return parts
    received: list[Any] = []
    for dst in range(info.world_size):
        got = gather_to(parts[dst], dst, info)
        if got is not None:
            received = got
    return received


def any_rank(flag: bool, info: DistInfo) -> bool:
    """Whether ``flag`` holds on any rank; every rank gets the same answer. One all-reduce of a
    number on the group's device: no pickling, as ``all_gather_object`` would (twice)."""
    if not info.enabled:
        return flag
    value = torch.full((1,), float(flag), device=info.device)  # a fill: no copy that waits
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def from_main(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. the verdict of a check only rank 0 made)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(model: torch.nn.Module, info: DistInfo) -> None:
    """Rank 0's buffers (BN running statistics) on every rank. DDP broadcasts them at the start
    of each forward only, so after the last training step every rank holds its own updates;
    an evaluation shared by the ranks must use the statistics rank 0 saves."""
    if info.enabled:
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


def lost_peer(error: BaseException) -> str | None:
    """gloo's reason, in a few words, where ``error`` is its connection to another rank failing
    (the rank died, its machine left the network, or it did not answer within the timeout);
    None for any other error. gloo raises a plain RuntimeError whose text starts with the
    ``[.../gloo/transport/...]`` source line, then the reason and a paragraph of advice."""
    text = str(error)
    if not isinstance(error, RuntimeError) or "/gloo/transport/" not in text:
        return None
    return text.split("] ", 1)[-1].split(". ", 1)[0]


def is_main(info: DistInfo) -> bool:
    return info.rank == 0
