"""Fuzzed weights files and TensorFlow checkpoints: every failure is the reader's own one-line
error naming the file, never an IndexError, struct.error, TypeError or other traceback."""

import json
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from spinedet.convert.tf_checkpoint import CheckpointError, TFCheckpoint
from spinedet.models.description import ModelDescription
from spinedet.models.weights import WeightsError, load_weights, read_metadata, save_weights

TF_FIXTURE = Path(__file__).parent / "fixtures" / "tf"
METADATA = {
    "model_name": "tiny",
    "num_classes": 3,
    "class_names": ["a", "b"],
    "categories": [{"id": 4, "name": "a"}, {"id": 9, "name": "b"}],
    "model_kwargs": {"activation": "relu", "width": 4},
}


def _mutate(rng: random.Random, data: bytes, start: int, stop: int) -> bytes:
    """One to three byte flips, random bytes, insertions, deletions or a truncation, at
    positions in ``[start, stop)``."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        pos = rng.randrange(start, max(start + 1, min(stop, len(data))))
        kind = rng.choice(["flip", "byte", "insert", "delete", "truncate"])
        if kind == "flip" and pos < len(data):
            data[pos] ^= 1 << rng.randrange(8)
        elif kind == "byte" and pos < len(data):
            data[pos] = rng.choice([0, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        elif kind == "insert":
            data[pos:pos] = rng.randbytes(rng.randint(1, 9))
        elif kind == "delete":
            del data[pos : pos + rng.randint(1, 16)]
        else:
            del data[pos:]
    return bytes(data)


def _expect(error_type, path, call) -> bool:
    """Run ``call``; True if it raised ``error_type`` with one line naming ``path``."""
    try:
        call()
    except error_type as e:
        message = str(e)
        assert str(path) in message and "\n" not in message, message
        return True
    return False  # a mutation the format tolerates (a changed value, an ignored byte)


# ----- safetensors weights -------------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.description = ModelDescription("spinenet", None, "backbone")


def test_fuzzed_safetensors_headers_raise_weights_error(tmp_path):
    model = Tiny()
    good = tmp_path / "good.safetensors"
    save_weights(model, good, METADATA)
    data = good.read_bytes()
    (header_size,) = struct.unpack("<Q", data[:8])
    meta_start = data.index(b'"spinedet"')
    rng = random.Random(0)
    path = tmp_path / "fuzzed.safetensors"
    failures = 0
    for i in range(300):
        region = [(0, 8), (8, 8 + header_size), (meta_start, 8 + header_size)][i % 3]
        path.write_bytes(_mutate(rng, data, *region))
        failures += _expect(WeightsError, path, lambda: read_metadata(path))
        failures += _expect(WeightsError, path, lambda: load_weights(Tiny(), path))
    assert failures > 300  # most mutants are refused, and each refusal was one line


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("model_name", 5), ("model_name", None), ("model_name", ["tiny"]),
        ("num_classes", "3"), ("num_classes", 3.5), ("num_classes", True), ("num_classes", 0),
        ("num_classes", [3]), ("model_kwargs", []), ("model_kwargs", "relu"),
        ("model_kwargs", None), ("class_names", "ab"), ("class_names", [1, 2]),
        ("class_names", {"a": 1}), ("class_names", ["a", None]), ("categories", [1, 2]),
        ("categories", [{"id": "4", "name": "a"}]), ("categories", [{"id": 4}]),
        ("categories", [{"id": True, "name": "a"}]), ("categories", {"id": 4, "name": "a"}),
    ],
)  # fmt: skip
def test_metadata_of_the_wrong_shape_is_refused_by_every_reader(tmp_path, key, value):
    path = tmp_path / "w.safetensors"
    tensors = {k: v.contiguous() for k, v in Tiny().state_dict().items()}
    save_file(tensors, path, metadata={"spinedet": json.dumps({**METADATA, key: value})})
    shown = json.dumps(value)
    with pytest.raises(WeightsError) as info:
        read_metadata(path)
    assert str(info.value).startswith(f"{path}: spinedet metadata {key} must be ")
    assert str(info.value).endswith(f", not {shown}")
    with pytest.raises(WeightsError, match=f"^{path}: spinedet metadata {key} must be"):
        load_weights(Tiny(), path)


@pytest.mark.parametrize("raw", ['{"model_name": ', "[1, 2]", "3", '"tiny"', "null"])
def test_metadata_that_is_not_a_json_object_is_refused(tmp_path, raw):
    path = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(2)}, path, metadata={"spinedet": raw})
    with pytest.raises(WeightsError, match=f"^{path}: spinedet metadata (is not|.*JSON)"):
        read_metadata(path)


# ----- TensorFlow checkpoints ----------------------------------------------------------------
@pytest.fixture
def checkpoint(tmp_path) -> tuple[TFCheckpoint, Path]:
    """The fixture checkpoint as read unharmed, and a copy of its files to mutate."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("checkpoint", "ckpt-1.index", "ckpt-1.data-00000-of-00001"):
        shutil.copyfile(TF_FIXTURE / name, folder / name)
    return TFCheckpoint(TF_FIXTURE), folder


def _read_changed(folder: Path, pristine: TFCheckpoint, cut: int | None = None) -> None:
    """Open the checkpoint, walk its object graph and read every tensor whose entry the
    mutation changed or whose bytes it may have cut (reading all would be slow)."""
    ckpt = TFCheckpoint(folder)
    for node in ckpt.nodes:
        for child in node.children.values():
            ckpt.node(child)
    for key, entry in ckpt.entries.items():
        if (
            pristine.entries.get(key) != entry
            or cut is not None
            and entry.offset + entry.size > cut
        ):
            ckpt.tensor(key)


def test_fuzzed_checkpoint_index_raises_checkpoint_error(checkpoint):
    pristine, folder = checkpoint
    index = folder / "ckpt-1.index"
    data, rng, failures = index.read_bytes(), random.Random(1), 0
    for i in range(200):
        region = (len(data) - 48, len(data)) if i % 3 == 0 else (0, len(data))  # footer too
        index.write_bytes(_mutate(rng, data, *region))
        failures += _expect(CheckpointError, folder, lambda: _read_changed(folder, pristine))
    assert failures > 100


def test_fuzzed_checkpoint_data_raises_checkpoint_error(checkpoint):
    pristine, folder = checkpoint
    graph = pristine.entries["_CHECKPOINTABLE_OBJECT_GRAPH"]
    shard = folder / "ckpt-1.data-00000-of-00001"
    original, rng, failures = shard.read_bytes(), random.Random(2), 0
    for i in range(90):
        if i % 3 == 0:  # a cut anywhere: every tensor beyond it must be refused
            cut = rng.randrange(len(original))
            shard.write_bytes(original[:cut])
        else:  # the object graph, in place (its offsets stay) or shifted
            cut = None
            region = (graph.offset, graph.offset + graph.size)
            shard.write_bytes(_mutate(rng, original[: graph.offset + graph.size], *region)
                              + original[graph.offset + graph.size :])  # fmt: skip
        failures += _expect(
            CheckpointError, folder, lambda c=cut: _read_changed(folder, pristine, c)
        )
    assert failures > 30
