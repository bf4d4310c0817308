"""Read TensorFlow checkpoints (TF2 object-based and TF1 name-based) without TensorFlow.

A checkpoint ``ckpt-N`` is two files: ``ckpt-N.index``, an SSTable (LevelDB table format)
mapping each tensor key to a ``BundleEntryProto`` (dtype, shape, offset, size), and
``ckpt-N.data-00000-of-0000S`` holding the raw little-endian tensors. The key
``_CHECKPOINTABLE_OBJECT_GRAPH`` holds a ``TrackableObjectGraph`` protobuf: the tree of
objects (model, layers, variables) as the Keras model tracked them. Only the few protobuf
fields needed here are decoded, straight from the wire format.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SpinedetError

__all__ = [
    "CheckpointError",
    "TFCheckpoint",
    "TensorBundle",
    "TrackableNode",
    "open_checkpoint",
    "resolve_prefix",
]

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
VARIABLE_SUFFIX = ".ATTRIBUTES/VARIABLE_VALUE"
_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48
_BLOCK_TRAILER_SIZE = 5  # compression type byte + crc32c
# TensorFlow DataType enum -> numpy dtype (the ones model weights use).
_DTYPES = {
    1: np.float32,
    2: np.float64,
    3: np.int32,
    4: np.uint8,
    5: np.int16,
    6: np.int8,
    9: np.int64,
    10: np.bool_,
    17: np.uint16,
    19: np.float16,
}
_DT_STRING = 7


class CheckpointError(SpinedetError):
    """A file that is not a readable TensorFlow checkpoint."""


@contextlib.contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """Name ``path`` in every error raised while parsing it, and turn the low-level errors of
    a corrupt file that a check below missed into a one-line CheckpointError too."""
    try:
        yield
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (IndexError, KeyError, TypeError, ValueError, OverflowError, struct.error) as e:
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise CheckpointError(f"{path}: corrupt {what} ({reason})") from None


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise CheckpointError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _take(buf: bytes, pos: int, length: int) -> tuple[bytes, int]:
    """``length`` bytes at ``pos`` and the position after them; all must be there."""
    if pos + length > len(buf):
        raise CheckpointError(f"a field of {length} bytes runs past the end of its message")
    return buf[pos : pos + length], pos + length


def _fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """Decode one protobuf message into ``(field number, value)`` pairs, in wire order."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):
            raw, pos = _take(buf, pos, 8 if wire == 1 else 4)
            value = int.from_bytes(raw, "little")
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = _take(buf, pos, length)
        else:
            raise CheckpointError(f"unsupported protobuf wire type {wire}")
        out.append((number, value))
    return out


def _typed(fields: list[tuple[int, int | bytes]], kinds: dict[int, type]) -> dict[int, Any]:
    """The last value of each field number in ``kinds``, which must be of that kind (a varint
    is an int, a length-delimited field bytes); other fields are skipped."""
    values: dict[int, Any] = {}
    for number, value in fields:
        if number in kinds:
            if not isinstance(value, kinds[number]):
                raise CheckpointError(f"protobuf field {number} has the wrong wire type")
            values[number] = value
    return values


def _read_block(data: bytes, offset: int, size: int) -> list[tuple[bytes, bytes]]:
    """The ``(key, value)`` entries of one SSTable block (keys are prefix-compressed)."""
    if size < 4 or offset + size + _BLOCK_TRAILER_SIZE > len(data):
        raise CheckpointError(f"block at {offset} (+{size} bytes) lies outside the file")
    if data[offset + size] != 0:
        raise CheckpointError("compressed checkpoint index blocks are not supported")
    block = data[offset : offset + size]
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    end = len(block) - 4 - 4 * num_restarts
    if end < 0:
        raise CheckpointError(f"block at {offset} has more restart points than bytes")
    entries: list[tuple[bytes, bytes]] = []
    key = b""
    pos = 0
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_len, pos = _varint(block, pos)
        if shared > len(key) or pos + unshared + value_len > end:
            raise CheckpointError(f"entry at {offset + pos} of its block is malformed")
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        entries.append((key, block[pos : pos + value_len]))
        pos += value_len
    return entries


def _read_table(data: bytes) -> dict[str, bytes]:
    if len(data) < _FOOTER_SIZE:
        raise CheckpointError("index file too short")
    footer = data[-_FOOTER_SIZE:]
    if struct.unpack("<Q", footer[-8:])[0] != _TABLE_MAGIC:
        raise CheckpointError("not an SSTable (bad magic number)")
    _, pos = _varint(footer, 0)  # metaindex handle: unused
    _, pos = _varint(footer, pos)
    index_offset, pos = _varint(footer, pos)
    index_size, pos = _varint(footer, pos)
    table: dict[str, bytes] = {}
    for _, handle in _read_block(data, index_offset, index_size):
        offset, pos = _varint(handle, 0)
        size, _ = _varint(handle, pos)
        for key, value in _read_block(data, offset, size):
            try:
                table[key.decode()] = value
            except UnicodeDecodeError:
                raise CheckpointError(f"tensor key {key[:40]!r} is not UTF-8") from None
    return table


@dataclass(frozen=True)
class _Entry:
    dtype: int
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int


def _parse_entry(buf: bytes) -> _Entry:
    fields = _fields(buf)
    if any(number == 7 for number, _ in fields):
        raise CheckpointError("partitioned (sliced) variables are not supported")
    values = _typed(fields, {1: int, 2: bytes, 3: int, 4: int, 5: int})
    shape: list[int] = []
    for number, dim in _fields(values.get(2, b"")):
        if number == 2:  # TensorShapeProto.dim: Dim.size is field 1
            if not isinstance(dim, bytes):
                raise CheckpointError("tensor shape has the wrong wire type")
            shape.append(_typed(_fields(dim), {1: int}).get(1, 0))
    return _Entry(values.get(1, 0), tuple(shape), values.get(3, 0), values.get(4, 0),
                  values.get(5, 0))  # fmt: skip


@dataclass
class TrackableNode:
    """One object of the checkpoint's object graph.

    ``children`` maps attribute names (``layer_with_weights-3``, ``_conv1``, ``kernel``) to node
    ids in the order they were tracked; ``tensor`` is the checkpoint key of a variable's value.
    """

    id: int
    children: dict[str, int] = field(default_factory=dict)
    tensor: str | None = None


def _parse_object_graph(buf: bytes) -> list[TrackableNode]:
    nodes = []
    for i, (_, raw) in enumerate(f for f in _fields(buf) if f[0] == 1):
        if not isinstance(raw, bytes):
            raise CheckpointError("object graph node has the wrong wire type")
        node = TrackableNode(i)
        for n, value in _fields(raw):
            if n in (1, 2) and not isinstance(value, bytes):
                raise CheckpointError(f"object graph node {i} has the wrong wire type")
            if n == 1:
                ref = _typed(_fields(value), {1: int, 2: bytes})
                node.children[ref.get(2, b"").decode()] = ref.get(1, 0)
            elif n == 2:
                attribute = _typed(_fields(value), {1: bytes, 3: bytes})
                if attribute.get(1) == b"VARIABLE_VALUE":
                    node.tensor = attribute.get(3, b"").decode()
        nodes.append(node)
    if not nodes:
        raise CheckpointError("the object graph is empty")
    for node in nodes:
        dangling = [name for name, child in node.children.items() if child >= len(nodes)]
        if dangling:
            raise CheckpointError(f"object graph node {node.id} refers to missing nodes")
    return nodes


def resolve_prefix(path: str | Path) -> Path:
    """The ``ckpt-N`` prefix of a checkpoint given as that prefix, one of its files, or its
    directory (then the newest checkpoint named by the ``checkpoint`` file, or the only one)."""
    path = Path(path)
    if path.is_dir():
        state = path / "checkpoint"
        if state.is_file():
            for line in state.read_text().splitlines():
                if line.startswith("model_checkpoint_path:"):
                    name = line.split(":", 1)[1].strip().strip('"')
                    return resolve_prefix(path / name)
        indexes = sorted(path.glob("*.index"))
        if len(indexes) != 1:
            found = ", ".join(p.name for p in indexes) or "none"
            raise CheckpointError(
                f"{path}: expected one checkpoint (*.index) in the directory, found {found}"
            )
        return indexes[0].with_suffix("")
    for suffix in (".index", ".data-"):
        if suffix in path.name:
            path = path.with_name(path.name.split(suffix)[0])
    if not path.with_name(path.name + ".index").is_file():
        raise CheckpointError(f"{path}: no TensorFlow checkpoint here ({path.name}.index missing)")
    return path


class TensorBundle:
    """The tensors of a TensorFlow checkpoint by key, read with numpy only. A TF1 name-based
    checkpoint (``tf.compat.v1.train.Saver``, tensorflow/tpu) keys them by variable name,
    e.g. ``spinenet/conv2d/kernel``.
    """

    def __init__(self, path: str | Path) -> None:
        self.prefix = resolve_prefix(path)
        index_path = self.prefix.with_name(self.prefix.name + ".index")
        with _reading(index_path, "index"):
            table = _read_table(index_path.read_bytes())
            header = _typed(_fields(table.pop("", b"")), {1: int, 2: int})
            if header.get(2, 0) != 0:
                raise CheckpointError("big-endian checkpoints are not supported")
            self.num_shards = header.get(1, 1)
            self.entries = {key: _parse_entry(value) for key, value in table.items()}
            bad = [key for key, e in self.entries.items() if e.shard >= self.num_shards]
            if bad:
                raise CheckpointError(f"{bad[0]} lies in shard {self.entries[bad[0]].shard} of "
                                      f"{self.num_shards}")  # fmt: skip

    @property
    def object_based(self) -> bool:
        """Whether the checkpoint is a TF2 object-based one (it holds an object graph)."""
        return OBJECT_GRAPH_KEY in self.entries

    def _shard(self, entry: _Entry) -> Path:
        return self.prefix.with_name(
            f"{self.prefix.name}.data-{entry.shard:05d}-of-{self.num_shards:05d}"
        )

    def _raw(self, entry: _Entry) -> bytes:
        """The bytes of one entry, from its data file; errors name no file (callers do)."""
        try:
            with open(self._shard(entry), "rb") as f:
                available = os.fstat(f.fileno()).st_size
                if entry.offset + entry.size > available:
                    raise CheckpointError(
                        f"truncated data file: {entry.size} bytes at {entry.offset} wanted, "
                        f"the file has {available}"
                    )
                f.seek(entry.offset)
                return f.read(entry.size)
        except OSError as e:
            raise CheckpointError(f"cannot read ({e.strerror or e})") from None

    def _entry(self, key: str) -> _Entry:
        if key not in self.entries:
            raise CheckpointError(f"{self.prefix}: no tensor {key!r} in the checkpoint")
        return self.entries[key]

    def _string(self, key: str) -> bytes:
        entry = self._entry(key)
        if entry.dtype != _DT_STRING or entry.shape:
            raise CheckpointError(f"{key}: expected a scalar string tensor")
        raw = self._raw(entry)
        length, pos = _varint(raw, 0)
        return _take(raw, pos + 4, length)[0]  # 4 bytes: the crc32c of the length

    def tensor(self, key: str) -> np.ndarray:
        """The value stored under a checkpoint key."""
        entry = self._entry(key)
        with _reading(self._shard(entry), f"tensor {key}"):
            if entry.dtype not in _DTYPES:
                raise CheckpointError(f"{key}: unsupported dtype (TF DataType {entry.dtype})")
            dtype = np.dtype(_DTYPES[entry.dtype]).newbyteorder("<")
            if entry.size != math.prod(entry.shape) * dtype.itemsize:
                raise CheckpointError(
                    f"{key}: {entry.size} bytes do not hold a {dtype.name} tensor of shape "
                    f"{list(entry.shape)}"
                )
            return np.frombuffer(self._raw(entry), dtype=dtype).reshape(entry.shape)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key).shape


class TFCheckpoint(TensorBundle):
    """A TensorFlow 2 object-based checkpoint read with numpy only.

    Example:
        >>> ckpt = TFCheckpoint("model_dir")  # or "model_dir/ckpt-42"
        >>> ckpt.tensor(ckpt.child(ckpt.root, "model", "backbone").tensor)
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        if not self.object_based:
            raise CheckpointError(
                f"{self.prefix}: no object graph, so not a TF2 object-based checkpoint "
                "(read TF1 name-based ones with open_checkpoint)"
            )
        entry = self.entries[OBJECT_GRAPH_KEY]
        with _reading(self._shard(entry), "object graph"):
            self.nodes = _parse_object_graph(self._string(OBJECT_GRAPH_KEY))
        self.root = self.nodes[0]

    def node(self, node_id: int) -> TrackableNode:
        return self.nodes[node_id]

    def child(self, node: TrackableNode, *names: str) -> TrackableNode | None:
        """Follow attribute names from ``node``; None when one is missing."""
        for name in names:
            if name not in node.children:
                return None
            node = self.nodes[node.children[name]]
        return node


def open_checkpoint(path: str | Path) -> TFCheckpoint | TensorBundle:
    """A TF2 object-based checkpoint (Model Garden) as a :class:`TFCheckpoint`, a TF1
    name-based one (tensorflow/tpu) as a :class:`TensorBundle`."""
    bundle = TensorBundle(path)
    return TFCheckpoint(path) if bundle.object_based else bundle
