"""Tensors as the Open Inference Protocol carries them: datatypes, shapes, and the two extensions.

Nothing here knows a model or a transport. The pieces:

* the datatypes and their element sizes (``BYTES`` elements have none: each is length-prefixed);
* shapes: every dimension a non-negative integer (JSON ``true`` is not a dimension), and the element
  count they imply;
* the binary tensor data extension: an HTTP body whose first ``Inference-Header-Content-Length``
  bytes are the JSON request and whose rest holds the tensors named by their ``binary_data_size``
  parameter, one after another in the order of the inputs; a ``BYTES`` tensor's data is each element
  as a 4-byte little-endian length followed by its bytes (the same layout gRPC's
  ``raw_input_contents`` and ``raw_output_contents`` use);
* the classification extension: a model's top classes as ``BYTES`` strings ``"score:index:label"``.

Every malformed tensor raises :class:`TensorFormatError`, whose message says what is wrong and never
echoes more than a few dozen bytes of what the client sent.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

from service.errors import shown

BYTES = "BYTES"
FP32 = "FP32"

# datatype -> bytes per element; None for BYTES, whose elements are length-prefixed.
ELEMENT_SIZE: dict[str, int | None] = {
    "BOOL": 1,
    "UINT8": 1,
    "UINT16": 2,
    "UINT32": 4,
    "UINT64": 8,
    "INT8": 1,
    "INT16": 2,
    "INT32": 4,
    "INT64": 8,
    "FP16": 2,
    "BF16": 2,
    FP32: 4,
    "FP64": 8,
    BYTES: None,
}

# The length prefix of one BYTES element: an unsigned 32-bit little-endian integer.
_LENGTH = struct.Struct("<I")


class TensorFormatError(ValueError):
    """A tensor that does not follow the protocol: bad shape, datatype, size or encoding."""


def check_datatype(datatype: object) -> str:
    """``datatype`` if it names one of the protocol's datatypes."""
    if not isinstance(datatype, str) or datatype not in ELEMENT_SIZE:
        raise TensorFormatError(
            f"unknown datatype {shown(datatype)}; the protocol's are {', '.join(ELEMENT_SIZE)}"
        )
    return datatype


def check_shape(shape: object) -> tuple[int, ...]:
    """``shape`` as a tuple of non-negative integers (a JSON list of numbers, or a gRPC repeated int64)."""
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
        raise TensorFormatError(f"shape must be a list of integers, got {shown(shape)}")
    dims = []
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise TensorFormatError(f"shape {shown(list(shape))}: each dimension must be an integer >= 0")
        dims.append(dim)
    return tuple(dims)


def element_count(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def byte_size(datatype: str, shape: Sequence[int]) -> int | None:
    """The bytes a tensor of fixed-size elements takes (None for BYTES, whose size is in its data)."""
    size = ELEMENT_SIZE[datatype]
    return None if size is None else size * element_count(shape)


# --- the binary tensor data extension ---------------------------------------------------------------
def split_body(body: bytes, header_length: str | None) -> tuple[memoryview, memoryview]:
    """An HTTP request body -> (its JSON part, its binary part).

    ``header_length`` is the ``Inference-Header-Content-Length`` header; without it the whole body is
    JSON. It must be a decimal count of bytes no larger than the body.
    """
    whole = memoryview(body)
    if header_length is None:
        return whole, whole[len(whole) :]
    text = header_length.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 19:
        raise TensorFormatError(
            f"Inference-Header-Content-Length must be a number of bytes, got {shown(header_length)}"
        )
    length = int(text)
    if length > len(body):
        raise TensorFormatError(
            f"Inference-Header-Content-Length is {length} but the body has only {len(body)} bytes"
        )
    return whole[:length], whole[length:]


class BinarySections:
    """The binary part of a body, handed out in order to the tensors that name a ``binary_data_size``."""

    __slots__ = ("_data", "_offset")

    def __init__(self, data: memoryview) -> None:
        self._data = data
        self._offset = 0

    def take(self, name: str, size: object) -> memoryview:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise TensorFormatError(f"input {shown(name)}: binary_data_size must be an integer >= 0")
        end = self._offset + size
        if end > len(self._data):
            raise TensorFormatError(
                f"input {shown(name)}: binary_data_size {size} runs past the end of the body "
                f"({len(self._data) - self._offset} binary bytes left)"
            )
        section = self._data[self._offset : end]
        self._offset = end
        return section

    def check_consumed(self) -> None:
        left = len(self._data) - self._offset
        if left:
            raise TensorFormatError(f"{left} bytes of binary data follow the JSON but belong to no input")


def deserialize_bytes(data: memoryview | bytes, count: int, *, name: str) -> list[bytes]:
    """``count`` BYTES elements, each a 4-byte little-endian length and then that many bytes."""
    view = memoryview(data)
    total = len(view)
    elements: list[bytes] = []
    offset = 0
    while offset < total:
        if offset + 4 > total:
            raise TensorFormatError(f"input {shown(name)}: a BYTES length prefix is cut off at byte {offset}")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > total:
            raise TensorFormatError(
                f"input {shown(name)}: element {len(elements)} says {length} bytes but only "
                f"{total - offset} remain"
            )
        elements.append(bytes(view[offset : offset + length]))
        offset += length
        if len(elements) > count:
            break
    if len(elements) != count:
        raise TensorFormatError(
            f"input {shown(name)}: the shape holds {count} elements but the data "
            f"{'has more' if len(elements) > count else f'has {len(elements)}'}"
        )
    return elements


def serialize_bytes(elements: Iterable[bytes]) -> bytes:
    """BYTES elements in the binary layout (also gRPC's raw contents)."""
    parts = []
    for element in elements:
        parts.append(_LENGTH.pack(len(element)))
        parts.append(element)
    return b"".join(parts)


# --- the classification extension -------------------------------------------------------------------
def classification_strings(predictions: Iterable[dict]) -> list[bytes]:
    """Ranked predictions (``class_id``, ``label``, ``score``) as ``b"score:index:label"``, best first.

    The score is the class's probability, as ``/classify`` reports it, rather than the raw logit the
    model outputs: a logit's value means nothing to a client, and the two front doors then agree.
    """
    return [f"{p['score']!r}:{p['class_id']}:{p['label']}".encode() for p in predictions]
