"""A Model Garden (TF2) or tensorflow/tpu (TF1) checkpoint to a spinedet safetensors file
(``spinedet convert-tf``)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from torchvision.models import ResNet50_Weights

from ..data.coco_files import read_json
from ..data.errors import DataError
from ..files import refuse_existing
from ..models.registry import create_model, model_task
from ..models.weights import save_weights
from .tf_checkpoint import TensorBundle, TFCheckpoint, open_checkpoint
from .tf_mapping import ConversionError, convert_checkpoint, find_backbone, model_node
from .tpu_mapping import (
    convert_tpu_checkpoint,
    tpu_backbone_scope,
    tpu_inference_options,
    tpu_model_kind,
)

__all__ = ["convert_tf"]


def _shape(ckpt: TFCheckpoint, *path: str) -> tuple[int, ...]:
    node = ckpt.child(model_node(ckpt), *path)
    if node is None or node.tensor is None:
        raise ConversionError(f"{ckpt.prefix} holds no {'/'.join(path)}")
    return ckpt.shape(node.tensor)


def _imagenet_names(num_classes: int) -> list[str] | None:
    """ImageNet class names for a zoo classifier's outputs: 1001 are class 0 (background, never
    a label) and the 1,000 ImageNet classes in synset order, torchvision's order; other counts
    (e.g. iNaturalist's) keep numbered names."""
    if num_classes not in (1000, 1001):
        return None
    names = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    return ["background", *names] if num_classes == 1001 else list(names)


def _retinanet_options(ckpt: TFCheckpoint) -> dict:
    """Classes (classifier channels / 9 anchors) and tower depth of a RetinaNet checkpoint."""
    convs = ckpt.child(model_node(ckpt), "_head", "_cls_convs")
    return {
        "num_classes": _shape(ckpt, "_head", "_classifier", "kernel")[-1] // 9,
        "head_depth": len(convs.children) if convs is not None else None,
    }


def _rcnn_options(ckpt: TFCheckpoint, task: str) -> dict:
    """Head sizes of a Model Garden Faster/Mask R-CNN checkpoint, read from its shapes."""
    node = model_node(ckpt)
    rpn = ckpt.child(node, "rpn_head", "_convs")
    if rpn is None:
        raise ConversionError(f"{ckpt.prefix} holds no R-CNN heads (model/rpn_head)")
    box_convs = ckpt.child(node, "detection_head", "0", "_convs")
    options = {
        "num_classes": _shape(ckpt, "detection_head", "0", "_classifier", "kernel")[-1],
        "head_channels": _shape(ckpt, "rpn_head", "_convs", "0", "kernel")[-1],
        "rpn_depth": len(rpn.children),
        "rpn_scales": _shape(ckpt, "rpn_head", "_classifier", "kernel")[-1] // 3,
        "fc_dim": _shape(ckpt, "detection_head", "0", "_fcs", "0", "kernel")[-1],
        "box_convs": len(box_convs.children) if box_convs is not None else 0,
    }
    mask_convs = ckpt.child(node, "mask_head", "_convs") if task == "maskrcnn" else None
    if mask_convs is not None:
        options["mask_convs"] = len(mask_convs.children)
    return options


def _categories(path: str | Path, num_classes: int) -> list[dict]:
    """Categories ``1 .. num_classes - 1`` named from a COCO json's ``categories`` (Model
    Garden's class index is the category id); ids the file lacks are named ``unused_<id>``."""
    data = read_json(path)
    try:
        names = {int(c["id"]): str(c["name"]) for c in data["categories"]}
    except (TypeError, KeyError, ValueError) as e:
        raise DataError("no valid 'categories' list of {id, name} entries", path) from e
    beyond = sorted(k for k in names if not 0 < k < num_classes)
    if beyond:
        raise DataError(
            f"category ids {beyond[:5]} are outside the checkpoint's classes 1..{num_classes - 1}",
            path,
        )
    return [{"id": k, "name": names.get(k, f"unused_{k}")} for k in range(1, num_classes)]


def _run_params(ckpt: TensorBundle) -> dict:
    """The ``params.yaml`` that Model Garden and tensorflow/tpu write into the model directory,
    when one lies beside the checkpoint (else empty)."""
    path = ckpt.prefix.parent / "params.yaml"
    if not path.is_file():
        return {}
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConversionError(f"{path}: not valid YAML ({e})".splitlines()[0]) from None
    return params if isinstance(params, dict) else {}


def _lookup(params: dict, *keys: str):
    for key in keys:
        params = params.get(key) if isinstance(params, dict) else None
    return params


def _activation(ckpt: TensorBundle, params: dict, given: str | None) -> str:
    """The activation from the run's params.yaml (tensorflow/tpu: batch_norm_activation,
    Model Garden: task.model.norm_activation), checked against ``given``; checkpoints do not
    record it, and a wrong one converts into a silently wrong model."""
    recorded = _lookup(params, "batch_norm_activation", "activation") or _lookup(
        params, "task", "model", "norm_activation", "activation"
    )
    if given is None and recorded is None:
        raise ConversionError(
            f"{ckpt.prefix} does not record its activation: pass --activation relu or "
            "--activation swish (the zoo lists which), or put the run's params.yaml beside it"
        )
    if given is not None and recorded is not None and given != recorded:
        raise ConversionError(
            f"--activation {given} contradicts {ckpt.prefix.parent / 'params.yaml'} "
            f"(activation: {recorded})"
        )
    return given or recorded


# BatchNorm epsilon of tensorflow/tpu's zoo configs where params.yaml does not say:
# configs/classification_config.py, base_config.py, and spinenet*_mrcnn.yaml.
_TPU_BN_EPS = {"classifier": 1e-5, "retinanet": 1e-4, "maskrcnn": 1e-3, "backbone": 1e-4}


# Anchor sizes of tensorflow/tpu's zoo configs (configs/spinenet/*.yaml, else
# detection_config.py's 4.0) where params.yaml does not say.
_TPU_ANCHOR_SIZE = {"retinanet": {"143": 4.0, "190": 4.0}, "maskrcnn": {"190": 5.0}}


def _count(ckpt: TensorBundle, pattern: str) -> int:
    """How many of the checkpoint's tensor names match ``pattern`` (whole names)."""
    return sum(bool(re.fullmatch(pattern, key)) for key in ckpt.entries)


def _tpu_options(ckpt: TensorBundle, kind: str, task: str | None, name: str, params: dict) -> dict:
    """Builder options reproducing a tensorflow/tpu network: its padding, downsampling (or
    SpineNet-Mobile's squeeze-excitation) and BN epsilon, plus head sizes read from the
    checkpoint's shapes (and anchors from params)."""
    mobile = tpu_backbone_scope(ckpt) == "spinenet_mbconv"
    if mobile != name.startswith("spinenet_mobile"):
        held = "SpineNet-Mobile" if mobile else "SpineNet"
        wanted = ("spinenet_mobile49" if mobile else "spinenet49") + (f"_{task}" if task else "")
        raise ConversionError(
            f"{ckpt.prefix} holds a tensorflow/tpu {held}, not a {name}: convert it with "
            f"--model {wanted} (or another size)"
        )
    variant = name.removeprefix("spinenet").split("_")[0]
    eps = _lookup(params, "batch_norm_activation", "batch_norm_epsilon")
    try:
        eps = _TPU_BN_EPS[kind] if eps is None else float(eps)  # PyYAML reads 1e-05 as text
    except ValueError:
        raise ConversionError(
            f"{ckpt.prefix.parent / 'params.yaml'}: batch_norm_epsilon {eps!r} is not a number"
        ) from None
    options: dict = {"padding": "fixed", "bn_eps": eps}
    options |= {"squeeze_excite": "tpu"} if mobile else {"downsample": "tpu"}
    if task is None:
        return options
    if task != kind:
        heads = "none" if kind == "backbone" else kind
        raise ConversionError(
            f"{ckpt.prefix} is a tensorflow/tpu {kind} checkpoint (heads: {heads}), not a "
            f"{task}: convert the backbone alone with --model spinenetXX"
        )
    if kind == "classifier":
        options["num_classes"] = ckpt.shape("classification_head/dense/kernel")[-1]
        return options
    if kind == "maskrcnn":
        options |= {
            "num_classes": ckpt.shape("fast_rcnn_head/class-predict/kernel")[-1],
            "head_channels": ckpt.shape("rpn_head/rpn/kernel")[-1],
            "rpn_depth": _count(ckpt, r"rpn_head/rpn(-\d+)?/kernel"),
            "rpn_scales": ckpt.shape("rpn_head/rpn-class/kernel")[-1] // 3,
            "fc_dim": ckpt.shape("fast_rcnn_head/fc6/kernel")[-1],
            "box_convs": _count(ckpt, r"fast_rcnn_head/conv_\d+/kernel"),
            "mask_convs": _count(ckpt, r"mask_head/mask-conv-l\d+/kernel"),
        }
    else:
        # SpineNet-Mobile's head convs are separable (a depthwise and a pointwise kernel).
        tower_conv = r"retinanet/class_net/class-\d+/(pointwise_)?kernel"
        predict = "retinanet/class_net/class-predict"
        kernel = "pointwise_kernel" if f"{predict}/pointwise_kernel" in ckpt.entries else "kernel"
        options["num_classes"] = ckpt.shape(f"{predict}/{kernel}")[-1] // 9
        options["head_depth"] = _count(ckpt, tower_conv)
    anchor_size = _lookup(params, "anchor", "anchor_size")
    options["anchor_size"] = float(anchor_size or _TPU_ANCHOR_SIZE[kind].get(variant, 3.0))
    return options | tpu_inference_options(kind, options["num_classes"])


def convert_tf(
    checkpoint: str | Path,
    model_name: str,
    out: str | Path,
    num_classes: int | None = None,
    activation: str | None = None,
    categories: str | Path | None = None,
    overwrite: bool = False,
    **model_kwargs,
) -> str:
    """Convert a Model Garden (TF2) or tensorflow/tpu (TF1) checkpoint for ``model_name`` and
    save it to ``out``; which of the two it is, is read from the checkpoint.

    Detector head sizes (classes, R-CNN head widths, RPN convs and anchor scales) are read
    from the checkpoint and recorded in the file, so :func:`~spinedet.load_model` rebuilds the
    same model; so are the options reproducing a tensorflow/tpu network (``padding="fixed"``,
    ``downsample="tpu"``, its BN epsilon). The ``activation`` is read from the ``params.yaml``
    beside the checkpoint, else it must be given. Model Garden's class ``k`` is category id
    ``k`` of its COCO json; given that json as ``categories``, the file records their names
    (else the names are ``"1"``, ...). ``model_kwargs`` are further builder options (e.g.
    ``filter_scale`` for a checkpoint of a custom scaling). An existing ``out`` is replaced
    only with ``overwrite``. Returns a summary.
    """
    refuse_existing(out, overwrite)
    ckpt = open_checkpoint(checkpoint)
    params = _run_params(ckpt)
    name = model_name.lower()
    task = model_task(name)
    if isinstance(ckpt, TFCheckpoint):
        find_backbone(ckpt)  # fail early, before building a model
        kind = None
    else:
        kind = tpu_model_kind(ckpt)
    activation = _activation(ckpt, params, activation)
    options: dict = {}
    if kind is not None:
        options = _tpu_options(ckpt, kind, task, name, params)
    elif task == "classifier":
        raise ConversionError(
            f"{ckpt.prefix} is a Model Garden (TF2) checkpoint: classifiers convert from "
            "tensorflow/tpu ones"
        )
    elif task is not None:
        options = _retinanet_options(ckpt) if task == "retinanet" else _rcnn_options(ckpt, task)
    if num_classes is not None:
        if task is None:
            raise ConversionError(f"{model_name} is a backbone: --num-classes does not apply")
        if num_classes != options["num_classes"]:
            raise ConversionError(
                f"{ckpt.prefix} has {options['num_classes']} classes (with background), "
                f"not {num_classes}: convert as is, then fine-tune with your classes"
            )
    metadata: dict = {"converted_from": str(ckpt.prefix)}
    if categories is not None:
        if task in (None, "classifier"):
            raise ConversionError(f"{model_name}: --categories applies to detectors only")
        options["categories"] = _categories(categories, options.pop("num_classes"))
    elif task == "classifier" and (names := _imagenet_names(options["num_classes"])):
        options["class_names"] = names
        del options["num_classes"]
    model = create_model(name, activation=activation, **(options | model_kwargs))
    if kind is None:
        state = convert_checkpoint(ckpt, model)
    else:
        state = convert_tpu_checkpoint(ckpt, model)
    model.load_state_dict(state, strict=False)  # completeness was checked; BN counters stay
    save_weights(model, out, metadata)
    shown = ", ".join(
        f"{k}={v}"
        for k, v in {"activation": activation, **options}.items()
        if k not in ("categories", "class_names")
    )
    return f"{ckpt.prefix} -> {out}: {name}{f' ({shown})' if shown else ''}, {len(state)} tensors"
