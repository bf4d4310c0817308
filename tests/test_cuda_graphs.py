"""CUDA graphs (spinedet.cuda_graphs) compute what the eager model does: the same losses,
gradients, running statistics and detections. The graph tests need a GPU; on the CPU the
replaced forwards must run the model as it is and leave its state untouched."""

import copy
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import same_detections
from torch.utils._pytree import tree_flatten, tree_unflatten

import spinedet
from spinedet.cuda_graphs import CudaGraphs, cuda_graph_parts, pad_to_square, use_cuda_graphs
from spinedet.models.layers import BatchNorm2d
from spinedet.optimize import optimize_for_inference

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
SIZE = 128
DETECTORS = ["spinenet49s_retinanet", "spinenet49s_maskrcnn"]


def small(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "spinenet49s":  # a bare backbone: no classes, no input size
        return spinedet.create_model(name, filter_scale=0.25)
    return spinedet.create_model(name, num_classes=5, image_size=SIZE, filter_scale=0.25)


def flatten(outputs: object) -> torch.Tensor:
    return torch.cat([t.flatten().float() for t in tree_flatten(outputs)[0]])


def batch(n: int, seed: int, device: str, height: int = SIZE) -> tuple[list, list]:
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, height, SIZE, generator=g).to(device) for _ in range(n)]
    targets = []
    for _ in range(n):
        boxes = torch.tensor([[8.0, 10.0, 60.0, 70.0], [30.0, 40.0, 120.0, 100.0]])
        boxes[:, :2] += torch.randint(0, 6, (2, 2), generator=g)
        masks = torch.zeros(2, height, SIZE, dtype=torch.uint8)
        for m, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist(), strict=True):
            m[y0:y1, x0:x1] = 1
        labels = torch.randint(1, 5, (2,), generator=g)
        targets.append({"boxes": boxes, "labels": labels, "masks": masks})
    return images, [{k: v.to(device) for k, v in t.items()} for t in targets]


@pytest.mark.parametrize("name", [*DETECTORS, "spinenet49s_classifier", "spinenet49s"])
def test_graphed_parts_keep_state_and_cpu_outputs(name):
    model = small(name).eval()
    keys = list(model.state_dict())
    x = torch.rand(1, 3, SIZE, SIZE)
    inputs = list(x) if name in DETECTORS else x
    with torch.no_grad():
        before = model(inputs)
        graphs = use_cuda_graphs(model)
        parts = cuda_graph_parts(model)
        assert [p.forward for p in parts] == graphs
        assert list(model.state_dict()) == keys
        after = model(inputs)  # CPU calls run the model as it is, and capture nothing
    assert not any(g.graphs for g in graphs)
    assert torch.equal(flatten(before), flatten(after))
    copied = copy.deepcopy(model)  # a copy replays its own parameters, never the original's
    for part, original in zip(cuda_graph_parts(copied), parts, strict=True):
        assert isinstance(part.forward, CudaGraphs) and part.forward.module is part
        assert part is not original
    for g in graphs:
        g.remove()
    assert all("forward" not in p.__dict__ for p in parts)


def test_batchnorm_counting_on_device_keeps_the_count():
    norm = BatchNorm2d(3)
    norm(torch.randn(2, 3, 4, 4))
    norm.count_on_device()  # the host count reaches the buffer, later batches count there
    assert norm.num_batches_tracked.item() == 1
    norm(torch.randn(2, 3, 4, 4))
    assert norm.num_batches_tracked.item() == 2 and norm._uncounted == 0


def test_pad_to_square_gives_every_batch_one_shape():
    model = small("spinenet49s_retinanet")
    images = [torch.rand(3, 96, 128), torch.rand(3, 64, 100)]
    assert model.transform(images)[0].tensors.shape[-2:] == (96, 128)  # the batch's, rounded
    assert pad_to_square(model)
    for sub in (images, images[:1], images[1:]):
        assert model.transform(sub)[0].tensors.shape[-2:] == (128, 128)
    odd = spinedet.create_model("spinenet49s_retinanet", num_classes=5, image_size=200,
                                filter_scale=0.25)  # fmt: skip
    assert not pad_to_square(odd)  # 200 px is no multiple of size_divisible, 32
    assert not pad_to_square(small("spinenet49s_classifier"))


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    """Within ``tol`` of the largest magnitude of ``b`` (CUDA's atomic adds reorder sums)."""
    assert a.shape == b.shape
    if a.numel() == 0:
        return True
    a, b = a.float(), b.float()
    return bool((a - b).abs().max() <= tol * b.abs().max())


def same_update(eager: torch.nn.Module, graphed: torch.nn.Module) -> None:
    """A small step along the eager model's gradient signs, copied to the graphed one in place
    (its graphs read these addresses): the next call of each starts from the same state."""
    with torch.no_grad():
        for p, q in zip(eager.parameters(), graphed.parameters(), strict=True):
            if p.grad is not None:
                p.sub_(1e-3 * p.grad.sign())
            q.copy_(p)
        for name, b in graphed.named_buffers():
            if not name.endswith("num_batches_tracked"):
                b.copy_(eager.get_buffer(name))


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_same_state(eager: torch.nn.Module, graphed: torch.nn.Module, tol: float) -> None:
    ref, got = grads(eager), grads(graphed)
    assert ref.keys() == got.keys()
    # Gradients within tol of the model's largest: rounding scales with the terms summed, and
    # some are 0 up to rounding (a norm's bias before another norm: 1e-9 on an H100).
    scale = max(g.abs().max() for g in ref.values())
    for name in ref:
        assert (got[name] - ref[name]).abs().max() <= tol * scale, name
    for name, value in eager.named_buffers():
        if not name.endswith("num_batches_tracked"):
            assert close(graphed.get_buffer(name), value, tol), name


@pytest.fixture
def fp32():
    """Float32 convolutions and matmuls in full precision. With TF32 (PyTorch's default for
    cuDNN) a RetinaNet's stem gradients from the graph and from eager calls differed by up to
    1.1e-3 of their largest value on an H100 (measured 2026-11-27); TF32 rounding, summed in
    another order, is the likely cause, which full precision makes ~1e-6."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@cuda
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_retinanet_training_steps_equal_eager(amp, layout, fp32):
    eager = small("spinenet49s_retinanet").cuda().train().to(memory_format=layout)
    graphed = copy.deepcopy(eager)
    graphs = use_cuda_graphs(graphed)
    tol = 3e-3 if amp is None else 3e-2
    for step in range(4):  # eager, capture and replay, replay, replay on new inputs
        images, targets = batch(2, min(step, 2), "cuda", height=SIZE)
        losses = []
        for model in (eager, graphed):
            with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
                out = model(images, targets)
            model.zero_grad(set_to_none=True)
            sum(out.values()).backward()
            losses.append(torch.stack([v.detach().float() for v in out.values()]))
        assert close(losses[1], losses[0], tol), (step, losses)
        assert_same_state(eager, graphed, tol)
        same_update(eager, graphed)
    assert all(len(g.graphs) == 1 for g in graphs)
    counts = {k: v for k, v in graphed.state_dict().items() if k.endswith("num_batches_tracked")}
    ref = eager.state_dict()
    assert counts and all(torch.equal(v, ref[k]) and v.item() == 4 for k, v in counts.items())


def part_inputs(model: torch.nn.Module, part: int, seed: int) -> tuple:
    """Arguments of cuda_graph_parts(model)[part]: images for the backbone, features of the
    pyramid's shapes for the dense head, RoI features for the box head."""
    g = torch.Generator().manual_seed(seed)
    if part == 0:
        return (torch.rand(2, 3, SIZE, SIZE, generator=g).cuda(),)
    channels = model.backbone.out_channels
    if part == 2:
        crops = torch.randn(24, channels, 7, 7, generator=g).cuda()
        return (crops.requires_grad_(torch.is_grad_enabled()),)
    features = [torch.randn(2, channels, SIZE >> level, SIZE >> level, generator=g).cuda()
                for level in model.backbone.levels]  # fmt: skip
    return ([f.requires_grad_(torch.is_grad_enabled()) for f in features],)


@cuda
@pytest.mark.parametrize("name", DETECTORS)
def test_graphed_parts_equal_eager_in_training_and_inference(name, fp32):
    eager = small(name).cuda()
    graphed = copy.deepcopy(eager)
    use_cuda_graphs(graphed)
    pairs = list(zip(cuda_graph_parts(eager), cuda_graph_parts(graphed), strict=True))
    for index, (e, g) in enumerate(pairs):
        for call in range(4):  # eager, capture and replay, replay, replay on new inputs
            args = part_inputs(eager, index, min(call, 2))
            outs = []
            for part, inputs in ((e, args), (g, tree_map_detach(args))):
                leaves = tree_flatten(part(*inputs))[0]
                weights = torch.Generator(device="cuda").manual_seed(7)
                loss = sum((o * torch.rand(o.shape, device="cuda", generator=weights)).sum()
                           for o in leaves)  # fmt: skip
                part.zero_grad(set_to_none=True)
                loss.backward()
                outs.append([o.detach() for o in leaves] + [i.grad for i in tree_flatten(inputs)[0]
                                                            if i.requires_grad])  # fmt: skip
            for a, b in zip(*outs, strict=True):
                assert close(b, a, 1e-3), (name, index, call)
            assert_same_state(e, g, 1e-3)
            same_update(e, g)
        assert len(g.forward.graphs) == 1
    eager.eval(), graphed.eval()
    for index, (e, g) in enumerate(pairs):
        for call in range(4):
            with torch.inference_mode():
                args = part_inputs(eager, index, min(call, 2))
                ref, got = tree_flatten(e(*args))[0], tree_flatten(g(*args))[0]
            for a, b in zip(ref, got, strict=True):
                assert close(b, a, 1e-4), (name, index, call)
        assert len(g.forward.graphs) == 2  # the training graph and the inference graph


def tree_map_detach(args: tuple) -> tuple:
    """The same arguments, as new leaves (their own gradients)."""
    flat, spec = tree_flatten(args)
    return tree_unflatten([t.detach().clone().requires_grad_(t.requires_grad) for t in flat], spec)


@cuda
def test_retinanet_inference_graphs_equal_eager_detections():
    model = small("spinenet49s_retinanet").cuda()
    model.detections_per_img = 50
    # Class scores that vary from place to place (an untrained head's are all 0.01), spread
    # out so few are near-equal (whose order float rounding may swap).
    logits = model.head.classification_head.cls_logits
    torch.nn.init.normal_(logits.weight, std=3.0)
    torch.nn.init.constant_(logits.bias, -2.0)
    eager = optimize_for_inference(model, cuda_graphs=False)
    pad_to_square(eager)
    fast = optimize_for_inference(model)  # on CUDA: padded square, graphs
    assert all(isinstance(p.forward, CudaGraphs) for p in cuda_graph_parts(fast))
    found = 0
    for seed in (0, 1, 2, 1):  # eager, capture and replay, new inputs, repeated inputs
        images, _ = batch(2, seed, "cuda", height=96)
        with torch.inference_mode():
            ref, got = eager(images), fast(images)
        for a, b in zip(ref, got, strict=True):
            assert same_detections(a, b)
            found += len(a["boxes"])
    assert found
    assert all(len(p.forward.graphs) == 1 for p in cuda_graph_parts(fast))


@cuda
@pytest.mark.parametrize("name", DETECTORS)
def test_an_optimised_predictor_serves_threads_at_once(name):
    """The graphs replay into buffers of their own: Predictor calls from several threads must
    still each get their own image's detections."""
    model = small(name)
    predictor = spinedet.Predictor(model, device="cuda", score_threshold=0.0)
    images = [image.cpu() for image in batch(8, 3, "cpu")[0]]
    alone = [predictor(image) for image in images for _ in range(2)]  # captured, replayed
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(predictor, images * 4))
    for got, ref in zip(together, alone[1::2] * 4, strict=True):  # replays, as in threads
        assert torch.equal(got.boxes, ref.boxes) and torch.equal(got.scores, ref.scores)
