"""torchvision's region proposal network and R-CNN heads, working on the whole batch at once.

:class:`BatchedRPN` and :class:`BatchedRoIHeads` compute what torchvision's
``RegionProposalNetwork`` and ``RoIHeads`` compute (the same proposals, matches, losses and
detections; training samples drawn from another random stream), with the per-image loops of
matching, sampling and selection replaced by batch operations
(:mod:`~spinedet.models.matching`, :mod:`~spinedet.models.postprocess`). Only NMS over the
proposals stays per image (one NMS over the batch's 80,000 training candidates would compare
every pair across images), on each image's best candidates first
(:func:`~spinedet.models.postprocess.first_survivors`).
"""

from __future__ import annotations

from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss, maskrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import roi_align

from .host_data import device_tensor
from .matching import balanced_sample, match, pad_boxes, pad_rows, pairwise_iou
from .postprocess import (
    best_detections,
    class_candidates,
    clip_to,
    first_survivors,
    image_limits,
    large_enough,
    selection_setting,
    split_detections,
)
from .row_buckets import bucketed

__all__ = ["BatchedRPN", "BatchedRoIHeads"]


class BatchedRPN(RegionProposalNetwork):
    """torchvision's RPN matching anchors, sampling them and selecting proposals for the batch
    at once (NMS image by image)."""

    def selectable(self, boxes: Tensor) -> Tensor:
        """Which clipped boxes may be proposals: torchvision drops those under ``min_size``."""
        return large_enough(boxes, self.min_size)

    def assign_targets_to_anchors(
        self, anchors: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor]]:
        gt, real = pad_boxes([t["boxes"] for t in targets])
        matches = match(self.proposal_matcher, pairwise_iou(gt, torch.stack(anchors)), real)
        labels = (matches >= 0).float()
        labels = labels.masked_fill(matches == self.proposal_matcher.BETWEEN_THRESHOLDS, -1.0)
        index = matches.clamp(min=0)[..., None].expand(-1, -1, 4)
        return list(labels.unbind()), list(gt.gather(1, index).unbind())

    def compute_loss(
        self,
        objectness: Tensor,
        pred_bbox_deltas: Tensor,
        labels: list[Tensor],
        regression_targets: list[Tensor],
    ) -> tuple[Tensor, Tensor]:
        """torchvision's RPN losses on a balanced sample of each image's anchors: binary
        cross-entropy over the sample, smooth L1 (beta 1/9) over its positives, both over the
        sample's size."""
        positive, negative = balanced_sample(
            torch.stack(labels),
            self.fg_bg_sampler.batch_size_per_image,
            self.fg_bg_sampler.positive_fraction,
        )
        positive, sampled = positive.flatten(), (positive | negative).flatten()
        size = sampled.sum()
        box = F.smooth_l1_loss(
            pred_bbox_deltas, torch.cat(regression_targets), beta=1 / 9, reduction="none"
        )
        box_loss = torch.where(positive[:, None], box, 0).sum() / size
        objectness_loss = F.binary_cross_entropy_with_logits(
            objectness.flatten(), torch.cat(labels).clamp(min=0), reduction="none"
        )
        return torch.where(sampled, objectness_loss, 0).sum() / size, box_loss

    def filter_proposals(
        self,
        proposals: Tensor,
        objectness: Tensor,
        image_shapes: list[tuple[int, int]],
        num_anchors_per_level: list[int],
    ) -> tuple[list[Tensor], list[Tensor]]:
        """torchvision's proposal selection: per level the ``pre_nms_top_n`` best, clipped,
        without boxes under ``min_size`` or scores under ``score_thresh``, NMS per level, the
        ``post_nms_top_n`` best."""
        n = proposals.shape[0]
        objectness = objectness.detach().reshape(n, -1)
        top = self._get_top_n_idx(objectness, num_anchors_per_level)
        # The level of each anchor index: how many level ends it has passed.
        ends = device_tensor(list(accumulate(num_anchors_per_level)), top.device)
        levels = torch.bucketize(top, ends, right=True)
        scores = objectness.gather(1, top).sigmoid()
        boxes = proposals.gather(1, top[..., None].expand(-1, -1, 4))
        boxes = clip_to(boxes, image_limits(image_shapes, boxes))
        keep = self.selectable(boxes) & (scores >= self.score_thresh)
        final_boxes, final_scores = [], []
        for b, s, level, k in zip(boxes, scores, levels, keep, strict=True):
            index = k.nonzero()[:, 0]
            b, s = b[index], s[index]
            chosen = first_survivors(b, s, level[index], self.nms_thresh, self.post_nms_top_n())
            final_boxes.append(b[chosen])
            final_scores.append(s[chosen])
        return final_boxes, final_scores


class BatchedRoIHeads(RoIHeads):
    """torchvision's R-CNN heads matching and sampling proposals (training) and selecting
    detections (inference, :func:`~spinedet.models.postprocess.best_detections`) for the batch
    at once."""

    kept_labels: Tensor | None = None  # the labels reported, all where None (selecting's)

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """torchvision's ``RoIHeads.forward``; training a mask head, the positives of all
        images (or a sample of them, :meth:`mask_samples`) go to it, and their mask targets are
        cut, at once."""
        if not (self.training and self.has_mask()):
            return super().forward(features, proposals, image_shapes, targets)
        proposals, matched, labels, regression_targets = self.select_training_samples(
            proposals, targets
        )
        crops = self.box_roi_pool(features, proposals, image_shapes)
        class_logits, box_regression = self.box_predictor(self.box_head(crops))
        loss_classifier, loss_box_reg = fastrcnn_loss(
            class_logits, box_regression, labels, regression_targets
        )
        positive = self.mask_samples(labels).nonzero()[:, 0]
        labels = torch.cat(labels)
        image = torch.repeat_interleave(
            torch.arange(len(proposals), device=labels.device),
            device_tensor([len(p) for p in proposals], labels.device),
            output_size=len(labels),
        )[positive]
        counts = torch.bincount(image, minlength=len(proposals)).tolist()
        boxes = torch.cat(proposals)[positive]
        crops = self.mask_roi_pool(features, list(boxes.split(counts)), image_shapes)
        mask_logits = bucketed(
            crops, self.mask_head, self.mask_predictor, enabled=self.bucket_mask_rois
        )
        matched = torch.cat(matched)[positive]
        loss_mask = _mask_loss(mask_logits, boxes, counts, image, matched, targets)
        losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        return [], losses | {"loss_mask": loss_mask}

    mask_samples_per_image: int | None = None
    # Training, the mask head's batch (the positives) padded to a few sizes (row_buckets); None:
    # on a GPU only. Inference runs torchvision's forward, unpadded.
    bucket_mask_rois: bool | None = None

    def mask_samples(self, labels: list[Tensor]) -> Tensor:
        """Which of the sampled boxes (each image's, concatenated) train the mask head: every
        positive, as torchvision does, or a random ``mask_samples_per_image`` of each image's
        positives, as Model Garden's ``num_sampled_masks`` does."""
        if self.mask_samples_per_image is None:
            return torch.cat(labels) > 0
        padded, real = pad_rows(labels)
        chosen, _ = balanced_sample(padded.where(padded > 0, -1), self.mask_samples_per_image, 1.0)
        return chosen[real]

    def selectable(self, boxes: Tensor) -> Tensor:
        """Which candidate boxes may be detections: torchvision drops those under 1e-2 wide."""
        return large_enough(boxes, 1e-2)

    def select_training_samples(
        self, proposals: list[Tensor], targets: list[dict[str, Tensor]] | None
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """Each image's proposals and ground-truth boxes, matched to the ground truth and
        sampled as torchvision's ``RoIHeads`` does: per image the sampled boxes, their matched
        ground-truth indices (0 for background), class labels (0) and regression targets."""
        self.check_targets(targets)
        gt_boxes = [t["boxes"].to(proposals[0].dtype) for t in targets]
        boxes, candidate = pad_boxes(self.add_gt_proposals(proposals, gt_boxes))
        gt, real = pad_boxes(gt_boxes)
        matches = match(self.proposal_matcher, pairwise_iou(gt, boxes), real)
        index = matches.clamp(min=0)
        classes = pad_sequence([t["labels"] for t in targets], batch_first=True)
        labels = F.pad(classes, (0, gt.shape[1] - classes.shape[1])).gather(1, index)
        labels = labels.masked_fill(matches == self.proposal_matcher.BELOW_LOW_THRESHOLD, 0)
        ignored = (matches == self.proposal_matcher.BETWEEN_THRESHOLDS) | ~candidate
        positive, negative = balanced_sample(
            labels.masked_fill(ignored, -1),
            self.fg_bg_sampler.batch_size_per_image,
            self.fg_bg_sampler.positive_fraction,
        )
        sampled = positive | negative
        counts = sampled.sum(1).tolist()
        image, row = sampled.nonzero().unbind(1)  # image by image, in proposal order
        chosen, index = boxes[image, row], index[image, row]
        regression = self.box_coder.encode_single(gt[image, index], chosen)
        per_image = (chosen, index, labels[image, row], regression)
        return tuple(list(x.split(counts)) for x in per_image)

    def postprocess_detections(
        self,
        class_logits: Tensor,
        box_regression: Tensor,
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        counts = [len(p) for p in proposals]
        ragged = len(set(counts)) > 1
        if ragged:  # pad every image to the most proposals
            class_logits, box_regression = (
                pad_sequence(x.split(counts), batch_first=True).flatten(0, 1)
                for x in (class_logits, box_regression)
            )
        stacked = pad_sequence(proposals, batch_first=True)
        r = stacked.shape[1]
        boxes, scores, labels = class_candidates(
            class_logits,
            box_regression,
            stacked,
            image_limits(image_shapes, stacked),
            self.box_coder,
        )
        keep = (scores > selection_setting(self, "score_thresh")) & self.selectable(boxes)
        kept = selection_setting(self, "kept_labels")
        if kept is not None:  # before the best detections_per_img are taken
            keep = keep & kept[labels]
        if ragged:
            real = (
                torch.arange(r, device=keep.device)
                < keep.new_tensor(counts, dtype=torch.long)[:, None]
            )
            keep = keep & real.repeat_interleave(class_logits.shape[-1] - 1, dim=1)
        index, found = best_detections(
            boxes,
            scores,
            labels,
            keep,
            class_logits.shape[-1],
            selection_setting(self, "nms_thresh"),
            selection_setting(self, "detections_per_img"),
        )
        per_image = split_detections(index, found, boxes=boxes, scores=scores, labels=labels)
        return tuple([d[key] for d in per_image] for key in ("boxes", "scores", "labels"))


def _mask_loss(
    logits: Tensor,
    boxes: Tensor,
    counts: list[int],
    image: Tensor,
    matched: Tensor,
    targets: list[dict[str, Tensor]],
) -> Tensor:
    """torchvision's ``maskrcnn_loss`` for positive ``boxes`` of every image (``counts`` per
    image; ``image``: each one's image, ``matched``: its ground truth there), the ground-truth
    masks cut at the boxes by one RoIAlign over the batch's masks where the images share a
    size."""
    masks = [t["masks"] for t in targets]
    if len({m.shape[-2:] for m in masks}) > 1:  # masks of each image's own size
        return maskrcnn_loss(
            logits,
            list(boxes.split(counts)),
            masks,
            [t["labels"] for t in targets],
            list(matched.split(counts)),
        )
    starts = device_tensor([0, *accumulate(len(m) for m in masks[:-1])], boxes.device)
    index = starts[image] + matched  # the matched mask among all images' masks
    if not len(index):
        return logits.sum() * 0
    rois = torch.cat([index[:, None].to(boxes.dtype), boxes], 1)
    size = logits.shape[-1]
    cut = roi_align(torch.cat(masks)[:, None].to(rois), rois, (size, size), 1.0)[:, 0]
    labels = torch.cat([t["labels"] for t in targets])[index]
    chosen = logits[torch.arange(len(labels), device=labels.device), labels]
    return F.binary_cross_entropy_with_logits(chosen, cut)
