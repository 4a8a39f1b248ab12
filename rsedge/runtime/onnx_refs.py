"""The external-data files an ONNX graph names, read from its protobuf bytes without the onnx package.

The bundle loader must know every file a graph will make onnxruntime open before onnxruntime opens it: a graph
could name ``../`` or an absolute path, or a weight file the manifest does not hash. The runtime cannot import
onnx (a Jetson has only onnxruntime, and a test blocks it), and onnxruntime has no call that lists a model's
external data, so this walks the protobuf wire format along the few ONNX messages that can hold a tensor.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# For each ONNX message this walk enters: field number -> the message kind that field holds (onnx.proto).
# Every place a TensorProto can sit is covered: initializers, Constant-style attributes, sparse tensors,
# subgraphs of If/Loop/Scan, function bodies and training graphs. Other fields are skipped unread.
SCHEMA: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "function": {7: "node", 11: "attribute"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},  # TensorProto.external_data: StringStringEntryProto (key 1, value 2)
    "entry": {},
}


class OnnxFormatError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise OnnxFormatError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int):
    """(field number, wire type, payload start, payload end) of each field of one message."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, after = _varint(buf, pos, end)
        elif wire == 1:
            after = pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            after = pos + length
        elif wire == 5:
            after = pos + 4
        else:  # groups (3, 4) are not in ONNX; anything else is corrupt
            raise OnnxFormatError(f"unexpected wire type {wire}")
        if number == 0 or after > end:
            raise OnnxFormatError("field runs past the end of its message")
        yield number, wire, pos, after
        pos = after


def external_locations(data: bytes | memoryview | mmap.mmap) -> set[str]:
    """Every ``location`` an external-data entry of the serialized ModelProto names, as written."""
    buf = data if isinstance(data, memoryview) else memoryview(data)
    found: set[str] = set()
    stack = [("model", 0, len(buf))]  # explicit stack: nesting depth is the file's, not Python's recursion limit
    while stack:
        kind, start, end = stack.pop()
        if kind == "entry":
            entry = {n: bytes(buf[a:b]) for n, w, a, b in _fields(buf, start, end) if w == 2 and n in (1, 2)}
            if entry.get(1) == b"location":
                try:
                    found.add(entry.get(2, b"").decode("utf-8"))
                except UnicodeDecodeError:
                    raise OnnxFormatError("external data location is not UTF-8") from None
            continue
        children = SCHEMA[kind]
        for number, wire, a, b in _fields(buf, start, end):
            if number in children and wire == 2:
                stack.append((children[number], a, b))
    return found


@contextmanager
def mapped(path: Path) -> Iterator[memoryview]:
    """An ONNX file's bytes through a memory map (a graph may embed gigabytes of weights)."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            raise OnnxFormatError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                yield view
            finally:
                view.release()


def graph_external_locations(path: Path) -> set[str]:
    """external_locations of an ONNX file."""
    with mapped(path) as view:
        return external_locations(view)
