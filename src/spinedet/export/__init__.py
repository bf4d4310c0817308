"""Export a spinedet model to ONNX or TorchScript, checked against PyTorch before it is written.

The default is the whole detector (:class:`~spinedet.export.graph.DetectorGraph`): uint8
images of any batch and size in; boxes, scores, the data set's category ids, the number of
detections and, for Mask R-CNN, pasted masks out, padded to the model's detections per image.
It is traced once (``torch.jit.trace``); TorchScript saves that trace and ONNX converts it
with torch's TorchScript-based exporter (torchvision's NMS and RoIAlign become ONNX
``NonMaxSuppression`` and ``RoiAlign``). Before the file is written, onnxruntime (or the
saved TorchScript module) and the PyTorch model detect on real images at two sizes, two at a
time, and must agree detection for detection; otherwise nothing is written.

``dense=True`` exports only the fixed-size part (:class:`~spinedet.export.dense.DenseOutputs`,
checked output by output); backbones and classifiers are always exported that way.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.transforms import CENTER_CROP_FRACTION, IMAGENET_MEAN, IMAGENET_STD
from ..files import atomic_write, refuse_existing, refuse_missing_path
from ..models import create_model, describe, detection_selection, load_model
from .check import check_detector, check_sizes, load_check_images
from .dense import DenseOutputs, ExportError
from .graph import DetectorGraph

__all__ = [
    "DenseOutputs",
    "DetectorGraph",
    "ExportError",
    "export_metadata",
    "export_onnx",
    "export_torchscript",
    "resolve_model",
]

TOLERANCE = 1e-4  # of the dense outputs, relative to their largest magnitude
OPSET = 17  # RoiAlign's half-pixel sampling (aligned=True) needs 16
INPUT_DTYPES = {"uint8": torch.uint8, "float32": torch.float32}
METADATA_FILE = "spinedet.json"  # TorchScript: the metadata in the archive's extra files


def resolve_model(model_or_path: nn.Module | str | Path, **overrides) -> nn.Module:
    """A model object, a spinedet ``.safetensors`` file or run directory, or a registry name
    (random weights)."""
    if isinstance(model_or_path, nn.Module):
        return model_or_path
    if Path(model_or_path).exists():
        return load_model(model_or_path, **overrides)
    refuse_missing_path(model_or_path)
    return create_model(str(model_or_path), **overrides)


def _default_size(model: nn.Module) -> int:
    transform = getattr(model, "transform", None)
    if transform is not None:
        return int(transform.max_size)
    # A classifier keeps the square size it was built for; a bare backbone has none.
    return int(getattr(model, "image_size", 640))


def _normalisation(graph: DetectorGraph | DenseOutputs) -> dict | str:
    """How the input is normalised: inside the graph (detectors), by the caller (classifiers
    read normalised images), or not at all (a backbone takes its input as given)."""
    kind = graph.kind if isinstance(graph, DenseOutputs) else graph.task
    if kind == "backbone":
        return "none: the input is used as given"
    if kind == "classifier":
        return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                "applied": "by the caller: feed (x - mean) / std of RGB x in [0, 1]"}  # fmt: skip
    return {"mean": graph.mean.flatten().tolist(), "std": graph.std.flatten().tolist(),
            "applied": "inside the graph"}  # fmt: skip


def _dense_contract(
    graph: DenseOutputs, size: int, shapes: Mapping[str, Sequence[int]]
) -> tuple[dict, dict[str, str]]:
    """The dense part's input contract and what each of its outputs (of ``shapes``) holds."""
    if graph.description.background:
        labels = "label i + 1 is class i of class_names / category_ids, label 0 the background"
    else:
        labels = "label i is class i of class_names / category_ids"
    meaning = {
        "logits": f"per label; {labels}",
        "cls_logits": f"per anchor and label; {labels}",
        "bbox_regression": "per anchor, deltas to decode against anchors (BoxCoder weights 1)",
        "objectness": "per anchor, the RPN's objectness logit",
        "rpn_bbox_regression": "per anchor, the RPN's deltas against anchors",
        "anchors": f"xyxy pixels of the {size} x {size} input, the same for every image",
    }
    outputs = {}
    for name, shape in shapes.items():
        what = meaning.get(name) or f"features at stride {2 ** int(name[1:])}"  # p3 .. p7
        outputs[name] = f"{tuple(shape)} float32 {what}"
    if graph.kind == "classifier":
        resize = (f"short side to round({size} / {CENTER_CROP_FRACTION}), centre {size} x "
                  f"{size} crop (spinedet's classification_eval_transforms)")  # fmt: skip
    elif graph.kind == "backbone":
        resize = "none"
    else:
        resize = f"resize so the longer side is {size}, zero-pad to {size} x {size}"
    batch = next(iter(shapes.values()))[0] if shapes else "N"
    contract = {
        "name": "images",
        "shape": [batch, 3, size, size],
        "dtype": "float32",
        "range": [0.0, 1.0] if graph.kind in ("retinanet", "rcnn") else "normalised",
        "channels": "RGB",
        "image_size": size,
        "resize": resize,
        "normalisation": _normalisation(graph),
    }
    return contract, outputs


def export_metadata(
    graph: DetectorGraph | DenseOutputs,
    image_size: int,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, str]:
    """What an exported model carries (ONNX ``metadata_props``, TorchScript's
    ``spinedet.json``): JSON strings of the model description, class names and category ids
    (not for a backbone), the input and output contract, and a detector's selection of
    detections (score and NMS thresholds, detections per image). ``shapes``: the dense part's
    output shapes, as exported."""
    if isinstance(graph, DenseOutputs):
        description = graph.description
        contract, outputs = _dense_contract(graph, image_size, shapes or {})
    else:
        description = describe(graph.model)
        contract, outputs = _detector_contract(graph, image_size)
    meta = {"spinedet_description": json.dumps(description.to_json())}
    if isinstance(graph, DetectorGraph):  # as exported, also where the options replaced them
        heads = detection_selection(graph.model)
        selection = {name: getattr(heads, name) for name in SELECTION_ATTRIBUTES}
        meta["selection"] = json.dumps(selection)
    if description.task != "backbone":
        meta["class_names"] = json.dumps(description.class_names)
        meta["category_ids"] = json.dumps([c.id for c in description.categories])
    return meta | {"input": json.dumps(contract), "outputs": json.dumps(outputs)}


def _detector_contract(graph: DetectorGraph, image_size: int) -> tuple[dict, dict[str, str]]:
    dtype = "uint8" if graph.dtype == torch.uint8 else "float32"
    k = graph.max_detections
    outputs = {
        "boxes": f"(N, {k}, 4) float32 xyxy in input pixels, best first; 0 after num_detections",
        "scores": f"(N, {k}) float32; 0 after num_detections",
        "labels": f"(N, {k}) int64 category ids (see category_ids); -1 after num_detections",
        "num_detections": "(N,) int64",
    }
    if graph.with_masks:
        outputs["masks"] = f"(N, {k}, H, W) uint8, 1 where the pasted mask probability > 0.5"
    contract = {
        "name": "images",
        "shape": ["N", 3, "H", "W"],
        "dtype": dtype,
        "range": [0, 255] if dtype == "uint8" else [0.0, 1.0],
        "channels": "RGB",
        "image_size": image_size,
        "resize": f"none inside: resize so the longer side is {image_size} (the model's size); "
        "any H and W work, padded inside to a multiple of 32",
        "normalisation": _normalisation(graph),
    }
    return contract, outputs


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401 - fail before the slow export when it is missing
    except ImportError as e:
        raise ExportError(f"ONNX export needs onnx and onnxruntime ({e})") from None


# A detector's attributes that select its detections, which the export options replace.
SELECTION_ATTRIBUTES = ("score_thresh", "nms_thresh", "detections_per_img")


def _selection(
    score_threshold: float | None, nms_threshold: float | None, max_detections: int | None
) -> dict[str, float | int]:
    """The export options given, by the attribute (``SELECTION_ATTRIBUTES``) each replaces."""
    given = zip(SELECTION_ATTRIBUTES, (score_threshold, nms_threshold, max_detections), strict=True)
    return {name: value for name, value in given if value is not None}


def _prepare(
    model_or_path: nn.Module | str | Path,
    image_size: int | None,
    input_dtype: str,
    selection: Mapping[str, float | int],
) -> tuple[nn.Module, DetectorGraph, int, torch.Tensor]:
    """The model (its ``SELECTION_ATTRIBUTES`` replaced by ``selection``'s values), its graph,
    the image size, and the example batch the trace records."""
    if input_dtype not in INPUT_DTYPES:
        raise ExportError(f"input dtype {input_dtype!r}: use one of {list(INPUT_DTYPES)}")
    given = isinstance(model_or_path, nn.Module)
    overrides = {"image_size": image_size} if image_size and not given else {}
    model = resolve_model(model_or_path, **overrides).eval()
    if selection and given:  # the caller's model is not changed
        raise ExportError(f"{', '.join(selection)}: export from the weights' path, or build "
                          "the model with these options")  # fmt: skip
    for name, value in selection.items():  # the graph and the check's PyTorch model alike
        setattr(detection_selection(model), name, value)
    size = _default_size(model)
    if image_size and image_size != size:
        raise ExportError(
            f"image_size {image_size} differs from the model's {size}: build the model with "
            f"image_size={image_size}"
        )
    graph = DetectorGraph(model, INPUT_DTYPES[input_dtype]).eval()
    example = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
    if input_dtype == "float32":
        example = example.float() / 255
    return model, graph, size, example


def _result(graph: DetectorGraph, out: str | Path, fmt: str, size: int) -> dict:
    return {
        "path": str(out),
        "kind": graph.task,
        "format": fmt,
        "image_size": size,
        "outputs": json.loads(export_metadata(graph, size)["outputs"]),
        "check": None,
    }


def _add_onnx_metadata(path: str, metadata: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(path)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, path)


def _trace(graph: DetectorGraph, example: torch.Tensor) -> torch.jit.ScriptModule:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings on shapes that are symbolic here
        return torch.jit.trace(graph, (example,), check_trace=False)


class _DtypeCheck(nn.Module):
    """The traced detector behind a check of its input's dtype: a trace takes any (ONNX's typed
    input refuses the others), and reads uint8 as 0..1 or float as 0..255, finding nothing."""

    def __init__(self, traced: torch.jit.ScriptModule, dtype: torch.dtype) -> None:
        super().__init__()
        self.traced = traced
        self.dtype = dtype
        name = {torch.uint8: "uint8 0..255", torch.float32: "float32 0..1"}[dtype]
        self.message = f"images must be {name} (this export's input dtype)"

    def check(self, images: torch.Tensor) -> None:
        if images.dtype != self.dtype:
            raise RuntimeError(self.message)


class _CheckedBoxes(_DtypeCheck):
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                      torch.Tensor]:  # fmt: skip
        self.check(images)
        return self.traced(images)


class _CheckedMasks(_DtypeCheck):
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                      torch.Tensor, torch.Tensor]:  # fmt: skip
        self.check(images)
        return self.traced(images)


def _run_check(
    run: Callable[[torch.Tensor], dict[str, np.ndarray]],
    model: nn.Module,
    graph: DetectorGraph,
    size: int,
    check_images: Sequence[str | Path] | None,
) -> dict:
    stats = check_detector(
        run, model, load_check_images(check_images), check_sizes(size), graph.max_detections,
        float_input=graph.dtype != torch.uint8,
    )  # fmt: skip
    return {**stats, "sizes": check_sizes(size)}


def export_onnx(
    model_or_path: nn.Module | str | Path,
    out: str | Path,
    image_size: int | None = None,
    check: bool = True,
    batch_size: int = 1,
    dense: bool = False,
    check_images: Sequence[str | Path] | None = None,
    input_dtype: str = "uint8",
    overwrite: bool = False,
    *,
    score_threshold: float | None = None,
    nms_threshold: float | None = None,
    max_detections: int | None = None,
) -> dict:
    """Export a model to ONNX at ``out``: the whole detector (see the module docstring), or its
    dense part with ``dense`` (and for backbones and classifiers).

    ``score_threshold``, ``nms_threshold`` (IoU) and ``max_detections`` (the ``K`` rows of each
    image's outputs) replace the detector's own in the exported graph (default: its own).

    ``image_size``: the model's input size (default: the size it was built for): the longer
    side of the check images, the square size of the dense export. With ``check``,
    onnxruntime must agree with PyTorch (on ``check_images``, default two images of the
    synthetic shapes set) or :class:`ExportError` is raised and ``out`` is not written.
    ``input_dtype``: ``"uint8"`` (0..255) or ``"float32"`` (0..1) images. An existing ``out``
    is replaced only with ``overwrite``.

    Returns ``{"path", "kind", "format", "image_size", "outputs", "check"}`` for a detector
    (``check`` holds the largest differences found); see :func:`_export_dense_onnx` for the
    dense part.
    """
    refuse_existing(out, overwrite)
    _require_onnx()
    selection = _selection(score_threshold, nms_threshold, max_detections)
    if dense or describe(resolve_model(model_or_path)).task in ("backbone", "classifier"):
        if selection:
            raise ExportError("score_threshold, nms_threshold, max_detections: the dense part "
                              "selects no detections")  # fmt: skip
        return _export_dense_onnx(model_or_path, out, image_size, check, batch_size)
    model, graph, size, example = _prepare(model_or_path, image_size, input_dtype, selection)
    result = _result(graph, out, "onnx", size)
    names = graph.output_names
    axes = {"images": {0: "N", 2: "H", 3: "W"}} | {n: {0: "N"} for n in names}
    if graph.with_masks:
        axes["masks"] = {0: "N", 2: "H", 3: "W"}

    def write(tmp: str) -> None:
        import onnxruntime as ort

        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _trace(graph, example), (example,), tmp, dynamo=False, opset_version=OPSET,
                input_names=["images"], output_names=names, dynamic_axes=axes,
            )  # fmt: skip
        _add_onnx_metadata(tmp, export_metadata(graph, size))
        if check:
            session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])

            def run(images: torch.Tensor) -> dict[str, np.ndarray]:
                return dict(zip(names, session.run(names, {"images": images.numpy()}), strict=True))

            result["check"] = _run_check(run, model, graph, size, check_images)

    atomic_write(out, write)
    return result


def export_torchscript(
    model_or_path: nn.Module | str | Path,
    out: str | Path,
    image_size: int | None = None,
    check: bool = True,
    check_images: Sequence[str | Path] | None = None,
    input_dtype: str = "uint8",
    overwrite: bool = False,
    *,
    score_threshold: float | None = None,
    nms_threshold: float | None = None,
    max_detections: int | None = None,
) -> dict:
    """Export a detector to TorchScript at ``out`` (``import torchvision`` for its NMS and
    RoIAlign ops, then ``torch.jit.load`` it; spinedet is not needed; the metadata of
    :func:`export_metadata` is the archive's ``spinedet.json``), checked like
    :func:`export_onnx` with the saved module, with the same selection options; an existing
    ``out`` is replaced only with ``overwrite``."""
    refuse_existing(out, overwrite)
    task = describe(resolve_model(model_or_path)).task
    if task in ("backbone", "classifier"):
        raise ExportError(f"TorchScript export covers detectors; a {task} exports to ONNX only")
    # From the file, not the model above: another image_size rebuilds it at that size.
    selection = _selection(score_threshold, nms_threshold, max_detections)
    model, graph, size, example = _prepare(model_or_path, image_size, input_dtype, selection)
    result = _result(graph, out, "torchscript", size)
    names = graph.output_names

    def write(tmp: str) -> None:
        files = {METADATA_FILE: json.dumps(export_metadata(graph, size))}
        traced = _trace(graph, example)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still here
            checked = _CheckedMasks if graph.with_masks else _CheckedBoxes
            traced = torch.jit.script(checked(traced, graph.dtype))
            # Through memory: torch's file writer aborts the process on a full disk (an
            # exception in a C++ destructor), leaving the temp file; Python's write raises.
            archive = io.BytesIO()
            torch.jit.save(traced, archive, _extra_files=files)
            Path(tmp).write_bytes(archive.getbuffer())
            loaded = torch.jit.load(tmp) if check else None
        if check:

            def run(images: torch.Tensor) -> dict[str, np.ndarray]:
                # The profiling executor's warm-up runs would take most of the check's time.
                with torch.jit.optimized_execution(False):
                    return {n: t.numpy() for n, t in zip(names, loaded(images), strict=True)}

            result["check"] = _run_check(run, model, graph, size, check_images)

    atomic_write(out, write)
    return result


def _export_dense_onnx(
    model_or_path: nn.Module | str | Path,
    out: str | Path,
    image_size: int | None,
    check: bool,
    batch_size: int,
) -> dict:
    """The dense part (:class:`DenseOutputs`) for an ``(batch_size, 3, S, S)`` float input, ``S``
    by default the size the model was built for, with :func:`export_metadata`'s
    ``metadata_props`` (for a classifier: its class names and the normalisation it expects).

    With ``check``, onnxruntime runs the file on a random image and every output must be within
    ``1e-4 * max(1, max|output|)`` of PyTorch's (float32 rounding is relative to the outputs'
    scale); otherwise :class:`ExportError` is raised and ``out`` is not written.

    Returns ``{"path", "kind", "image_size", "outputs": {name: shape}, "max_abs_diff":
    {name: diff}}`` (``max_abs_diff`` is empty without ``check``).
    """
    model = resolve_model(model_or_path).eval()
    size = image_size or _default_size(model)
    graph = DenseOutputs(model, size).eval()
    images = torch.rand(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = graph(images)
    result = {
        "path": str(out),
        "kind": graph.kind,
        "image_size": size,
        "outputs": {n: list(t.shape) for n, t in zip(graph.output_names, expected, strict=True)},
        "max_abs_diff": {},
    }

    def write(tmp: str) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph, (images,), tmp, dynamo=False, opset_version=OPSET,
                input_names=["images"], output_names=graph.output_names,
            )  # fmt: skip
        _add_onnx_metadata(tmp, export_metadata(graph, size, result["outputs"]))
        if check:
            result["max_abs_diff"] = _check_dense(tmp, images, graph.output_names, expected)

    atomic_write(out, write)
    return result


def _check_dense(
    path: str, images: torch.Tensor, names: list[str], expected: tuple[torch.Tensor, ...]
) -> dict[str, float]:
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(names, {"images": images.numpy()})
    diffs, failures = {}, []
    for name, ours, theirs in zip(names, expected, got, strict=True):
        ref = ours.numpy()
        if ref.shape != theirs.shape:
            failures.append(f"{name}: shape {theirs.shape}, expected {ref.shape}")
            continue
        diff = float(np.abs(ref - theirs).max()) if ref.size else 0.0
        diffs[name] = diff
        limit = TOLERANCE * max(1.0, float(np.abs(ref).max()) if ref.size else 0.0)
        if not diff <= limit:
            failures.append(f"{name}: max |diff| {diff:.3g} > {limit:.3g}")
    if failures:
        raise ExportError("onnxruntime disagrees with PyTorch: " + "; ".join(failures))
    return diffs
