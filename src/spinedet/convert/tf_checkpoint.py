"""Read TensorFlow checkpoints (TF2 object-based and TF1 name-based) without TensorFlow.

A checkpoint ``ckpt-N`` is two files: ``ckpt-N.index``, an SSTable (LevelDB table format)
mapping each tensor key to a ``BundleEntryProto`` (dtype, shape, offset, size), and
``ckpt-N.data-00000-of-0000S`` holding the raw little-endian tensors. The key
``_CHECKPOINTABLE_OBJECT_GRAPH`` holds a ``TrackableObjectGraph`` protobuf: the tree of
objects (model, layers, variables) as the Keras model tracked them. Only the few protobuf
fields needed here are decoded, straight from the wire format.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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


class CheckpointError(ValueError):
    """A file that is not a readable TensorFlow checkpoint."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise CheckpointError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """Decode one protobuf message into ``(field number, value)`` pairs, in wire order."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        else:
            raise CheckpointError(f"unsupported protobuf wire type {wire}")
        out.append((number, value))
    return out


def _read_block(data: bytes, offset: int, size: int) -> list[tuple[bytes, bytes]]:
    """The ``(key, value)`` entries of one SSTable block (keys are prefix-compressed)."""
    if data[offset + size] != 0:
        raise CheckpointError("compressed checkpoint index blocks are not supported")
    block = data[offset : offset + size]
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    end = len(block) - 4 - 4 * num_restarts
    entries: list[tuple[bytes, bytes]] = []
    key = b""
    pos = 0
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_len, pos = _varint(block, pos)
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
            table[key.decode()] = value
    return table


@dataclass(frozen=True)
class _Entry:
    dtype: int
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int


def _parse_entry(buf: bytes) -> _Entry:
    dtype = shard = offset = size = 0
    shape: list[int] = []
    for number, value in _fields(buf):
        if number == 1:
            dtype = value
        elif number == 2:
            shape = [
                next((v for n, v in _fields(dim) if n == 1), 0)
                for n, dim in _fields(value)
                if n == 2
            ]
        elif number == 3:
            shard = value
        elif number == 4:
            offset = value
        elif number == 5:
            size = value
        elif number == 7:
            raise CheckpointError("partitioned (sliced) variables are not supported")
    return _Entry(dtype, tuple(shape), shard, offset, size)


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
    for i, (number, raw) in enumerate(f for f in _fields(buf) if f[0] == 1):
        del number
        node = TrackableNode(i)
        for n, value in _fields(raw):
            if n == 1:
                ref = dict(_fields(value))
                node.children[ref.get(2, b"").decode()] = ref.get(1, 0)
            elif n == 2:
                attribute = {k: v for k, v in _fields(value)}
                if attribute.get(1) == b"VARIABLE_VALUE":
                    node.tensor = attribute[3].decode()
        nodes.append(node)
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
        index = self.prefix.with_name(self.prefix.name + ".index").read_bytes()
        table = _read_table(index)
        header = dict(_fields(table.pop("", b"")))
        if header.get(2, 0) != 0:
            raise CheckpointError(f"{self.prefix}: big-endian checkpoints are not supported")
        self.num_shards = header.get(1, 1)
        self.entries = {key: _parse_entry(value) for key, value in table.items()}

    @property
    def object_based(self) -> bool:
        """Whether the checkpoint is a TF2 object-based one (it holds an object graph)."""
        return OBJECT_GRAPH_KEY in self.entries

    def _raw(self, entry: _Entry) -> bytes:
        shard = f"{self.prefix.name}.data-{entry.shard:05d}-of-{self.num_shards:05d}"
        with open(self.prefix.with_name(shard), "rb") as f:
            f.seek(entry.offset)
            raw = f.read(entry.size)
        if len(raw) != entry.size:
            raise CheckpointError(f"{shard}: truncated data file")
        return raw

    def _string(self, key: str) -> bytes:
        entry = self.entries[key]
        if entry.dtype != _DT_STRING or entry.shape:
            raise CheckpointError(f"{key}: expected a scalar string tensor")
        raw = self._raw(entry)
        length, pos = _varint(raw, 0)
        pos += 4  # crc32c of the length
        return raw[pos : pos + length]

    def tensor(self, key: str) -> np.ndarray:
        """The value stored under a checkpoint key."""
        entry = self.entries[key]
        if entry.dtype not in _DTYPES:
            raise CheckpointError(f"{key}: unsupported tensor dtype (TF DataType {entry.dtype})")
        array = np.frombuffer(
            self._raw(entry), dtype=np.dtype(_DTYPES[entry.dtype]).newbyteorder("<")
        )
        return array.reshape(entry.shape)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key].shape


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
