"""What the load generator sends over the Open Inference Protocol, built in advance, and how it reads
the answers.

Both forms carry what a Triton client sends for an image classifier: the encoded image bytes as the
model's BYTES input ``image`` (shape ``[N]``, one image per element, decoded and preprocessed by the
server as ``/classify`` does), and a request for the output ``logits`` through the classification
extension (``classification: k``: a BYTES tensor ``[N, k]`` of ``"score:index:label"`` strings).

- HTTP (``POST /v2/models/{model}/infer``), with the binary tensor data extension: a JSON header of
  ``Inference-Header-Content-Length`` bytes, then the BYTES tensor as raw bytes (each element a 4-byte
  little-endian length and its bytes), its size given by the input's ``binary_data_size``; the output
  is asked for as binary data too (``binary_data: true``), as Triton's own clients do by default.
- gRPC (``inference.GRPCInferenceService/ModelInfer``): a serialized ``ModelInferRequest`` whose
  input data travels in ``raw_input_contents``, in the same element layout.

Each request's bytes (for HTTP the whole request, head and body; for gRPC the serialized message) are
built once per level, so sending one costs the generator a single write, as for ``/classify``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from urllib.parse import quote

from benchmarks.classify_requests import Image

INPUT = "image"
OUTPUT = "logits"
HEADER_LENGTH = "Inference-Header-Content-Length"
_LENGTH = struct.Struct("<I")


class AnswerError(ValueError):
    """An answer that is not a well-formed OIP classification."""


def bytes_tensor(elements: Sequence[bytes]) -> bytes:
    """A BYTES tensor in the binary layout: each element as its 4-byte little-endian length, then itself."""
    return b"".join(_LENGTH.pack(len(element)) + element for element in elements)


def bytes_elements(data: bytes | memoryview, count: int | None = None) -> list[bytes]:
    """The elements of a BYTES tensor in the binary layout; ``count``: how many there must be."""
    view = memoryview(data)
    elements = []
    at = 0
    while at < len(view):
        if at + 4 > len(view):
            raise AnswerError("a BYTES element's length prefix is cut short")
        (length,) = _LENGTH.unpack_from(view, at)
        at += 4
        if at + length > len(view):
            raise AnswerError("a BYTES element runs past its tensor")
        elements.append(bytes(view[at : at + length]))
        at += length
    if count is not None and len(elements) != count:
        raise AnswerError(f"expected {count} BYTES elements, found {len(elements)}")
    return elements


def _groups(images: Sequence[Image], per_request: int) -> list[list[Image]]:
    """One group per image, each of ``per_request`` images starting at it (as classify's multipart)."""
    return [[images[(i + j) % len(images)] for j in range(per_request)] for i in range(len(images))]


# ---------------------------------------------------------------------------------------------
# HTTP


def http_infer_path(model: str) -> str:
    return f"/v2/models/{quote(model, safe='')}/infer"


def build_http_requests(
    host: str, model: str, images: Sequence[Image], *, top_k: int = 5, images_per_request: int = 1
) -> list[bytes]:
    """The complete bytes of one binary-extension infer request per image (or group of images)."""
    path = http_infer_path(model)
    requests = []
    for group in _groups(images, images_per_request):
        tensor = bytes_tensor([image.data for image in group])
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": INPUT,
                        "shape": [len(group)],
                        "datatype": "BYTES",
                        "parameters": {"binary_data_size": len(tensor)},
                    }
                ],
                "outputs": [{"name": OUTPUT, "parameters": {"classification": top_k, "binary_data": True}}],
            },
            separators=(",", ":"),
        ).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\n"
            f"{HEADER_LENGTH}: {len(header)}\r\nContent-Length: {len(header) + len(tensor)}\r\n"
            "User-Agent: benchmarks.load\r\n\r\n"
        )
        requests.append(head.encode("latin-1") + header + tensor)
    return requests


def read_http_answer(body: bytes) -> list[list[str]]:
    """The ``"score:index:label"`` rows of an infer answer's classification output, JSON or binary.

    The answer's JSON header is found by parsing (the client keeps only the body, not the
    ``Inference-Header-Content-Length`` header); binary outputs follow it in the order of ``outputs``.
    """
    try:
        # latin-1 maps each byte to one character, so the end found is a byte offset too; the header
        # itself is then read as the UTF-8 it is.
        _, end = json.JSONDecoder().raw_decode(body.decode("latin-1"))
        header = json.loads(body[:end])
    except ValueError as exc:
        raise AnswerError(f"no JSON header: {exc}") from None
    binary = memoryview(body)[end:]
    at = 0
    for output in header.get("outputs", ()):
        size = (output.get("parameters") or {}).get("binary_data_size")
        if output.get("name") != OUTPUT:
            at += size or 0
            continue
        shape = output.get("shape")
        if output.get("datatype") != "BYTES" or not isinstance(shape, list) or len(shape) != 2:
            raise AnswerError(f"classification output of {output.get('datatype')} {shape}")
        rows, k = shape
        if size is not None:
            flat = [e.decode() for e in bytes_elements(binary[at : at + size], rows * k)]
        else:
            flat = [str(e) for e in _flatten(output.get("data"))]
            if len(flat) != rows * k:
                raise AnswerError(f"expected {rows * k} classification strings, found {len(flat)}")
        return [flat[r * k : (r + 1) * k] for r in range(rows)]
    raise AnswerError(f"no {OUTPUT!r} output in the answer")


def _flatten(data: object) -> list:
    if isinstance(data, list):
        return [item for part in data for item in _flatten(part)]
    return [data]


# ---------------------------------------------------------------------------------------------
# gRPC


def build_grpc_requests(
    model: str, images: Sequence[Image], *, top_k: int = 5, images_per_request: int = 1
) -> list[bytes]:
    """One serialized ``ModelInferRequest`` per image (or group of images)."""
    from tritonclient.grpc import service_pb2

    requests = []
    for group in _groups(images, images_per_request):
        request = service_pb2.ModelInferRequest(model_name=model)
        # The input's data goes to raw_input_contents (one entry per input, in the order of ``inputs``).
        request.inputs.add(name=INPUT, datatype="BYTES", shape=[len(group)])
        request.raw_input_contents.append(bytes_tensor([image.data for image in group]))
        output = request.outputs.add(name=OUTPUT)
        output.parameters["classification"].int64_param = top_k
        requests.append(request.SerializeToString())
    return requests


def read_grpc_answer(message: bytes) -> list[list[str]]:
    """The ``"score:index:label"`` rows of a serialized ``ModelInferResponse``."""
    from google.protobuf.message import DecodeError
    from tritonclient.grpc import service_pb2

    response = service_pb2.ModelInferResponse()
    try:
        response.ParseFromString(message)
    except DecodeError as exc:
        raise AnswerError(f"not a ModelInferResponse: {exc}") from None
    for i, output in enumerate(response.outputs):
        if output.name != OUTPUT:
            continue
        if output.datatype != "BYTES" or len(output.shape) != 2:
            raise AnswerError(f"classification output of {output.datatype} {list(output.shape)}")
        rows, k = output.shape
        if i < len(response.raw_output_contents):
            flat = [e.decode() for e in bytes_elements(response.raw_output_contents[i], rows * k)]
        else:
            flat = [e.decode() for e in output.contents.bytes_contents]
            if len(flat) != rows * k:
                raise AnswerError(f"expected {rows * k} classification strings, found {len(flat)}")
        return [flat[r * k : (r + 1) * k] for r in range(rows)]
    raise AnswerError(f"no {OUTPUT!r} output in the answer")


def parse_classification(entry: str) -> tuple[float, int, str]:
    """``"score:index:label"`` (the label may hold colons, or be absent) -> (score, index, label)."""
    score, index, *label = entry.split(":", 2)
    return float(score), int(index), label[0] if label else ""
