"""The training loop: SGD with warm-up and step/cosine decay, AMP on CUDA, DDP under torchrun,
atomic checkpoints, exact resume, COCO evaluation and logs."""

from __future__ import annotations

import json
import logging
import math
import signal
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset
from torch.utils.tensorboard import SummaryWriter
from torchvision.ops import StochasticDepth
from tqdm import tqdm

from ..config import save_config
from ..data import CocoDataset, DataError, check_dataset, collate, format_report
from ..data.transforms import eval_transforms, train_transforms
from ..errors import SpinedetError
from ..models import create_model, describe
from ..models.registry import TASKS, model_task
from ..models.weights import architecture_options, load_weights, save_weights
from . import distributed
from .checkpoint import load_state, save_state
from .evaluate import coco_evaluate, format_metrics, run_inference
from .plots import plot_curves, read_metrics

__all__ = ["train", "TrainingError"]

log = logging.getLogger(__name__)


class TrainingError(SpinedetError, RuntimeError):
    """Training cannot go on (e.g. the loss stays non-finite)."""


class _SeededSamples(Dataset):
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


def _epoch_order(n: int, seed: int, epoch: int, info: distributed.DistInfo) -> list[int]:
    """This rank's share of a seeded shuffle, padded so every rank gets as many samples."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    order = order.tolist()
    order += order[: (-len(order)) % info.world_size]
    return order[info.rank :: info.world_size]


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on kernels only (conv/linear weights), not on biases or norm parameters."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _lr_lambda(cfg: dict, total_steps: int):
    warmup, factor = cfg["warmup_steps"], cfg["warmup_factor"]
    milestones = [int(m * total_steps) for m in cfg["milestones"]]

    def scale(step: int) -> float:
        ramp = factor + (1 - factor) * step / warmup if step < warmup else 1.0
        if cfg["schedule"] == "cosine":
            decay = 0.5 * (1 + math.cos(math.pi * min(step / max(total_steps, 1), 1.0)))
        else:
            decay = cfg["gamma"] ** sum(step >= m for m in milestones)
        return ramp * decay

    return scale


def _amp(setting: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a GradScaler is needed). Mixed precision on CUDA only."""
    if device.type != "cuda" or setting == "none":
        return None, False
    if setting == "fp16" or (setting == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16, True
    if setting in ("bf16", "auto"):
        return torch.bfloat16, False
    raise SpinedetError(f"train.amp must be auto, bf16, fp16 or none, got {setting!r}")


class _Stop:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next step boundary and exits."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _check_data(cfg: dict, info: distributed.DistInfo) -> None:
    """Validate the data set on rank 0 before any long work; every rank stops on problems."""
    report = None
    if info.rank == 0:
        for split in ("train", "val"):
            spec = cfg["data"][split]
            if spec["annotations"]:
                problems = check_dataset(spec["annotations"], spec["images"])
                if problems:
                    report = f"{spec['annotations']}: the data set has problems\n"
                    report += format_report(problems)
                    break
    if info.enabled:
        box = [report]
        dist.broadcast_object_list(box, src=0)
        report = box[0]
    if report:
        raise DataError(report)


def _eval_mode_for_losses(model: nn.Module) -> None:
    """Train mode (so torchvision returns losses) with frozen BN statistics and no drop-path."""
    model.train()
    for m in model.modules():
        if isinstance(m, _BatchNorm | StochasticDepth):
            m.eval()


class Trainer:
    """One training run in ``out_dir``; see :func:`train`."""

    def __init__(self, config: dict, out_dir: str | Path, info: distributed.DistInfo) -> None:
        self.cfg, self.info = config, info
        self.out = Path(out_dir)
        self.main = distributed.is_main(info)
        tcfg = config["train"]
        if config["data"]["train"]["annotations"] is None:
            raise SpinedetError("data.train.annotations is not set (use --set data.train=...)")
        if tcfg["batch_size"] % info.world_size:
            raise SpinedetError(
                f"train.batch_size {tcfg['batch_size']} is not divisible by the "
                f"{info.world_size} processes"
            )
        self.batch = tcfg["batch_size"] // info.world_size
        self.seed = int(tcfg["seed"])
        torch.manual_seed(self.seed)
        if config["data"]["check"]:
            _check_data(config, info)

        mcfg = config["model"]
        task = model_task(mcfg["name"])
        if task is None:
            raise SpinedetError(f"{mcfg['name']} is a backbone; train a detector (e.g. _maskrcnn)")
        self.task = TASKS[task]
        masks = self.task.masks
        dcfg = config["data"]
        train_tf = train_transforms(mcfg["image_size"], tuple(dcfg["scale_range"]), dcfg["hflip"])
        self.train_set = CocoDataset(
            dcfg["train"]["annotations"], dcfg["train"]["images"], train_tf, masks
        )
        self.val_set = None
        if dcfg["val"]["annotations"]:
            self.val_set = CocoDataset(
                dcfg["val"]["annotations"], dcfg["val"]["images"], eval_transforms(), masks
            )

        options = dict(mcfg["options"])
        if mcfg["weights"]:
            # Fine-tuning keeps the file's architecture (e.g. a converted checkpoint's head
            # widths and activation) unless the config sets an option itself.
            inherited = architecture_options(mcfg["weights"], mcfg["name"].lower())
            options = {**inherited, **options}
            if inherited:
                shown = ", ".join(f"{k}={v!r}" for k, v in sorted(inherited.items()))
                log.info("model options from %s: %s", mcfg["weights"], shown)
        model = create_model(
            mcfg["name"],
            categories=self.train_set.categories,
            image_size=mcfg["image_size"],
            **options,
        )
        if mcfg["weights"]:
            load_weights(model, mcfg["weights"], allow_shape_mismatch=True)
        self.device = info.device
        if info.enabled and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(self.device)
        self.net = (
            nn.parallel.DistributedDataParallel(
                model, device_ids=[info.local_rank] if self.device.type == "cuda" else None
            )
            if info.enabled
            else model
        )

        n_local = len(_epoch_order(len(self.train_set), self.seed, 0, info))
        self.steps_per_epoch = max(n_local // self.batch, 1)
        self.total_steps = tcfg["epochs"] * self.steps_per_epoch
        lr = tcfg["base_lr"] * tcfg["batch_size"] / tcfg["base_batch"]
        self.optimizer = torch.optim.SGD(
            _param_groups(model, tcfg["weight_decay"]), lr=lr, momentum=tcfg["momentum"]
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(tcfg, self.total_steps)
        )
        self.amp_dtype, use_scaler = _amp(tcfg["amp"], self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.step = 0  # optimizer steps taken (skipped non-finite steps included)
        self.best = -1.0
        self.writer = SummaryWriter(self.out / "tb") if self.main else None

    # ----- persistence -------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoints" / "last.pt"

    def _save(self) -> None:
        if not self.main:
            return
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.step // self.steps_per_epoch,
            "step": self.step,
            "best": self.best,
        }
        save_state(state, self.checkpoint_path)
        save_weights(self.model, self.out / "last.safetensors", self._meta())

    def _meta(self) -> dict:
        return {"step": self.step, "config": self.cfg}

    def resume(self) -> None:
        state = load_state(self.checkpoint_path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.best = state["step"], state["best"]
        if self.main:  # drop log lines written after the checkpoint (e.g. before a crash)
            path = self.out / "metrics.jsonl"
            kept = [r for r in read_metrics(path) if r["step"] <= self.step]
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        log.info("resumed %s at step %d", self.checkpoint_path, self.step)

    # ----- logging -----------------------------------------------------------------------
    def _log(self, row: dict) -> None:
        if not self.main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if isinstance(value, int | float) and key not in ("step", "epoch"):
                self.writer.add_scalar(f"{row['kind']}/{key}", value, row["step"])

    # ----- the loop ----------------------------------------------------------------------
    def _loader(self, epoch: int, skip: int) -> DataLoader:
        order = _epoch_order(len(self.train_set), self.seed, epoch, self.info)
        order = order[: self.steps_per_epoch * self.batch][skip * self.batch :]
        workers = self.cfg["data"]["workers"]
        return DataLoader(
            _SeededSamples(self.train_set, self.seed),
            batch_size=self.batch,
            sampler=[(epoch, i) for i in order],
            num_workers=workers,
            collate_fn=collate,
            persistent_workers=False,
            prefetch_factor=2 if workers else None,
        )

    def _train_step(self, images: list, targets: list) -> dict[str, float] | None:
        """One optimizer step; None when the loss was not finite (the step is skipped)."""
        torch.manual_seed(self.seed * 1_000_033 + self.step * 101 + self.info.rank)
        images = [img.to(self.device, non_blocking=True) for img in images]
        targets = [
            {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in t.items()}
            for t in targets
        ]
        autocast = torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        with autocast:
            losses = self.net(images, targets)
        loss = sum(losses.values())
        finite = torch.isfinite(loss.detach()).float()
        if self.info.enabled:  # every rank skips together, or DDP would hang
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        self.optimizer.zero_grad(set_to_none=True)
        if finite.item() < 1:
            return None
        self.scaler.scale(loss).backward()
        clip = self.cfg["train"]["clip_grad"]
        if clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.net.parameters(), clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return {"loss": loss.item(), **{k: v.item() for k, v in losses.items()}}

    @torch.no_grad()
    def _val_loss(self) -> float:
        _eval_mode_for_losses(self.model)
        loader = DataLoader(self.val_set, batch_size=self.batch, collate_fn=collate)
        total, count = 0.0, 0
        for images, targets in loader:
            losses = self.model(
                [i.to(self.device) for i in images],
                [{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in t.items()}
                 for t in targets],
            )  # fmt: skip
            total += sum(losses.values()).item() * len(images)
            count += len(images)
        self.model.train()
        return total / max(count, 1)

    def _evaluate(self, epoch: int) -> dict:
        iou_types = ("bbox", "segm") if self.task.masks else ("bbox",)
        label_to_cat = describe(self.model).label_to_category_id()
        results = run_inference(
            self.model, self.val_set, label_to_cat, self.device, self.info, self.batch
        )
        metrics = coco_evaluate(self.val_set.coco, results, iou_types) if self.main else {}
        row: dict[str, Any] = {"kind": "val", "epoch": epoch, "step": self.step}
        if self.main:
            row["val_loss"] = self._val_loss()
            for iou_type, m in metrics.items():
                row[f"{iou_type}/AP"], row[f"{iou_type}/AP50"] = m["AP"], m["AP50"]
            self._log(row)
            primary = metrics["segm" if "segm" in metrics else "bbox"]["AP"]
            if primary > self.best:
                self.best = primary
                save_weights(self.model, self.out / "best.safetensors", self._meta())
            tqdm.write(f"epoch {epoch}: val loss {row['val_loss']:.4f}\n" + format_metrics(metrics))
        return metrics

    def run(self, resume: bool = False) -> dict:
        tcfg = self.cfg["train"]
        if not resume and self.checkpoint_path.exists():
            raise SpinedetError(
                f"{self.out} already holds a run; continue it with --resume or pick another --out"
            )
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.out / "config.yaml")
            if not resume:
                (self.out / "metrics.jsonl").unlink(missing_ok=True)
        if resume:
            self.resume()
        self.net.train()
        max_steps = tcfg["max_steps"] or self.total_steps
        bar = tqdm(
            total=min(max_steps, self.total_steps), initial=self.step, desc="train",
            unit="step", disable=not self.main, dynamic_ncols=True,
        )  # fmt: skip
        nonfinite = 0
        with _Stop() as stop:
            while self.step < min(max_steps, self.total_steps):
                epoch, skip = divmod(self.step, self.steps_per_epoch)
                for images, targets in self._loader(epoch, skip):
                    stats = self._train_step(images, targets)
                    self.step += 1
                    self.scheduler.step()
                    bar.update()
                    if stats is None:
                        nonfinite += 1
                        if nonfinite >= tcfg["max_nonfinite"]:
                            self._save_last_good()
                            raise TrainingError(
                                f"the loss was not finite for {nonfinite} steps in a row "
                                f"(step {self.step}); stopped. The last good checkpoint is "
                                f"{self.checkpoint_path}. Lower train.base_lr or check the data."
                            )
                        continue
                    nonfinite = 0
                    lr = self.optimizer.param_groups[0]["lr"]
                    bar.set_postfix(loss=f"{stats['loss']:.3f}", lr=f"{lr:.4g}")
                    if self.step % tcfg["log_every"] == 0:
                        self._log({"kind": "train", "epoch": epoch, "step": self.step, "lr": lr,
                                   **stats})  # fmt: skip
                    if stop.signal is not None or self.step >= max_steps:
                        break
                if stop.signal is not None:
                    self._save()
                    bar.close()
                    raise KeyboardInterrupt(
                        f"interrupted at step {self.step}; checkpoint saved to "
                        f"{self.checkpoint_path}: continue with --resume"
                    )
                if self.step % self.steps_per_epoch == 0:
                    self._end_epoch(self.step // self.steps_per_epoch)
                elif self.step >= max_steps:
                    self._save()
        bar.close()
        if self.main and self.writer:
            self.writer.close()
        return {"step": self.step, "best": self.best, "out": str(self.out)}

    def _save_last_good(self) -> None:
        """Keep the checkpoint on disk as it is: it holds the last finite weights."""
        if not self.checkpoint_path.exists():
            self._save()

    def _end_epoch(self, epoch: int) -> None:
        tcfg = self.cfg["train"]
        last = epoch == tcfg["epochs"]
        if self.val_set is not None and (epoch % tcfg["eval_every"] == 0 or last):
            self._evaluate(epoch)
        if epoch % tcfg["checkpoint_every"] == 0 or last:
            self._save()
        if self.main:
            plot_curves(self.out / "metrics.jsonl", self.out / "curves.png")


def train(
    config: dict, out_dir: str | Path, resume: bool = False, device: str | None = None
) -> dict:
    """Train a detector as ``config`` says, writing checkpoints, logs and curves to ``out_dir``.

    Runs single-process, or as one of many processes when launched by ``torchrun`` (DDP; SyncBN
    on GPUs). ``resume`` continues from ``out_dir/checkpoints/last.pt``.
    """
    info = distributed.setup(device)
    try:
        return Trainer(config, out_dir, info).run(resume)
    finally:
        distributed.teardown()
