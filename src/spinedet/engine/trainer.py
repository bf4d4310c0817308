"""A training run, assembled from parts that each live in their own module: data sets, model
and optimizer (``builders``), the step (``loop``), evaluation (``evaluate``), logs (``logger``)
and checkpoints (``checkpoint``). SGD with warm-up and step/cosine decay, gradient
accumulation, AMP on CUDA, DDP under torchrun, atomic checkpoints and exact resume."""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import ConfigError, load_config, save_config
from ..cuda_graphs import pad_to_square, use_cuda_graphs
from ..data import DataError, check_dataset_cached, check_image_folder, collate, format_report
from ..errors import SpinedetError, Stopped, shorten
from ..models import TASKS, describe, model_task
from . import distributed
from .builders import (
    build_datasets,
    build_model,
    build_optimizer,
    check_model_config,
    data_source,
    effective_lr,
)
from .checkpoint import Checkpointer, RunLock, last_checkpoint, remove_stale_temps
from .classification import evaluate_classifier, flat_classification, format_classification
from .evaluate import (
    EvaluationStopped,
    evaluate_distributed,
    flat_metrics,
    format_metrics,
    sharded_val_loss,
)
from .logger import RunLogger, held_records
from .loop import SeededSamples, Stepper, StopSignal, epoch_order
from .plots import plot_curves
from .runtime import loader_workers

__all__ = ["RESUME_MAY_CHANGE", "PeerLostError", "Trainer", "TrainingError", "config_changes",
           "train"]  # fmt: skip

log = logging.getLogger(__name__)

# Keys a resumed run may change: its length, and how it logs, checks and loads data.
RESUME_MAY_CHANGE = frozenset({
    "train.epochs", "train.max_steps", "train.log_every", "train.eval_every",
    "train.checkpoint_every", "train.checkpoint_steps", "train.max_nonfinite",
    "train.dist_timeout_min", "data.workers", "data.check", "train.cuda_graphs",
    "train.channels_last",
})  # fmt: skip


class TrainingError(SpinedetError, RuntimeError):
    """Training cannot go on (e.g. the loss stays non-finite)."""


class PeerLostError(TrainingError):
    """Another process of a distributed run ended or lost its connection."""


def _on_disk(out: Path) -> str:
    """What a run that ends now leaves to continue from, and how to continue."""
    saved = last_checkpoint(out)
    if saved is None:
        return "no checkpoint was written: start the run again"
    path, step = saved
    at = "" if step is None else f" (step {step})"
    return f"the last checkpoint is {path}{at}: continue with train --resume --out {out}"


def _raise_together(message: str | None, info: distributed.DistInfo, kind: type = SpinedetError):
    """Raise rank 0's ``message`` on every rank, so none waits in a collective for the rest."""
    message = distributed.from_main(message, info)
    if message:
        raise kind(message)


def _flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every key on which ``new`` would change the run ``old`` made."""
    before, after = _flatten(old), _flatten(new)
    return [f"{k}: {before.get(k)!r} -> {after.get(k)!r}"
            for k in sorted(set(before) | set(after))
            if before.get(k) != after.get(k) and k not in RESUME_MAY_CHANGE]  # fmt: skip


def _check_data(cfg: dict, out: Path) -> str | None:
    """``data check`` of the training and validation sets: the report, or None when clean. A
    clean COCO result is cached in the run directory, so a resume does not read every image
    again; a classifier's ImageFolder trees get a header check of every image."""
    task = model_task(cfg["model"]["name"])
    classifier = task == "classifier"
    masks = task is not None and TASKS[task].masks  # a Mask R-CNN refuses boxes-only data
    for split in ("train", "val"):
        spec = cfg["data"][split]
        source = data_source(cfg, split)
        if source is None:
            continue
        try:
            if classifier:
                problems = check_image_folder(source)
            else:
                problems = check_dataset_cached(
                    spec["annotations"], spec["images"], out, masks=masks
                )
        except DataError as e:  # not an ImageFolder tree: said on every rank, not raised on one
            return str(e)
        if problems:
            return f"{source}: the data set has problems\n" + format_report(problems)
    return None


def _resume_problem(cfg: dict, out: Path, checkpoint: Path) -> str | None:
    """Why ``cfg`` cannot continue the run in ``out`` (None when it can)."""
    saved = out / "config.yaml"
    if not checkpoint.is_file():
        return f"{checkpoint}: no checkpoint to resume from"
    if not saved.is_file():
        return f"{saved}: missing; the run cannot be resumed"
    try:
        changes = config_changes(load_config(saved), cfg)
    except ConfigError as e:
        return str(e)
    if changes:
        return (f"{saved}: resuming would change the run ({shorten(changes, 4)}); "
                "only train.epochs and train.max_steps may grow a run. Drop the config and "
                "--set to continue as it was, or train into another --out")  # fmt: skip
    return None


class Trainer:
    """One training run in ``out_dir``; see :func:`train`. Builds every part on every rank;
    rank 0 alone writes files."""

    def __init__(self, config: dict, out_dir: str | Path, info: distributed.DistInfo,
                 resume: bool = False) -> None:  # fmt: skip
        self.cfg, self.info, self.resuming = config, info, resume
        self.out = Path(out_dir)
        self.main = distributed.is_main(info)
        tcfg = config["train"]
        self.accumulate = tcfg["accumulate"]
        if tcfg["batch_size"] % info.world_size:
            raise SpinedetError(
                f"train.batch_size {tcfg['batch_size']} is not divisible by the "
                f"{info.world_size} processes"
            )
        self.batch = tcfg["batch_size"] // info.world_size
        self.seed = int(tcfg["seed"])
        checkpoint = self.out / "checkpoints" / "last.pt"
        problem = None
        if self.main:
            if resume:
                problem = _resume_problem(config, self.out, checkpoint)
            elif checkpoint.exists():
                problem = (f"{self.out} already holds a run; continue it with --resume or pick "
                           "another --out")  # fmt: skip
            elif weights := [n for n in ("last.safetensors", "best.safetensors")
                             if (self.out / n).exists()]:  # fmt: skip
                # Its checkpoint deleted: eval and predict would still pick an old best.
                problem = (f"{self.out} holds an earlier run's {' and '.join(weights)}; remove "
                           "them or pick another --out")  # fmt: skip
        _raise_together(problem, info)
        torch.manual_seed(self.seed)
        if config["data"]["check"]:
            _raise_together(_check_data(config, self.out) if self.main else None, info, DataError)

        with held_records() as self.early_records:  # log.txt opens when the run starts
            self.task, data = build_datasets(config)
            model = build_model(config, data.categories)
        self.train_set, self.val_set = data.train, data.val
        self.val_loss_set = data.val if data.val_loss is None else data.val_loss
        self.device = info.device
        self.workers = loader_workers(config["data"]["workers"], self.device)
        if info.enabled and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(self.device)
        if tcfg["channels_last"]:  # the layers' outputs follow the weights
            model.to(memory_format=torch.channels_last)
        self.net = (
            nn.parallel.DistributedDataParallel(
                model, device_ids=[info.local_rank] if self.device.type == "cuda" else None
            )
            if info.enabled
            else model
        )
        # CUDA graphs for one process on a GPU: under DDP the gradient hooks would have to be
        # captured too, and accumulated gradients would alias the graph's gradient buffers.
        self.cuda_graphs = (
            tcfg["cuda_graphs"] and self.device.type == "cuda" and not info.enabled
            and self.accumulate == 1
        )  # fmt: skip
        if self.cuda_graphs:
            pad_to_square(model)
            use_cuda_graphs(model)

        per_step = self.batch * self.accumulate
        n_local = len(epoch_order(len(self.train_set), self.seed, 0, info))
        self.steps_per_epoch = n_local // per_step
        if self.steps_per_epoch == 0:
            raise SpinedetError(
                f"{data_source(config, 'train')}: {len(self.train_set)} training images "
                f"make no step of {per_step} images per process (train.batch_size "
                f"{tcfg['batch_size']} x train.accumulate {self.accumulate} over "
                f"{info.world_size} processes); lower train.batch_size or train.accumulate"
            )
        self.total_steps = tcfg["epochs"] * self.steps_per_epoch
        self.optimizer, self.scheduler = build_optimizer(tcfg, model, self.total_steps)
        self.stepper = Stepper(self.net, self.optimizer, self.device, info, tcfg["amp"],
                               tcfg["clip_grad"], self.seed)  # fmt: skip
        self.checkpointer = Checkpointer(
            self.out, self.model,
            {"optimizer": self.optimizer, "scheduler": self.scheduler,
             "scaler": self.stepper.scaler},
            {"config": config},
        )  # fmt: skip
        self.logger = RunLogger(self.out, self.main)
        self.step = 0  # optimizer steps taken (skipped non-finite steps included)
        self.best = -1.0
        self.epoch_pending = False  # resumed from a stop before an epoch's end was handled

    @property
    def checkpoint_path(self) -> Path:
        return self.checkpointer.path

    # ----- persistence -------------------------------------------------------------------
    def _save(self, epoch_ended: bool = True) -> bool:
        """Checkpoint; ``epoch_ended`` False when the run stops at an epoch's last step before
        that epoch's evaluation, best weights and curves, which resuming then does first."""
        if not self.main:
            return True
        counters = {"epoch": self.step // self.steps_per_epoch, "step": self.step,
                    "best": self.best, "epoch_ended": epoch_ended}  # fmt: skip
        return self.checkpointer.save(counters)

    def resume(self) -> None:
        counters = self.checkpointer.load(repair=self.main)
        self.step, self.best = counters["step"], counters["best"]
        self.epoch_pending = not counters.get("epoch_ended", True)
        log.info("resumed %s at step %d", self.checkpoint_path, self.step)

    def _summary(self) -> str:
        tcfg, mcfg, amp = self.cfg["train"], self.cfg["model"], self.stepper.amp_dtype
        names = [c.name for c in describe(self.model).categories]
        val = len(self.val_set) if self.val_set is not None else 0
        return "\n".join([
            f"run {self.out}: model {mcfg['name']} at {mcfg['image_size']} px, config "
            f"{self.out / 'config.yaml'}",
            f"data: {len(self.train_set)} training / {val} validation images, {len(names)} "
            f"classes ({shorten(names)})",
            f"device {self.device}, world size {self.info.world_size}, AMP "
            f"{str(amp).removeprefix('torch.') if amp else 'off'}, CUDA graphs "
            f"{'on' if self.cuda_graphs else 'off'}, {self.workers} data loading processes",
            f"global batch {tcfg['batch_size']} x accumulate {self.accumulate} = "
            f"{tcfg['batch_size'] * self.accumulate} images per step, effective LR "
            f"{effective_lr(tcfg):.4g}, {self.steps_per_epoch} steps/epoch, "
            f"{self.total_steps} steps in {tcfg['epochs']} epochs",
        ])  # fmt: skip

    # ----- evaluation --------------------------------------------------------------------
    def _evaluate(self, epoch: int, stop: StopSignal) -> dict:
        """Validation loss and metrics (COCO AP, or a classifier's accuracy), each shared by all
        ranks (identical results on every rank); rank 0 logs them and keeps the best weights
        (by mask AP, else box AP, or top-1 accuracy). Raises :class:`EvaluationStopped`, on
        every rank and before logging anything, when ``stop`` is signalled."""
        distributed.broadcast_buffers(self.model, self.info)
        if self.task.name == "classifier":
            val_loss, primary, flat, text, metrics = self._classifier_metrics(stop)
        else:
            val_loss, primary, flat, text, metrics = self._coco_metrics(stop)
        self.net.train()
        row = {"kind": "val", "epoch": epoch, "step": self.step, "val_loss": val_loss}
        self.logger.row(row | flat)
        if primary is not None and primary > self.best:
            self.best = primary
            if self.main:
                self.checkpointer.save_best(self.step)
        self.logger.text(f"epoch {epoch}: val loss {val_loss:.4f}\n{text}")
        return metrics

    def _coco_metrics(self, stop: StopSignal) -> tuple[float, float | None, dict, str, dict]:
        """(val loss, primary AP, flat metrics, text, metrics) of a detector."""
        val_loss = sharded_val_loss(self.model, self.val_loss_set, self.batch, self.device,
                                    self.info, workers=self.workers, seed=self.seed,
                                    stop=stop.requested)  # fmt: skip
        iou_types = ("bbox", "segm") if self.task.masks else ("bbox",)
        label_to_cat = describe(self.model).label_to_category_id()
        metrics, _ = evaluate_distributed(self.model, self.val_set, label_to_cat, self.device,
                                          self.info, iou_types, self.batch, workers=self.workers,
                                          progress=self.main, collect=False,
                                          stop=stop.requested)  # fmt: skip
        primary = metrics["segm" if "segm" in metrics else "bbox"]["AP"]
        return val_loss, primary, flat_metrics(metrics), format_metrics(metrics, worst=10), metrics

    def _classifier_metrics(self, stop: StopSignal) -> tuple[float, float | None, dict, str, dict]:
        """(val loss, top-1, flat metrics, text, metrics) of a classifier: one pass in eval
        mode gives the loss and the accuracies."""
        metrics = evaluate_classifier(self.model, self.val_set, self.device, self.info,
                                      self.batch, self.workers,
                                      progress=self.main, stop=stop.requested)  # fmt: skip
        flat, text = flat_classification(metrics), format_classification(metrics, worst=10)
        return metrics["loss"], metrics["top1"], flat, text, metrics

    # ----- the loop ----------------------------------------------------------------------
    def _loader(self, epoch: int, skip: int) -> DataLoader:
        per_step = self.batch * self.accumulate
        order = epoch_order(len(self.train_set), self.seed, epoch, self.info)
        order = order[: self.steps_per_epoch * per_step][skip * per_step :]
        return DataLoader(
            SeededSamples(self.train_set, self.seed),
            batch_size=self.batch,
            sampler=[(epoch, i) for i in order],
            num_workers=self.workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            prefetch_factor=2 if self.workers else None,
        )

    @property
    def end_step(self) -> int:
        return min(self.cfg["train"]["max_steps"] or self.total_steps, self.total_steps)

    def run(self, stop: StopSignal, resume: bool = False) -> dict:
        """Train; ``stop`` (entered) tells of SIGINT/SIGTERM, and is told when training begins."""
        if resume:
            self.resume()  # before anything is written: a refused resume leaves the run as it was
            if self.step > self.end_step:  # config.yaml would say a shorter run than was trained
                raise SpinedetError(
                    f"{self.checkpoint_path} is at step {self.step}, past the {self.end_step} "
                    "steps that train.epochs and train.max_steps now give; a resume may "
                    "shorten a run only to where it is"
                )
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.out / "config.yaml")
        self.logger.open(self.step if resume else None, self.early_records, self.epoch_pending)
        try:
            return self._run(stop)
        finally:
            self.logger.close()

    def _run(self, stop: StopSignal) -> dict:
        tcfg = self.cfg["train"]
        self.logger.text(self._summary())
        self.net.train()
        end = self.end_step
        bar = tqdm(total=end, initial=self.step, desc="train", unit="step",
                   disable=not self.main, dynamic_ncols=True)  # fmt: skip
        nonfinite = 0
        interval = _Interval(self.device)
        stop.begin()
        if self.epoch_pending:
            self._end_epoch(self.step // self.steps_per_epoch, stop, bar)
        while self.step < end:
            epoch, skip = divmod(self.step, self.steps_per_epoch)
            interval.tick()  # after an evaluation: the loader's start is data time
            batches = iter(self._loader(epoch, skip))
            for group in zip(*[batches] * self.accumulate, strict=False):
                interval.data_done()
                stats = self.stepper.backward(group, self.step, stop.requested())
                if stats is not None:
                    self.stepper.step()
                self.step += 1
                self.scheduler.step()
                interval.step_done(self.batch * self.accumulate * self.info.world_size)
                bar.update()
                if stats is None:
                    nonfinite += 1
                    if nonfinite >= tcfg["max_nonfinite"]:
                        self._stop_nonfinite(nonfinite)
                else:
                    nonfinite = 0
                    self._log_step(epoch, stats, bar, interval)
                if self.stepper.stopping or self.step >= end:
                    break
                every = tcfg["checkpoint_steps"]
                if every and self.step % every == 0 and self.step % self.steps_per_epoch:
                    # Within an epoch (its end is saved below): a crash or a kill loses at
                    # most ``every`` steps of a long epoch, not the whole of it.
                    self._save()
            # The ranks agree on a stop in each step's backward and between validation
            # batches; a signal since then, before an epoch's validation or after its last
            # check, is agreed on here.
            epoch_end = self.step % self.steps_per_epoch == 0
            if self.stepper.stopping or (
                epoch_end and distributed.any_rank(stop.requested(), self.info)
            ):
                self._interrupt(bar, epoch_ended=not epoch_end)
            if epoch_end:
                self._end_epoch(self.step // self.steps_per_epoch, stop, bar)
                if distributed.any_rank(stop.requested(), self.info):
                    self._interrupt(bar, epoch_ended=True)
            elif self.step >= end:
                self._save()
        bar.close()
        return {"step": self.step, "best": self.best, "out": str(self.out)}

    def _interrupt(self, bar: tqdm, epoch_ended: bool, save: bool = True,
                   what: str = "interrupted") -> None:  # fmt: skip
        """Stop, every rank together; ``save`` False keeps the checkpoint on disk."""
        if save:
            self._save(epoch_ended=epoch_ended)
        bar.close()
        raise KeyboardInterrupt(
            f"{what} at step {self.step}; checkpoint saved to {self.checkpoint_path}: "
            "continue with --resume"
        )

    def _log_step(self, epoch: int, stats: dict, bar: tqdm, interval: _Interval) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        bar.set_postfix(loss=f"{stats['loss']:.3f}", lr=f"{lr:.4g}")
        if self.step % self.cfg["train"]["log_every"]:
            return
        row = {"kind": "train", "epoch": epoch, "step": self.step, "lr": lr, **stats,
               **interval.report()}  # fmt: skip
        self.logger.row(row)
        speed = f"{row['images_per_s']:.1f} img/s"
        self.logger.line(f"step {self.step}/{self.total_steps} epoch {epoch} loss "
                         f"{stats['loss']:.4f} lr {lr:.4g} {speed}")  # fmt: skip

    def _stop_nonfinite(self, count: int) -> None:
        """Stop; the checkpoint on disk holds the last weights that were all finite."""
        kept = self.checkpoint_path.exists() or self._save()
        where = (f"The last good checkpoint is {self.checkpoint_path}" if kept
                 else "No finite weights were ever saved")  # fmt: skip
        raise TrainingError(
            f"the loss was not finite for {count} steps in a row (step {self.step}); stopped. "
            f"{where}. Lower train.base_lr or check the data."
        )

    def _end_epoch(self, epoch: int, stop: StopSignal, bar: tqdm) -> None:
        tcfg = self.cfg["train"]
        last = epoch == tcfg["epochs"]
        evaluate = self.val_set is not None and (epoch % tcfg["eval_every"] == 0 or last)
        save = epoch % tcfg["checkpoint_every"] == 0 or last
        if evaluate and save:
            # The epoch's training reaches the disk before validation: a crash, a kill or a
            # stop in it loses no step, and resuming validates the epoch first.
            self._save(epoch_ended=False)
        if evaluate:
            try:
                self._evaluate(epoch, stop)
            except EvaluationStopped:
                # Nothing of the epoch is logged and the checkpoint says it has not ended (the
                # one written before validation stands, else one is now): resuming validates it.
                self._interrupt(bar, epoch_ended=False, save=not save,
                                what=f"validation of epoch {epoch} interrupted")  # fmt: skip
        if save:
            self._save()
        if self.main:
            plot_curves(self.out / "metrics.jsonl", self.out / "curves.png")


class _Interval:
    """Throughput of one log interval: images/s, mean data and step time, peak GPU memory."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device if device.type == "cuda" else None
        self._reset()

    def _reset(self) -> None:
        self.start = self.mark = time.perf_counter()
        self.data = self.compute = 0.0
        self.steps = self.images = 0
        if self.cuda is not None:
            torch.cuda.reset_peak_memory_stats(self.cuda)

    def tick(self) -> None:
        self.mark = time.perf_counter()

    def data_done(self) -> None:
        now = time.perf_counter()
        self.data += now - self.mark
        self.mark = now

    def step_done(self, images: int) -> None:
        now = time.perf_counter()
        self.compute += now - self.mark
        self.steps += 1
        self.images += images
        self.mark = now

    def report(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        row = {"images_per_s": self.images / elapsed, "data_time": self.data / self.steps,
               "step_time": self.compute / self.steps}  # fmt: skip
        if self.cuda is not None:
            row["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.cuda) / 2**30
        self._reset()
        return row


def train(
    config: dict | str | Path, out_dir: str | Path, resume: bool = False, device: str | None = None
) -> dict:
    """Train a detector as ``config`` says, writing checkpoints, logs and curves to ``out_dir``.

    ``config`` is a recipe name (``"quickstart"``), a YAML file, or a dict of any of its
    sections and keys (e.g. ``{"data": {...}, "train": {"epochs": 12}}``), merged over the
    defaults and validated as ``spinedet train`` does (:func:`spinedet.config.load_config`).
    Runs single-process, or as one of many processes when launched by ``torchrun`` (DDP; SyncBN
    on GPUs). ``resume`` continues from ``out_dir/checkpoints/last.pt``; ``config`` may then
    differ from the run's ``config.yaml`` only in :data:`RESUME_MAY_CHANGE`. Rank 0 holds a
    lock on ``out_dir`` for the whole run.
    """
    config = load_config(config)
    check_model_config(config)
    out = Path(out_dir)
    info = distributed.setup(device, config["train"]["dist_timeout_min"])
    lock = RunLock(out) if distributed.is_main(info) else nullcontext()
    # Until the first step a signal stops at once, saying what is on disk; the handler stays
    # until the process group is gone, so a signal while failing or ending is no silent kill.
    with StopSignal(early=f"stopped before training began; {_on_disk(out)}") as stop:
        try:
            problem = None
            try:
                lock.__enter__()
            except SpinedetError as e:
                problem = str(e)
            _raise_together(problem, info)
            try:
                if distributed.is_main(info):
                    remove_stale_temps(out)
                return Trainer(config, out, info, resume).run(stop, resume)
            finally:
                lock.__exit__(None, None, None)
        except KeyboardInterrupt as e:
            if isinstance(e, Stopped) or stop.signal is None:
                raise
            raise Stopped(str(e), stop.signal) from None  # the shell's code for the signal
        except RuntimeError as e:
            # A rank that died takes its end of every connection with it: the others fail in their
            # next collective with gloo's traceback, which says neither what was saved nor how on.
            reason = distributed.lost_peer(e) if info.enabled else None
            if reason is None:
                raise
            raise PeerLostError(
                f"rank {info.rank}: another process of the run ended or lost its connection "
                f"({reason}); {_on_disk(out)}, launched as before"
            ) from None
        finally:
            distributed.teardown()
