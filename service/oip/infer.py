"""One Open Inference Protocol inference, whatever carried it: a decoded request is checked against
the model, run through the core (``Pipeline.infer``: the same places, batcher, deadline and metrics as
``/classify``) and answered as output tensors.

The front doors (``service/oip/http.py``, ``service/oip/grpc.py``) turn their wire format into an
:class:`InferenceRequest` and an :class:`InferenceResponse` back into theirs. Every failure is an
:class:`OipError` of one :class:`Kind`; :data:`STATUS` is the one table of what each kind is in HTTP and
in gRPC, and :func:`from_service_error` says which kind each of the core's errors is.

A request uses one input: ``image`` (BYTES, shape ``[n]`` or ``[n, 1]``, one encoded image per
element) or ``input`` (FP32, shape ``[n, 3, H, W]``), with at most as many images as the model's queue
holds (each takes a place in it). Its data comes as bytes in the binary layout (the HTTP binary
extension, gRPC's raw contents) or as values (JSON ``data``, gRPC's typed contents). In JSON an image
element is a string, which carries text, not bytes: there it is the image in base64. It asks for
``logits`` (the default), optionally with the classification extension (``classification`` = k,
1..classes) for the top k classes instead.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from service.core.pipeline import LOGITS, Pipeline
from service.core.repository import ModelStatus, ServedModel
from service.errors import (
    BodyReadTimeout,
    ModelUnavailable,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
    Unauthorized,
    UnknownModel,
    shown,
)
from service.oip import model as oip_model
from service.oip.tensors import (
    BYTES,
    ELEMENT_SIZE,
    FP32,
    TensorFormatError,
    classification_strings,
    deserialize_bytes,
    element_count,
)


class Kind(StrEnum):
    """What went wrong, in the protocol's terms."""

    INVALID = "invalid"  # the request is malformed or does not fit the model
    NOT_FOUND = "not_found"  # no such model or version
    UNAVAILABLE = "unavailable"  # the model is not loaded, failed, or the server is stopping
    OVERLOADED = "overloaded"  # every place in the model's line is taken (the admission rule)
    TIMEOUT = "timeout"  # the request's deadline passed before it ran
    TOO_LARGE = "too_large"  # the message is over MAX_BODY_BYTES
    UNAUTHENTICATED = "unauthenticated"  # AUTH_TOKEN is set and the request does not carry it
    SLOW_BODY = "slow_body"  # the body did not arrive within BODY_READ_TIMEOUT_S (HTTP only)
    NOT_ALLOWED = "not_allowed"  # a route asked with a method it does not answer (HTTP only)
    FORBIDDEN = "forbidden"  # a route that is switched off (the repository API without REPOSITORY_API)
    INTERNAL = "internal"  # a fault of the server (inference failed): never the client's input


@dataclass(frozen=True, slots=True)
class Status:
    http: int
    grpc: str  # the name of a grpc.StatusCode member


# The one table: each kind's HTTP status and gRPC status code.
STATUS: dict[Kind, Status] = {
    Kind.INVALID: Status(400, "INVALID_ARGUMENT"),
    Kind.NOT_FOUND: Status(404, "NOT_FOUND"),
    Kind.UNAVAILABLE: Status(503, "UNAVAILABLE"),
    Kind.OVERLOADED: Status(429, "RESOURCE_EXHAUSTED"),
    Kind.TIMEOUT: Status(504, "DEADLINE_EXCEEDED"),
    Kind.TOO_LARGE: Status(413, "RESOURCE_EXHAUSTED"),
    Kind.UNAUTHENTICATED: Status(401, "UNAUTHENTICATED"),
    Kind.SLOW_BODY: Status(408, "DEADLINE_EXCEEDED"),
    Kind.NOT_ALLOWED: Status(405, "UNIMPLEMENTED"),
    Kind.FORBIDDEN: Status(403, "PERMISSION_DENIED"),
    Kind.INTERNAL: Status(500, "INTERNAL"),
}


class OipError(Exception):
    """A failed request: its kind (and so its status in either protocol) and a message for the client.

    ``headers`` carry what an HTTP answer adds (``Retry-After`` for an overloaded model)."""

    def __init__(self, kind: Kind, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.headers = headers or {}

    @property
    def http_status(self) -> int:
        return STATUS[self.kind].http

    @property
    def grpc_code(self) -> str:
        return STATUS[self.kind].grpc


_KIND_OF_SERVICE_ERROR: dict[type[ServiceError], Kind] = {
    UnknownModel: Kind.NOT_FOUND,
    ModelUnavailable: Kind.UNAVAILABLE,
    Overloaded: Kind.OVERLOADED,
    RequestTimeout: Kind.TIMEOUT,
    PayloadTooLarge: Kind.TOO_LARGE,
    BodyReadTimeout: Kind.SLOW_BODY,
    Unauthorized: Kind.UNAUTHENTICATED,
}


def from_service_error(error: ServiceError) -> OipError:
    """The core's error in the protocol's terms: any other client error (an image that does not
    decode, is too large or of an unsupported type) is INVALID, any other server error INTERNAL."""
    kind = _KIND_OF_SERVICE_ERROR.get(type(error))
    if kind is None:
        kind = Kind.INTERNAL if error.status_code >= 500 else Kind.INVALID
    headers = {"Retry-After": error.headers["Retry-After"]} if "Retry-After" in error.headers else None
    return OipError(kind, error.message, headers)


# --- the request and the response, decoded from and encoded to either wire format --------------------
@dataclass(frozen=True, slots=True)
class InputTensor:
    """One input as sent: its data either as bytes in the binary layout or as values."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes | memoryview | None = None  # binary layout (HTTP binary extension, gRPC raw contents)
    values: Any = None  # JSON data (nested lists allowed) or gRPC typed contents


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    name: str
    classification: int = 0  # k > 0: the top k classes instead of the tensor
    binary: bool | None = None  # HTTP: whether it comes back as binary data (None: the request's default)


@dataclass(slots=True)
class InferenceRequest:
    model: str
    version: str | None
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] = field(default_factory=list)
    id: str | None = None
    # The client's own time limit (Triton's ``timeout`` parameter); None: the server's alone.
    timeout_s: float | None = None


@dataclass(frozen=True, slots=True)
class OutputTensor:
    """``data``: a float32 array of ``shape``, or (BYTES) the elements in order."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | list[bytes]
    binary: bool | None = None  # as requested (HTTP only)


@dataclass(frozen=True, slots=True)
class InferenceResponse:
    model_name: str
    model_version: str
    id: str | None
    outputs: list[OutputTensor]


# --- the entry the front doors call ------------------------------------------------------------------
def served_model(repository: Any, name: str, version: str | None) -> ServedModel:
    """The ready model ``name`` at ``version`` (None: its default one): NOT_FOUND or UNAVAILABLE
    otherwise."""
    number = _version_number(name, version)
    try:
        return repository.get(name, number)
    except ServiceError as exc:
        raise from_service_error(exc) from None


def configured_model(repository: Any, name: str, version: str | None) -> ServedModel:
    """The configured model ``name`` at ``version``, ready or not (for readiness and metadata):
    NOT_FOUND for another name or version."""
    model = repository.models.get(name)
    if model is None:
        available = ", ".join(repository.models) or "(none configured)"
        raise OipError(Kind.NOT_FOUND, f"unknown model {shown(name)}; available models: {available}")
    number = _version_number(name, version)
    if number is None:
        return model
    for entry in repository.versions(name):
        if entry.version == number:
            return entry
    raise _no_such_version(repository, name, version)


def ready_versions(repository: Any, name: str) -> list[int]:
    return [entry.version for entry in repository.versions(name) if entry.status is ModelStatus.READY]


def model_metadata(repository: Any, model: ServedModel) -> dict[str, Any]:
    """The model's metadata; UNAVAILABLE while its manifest is unread or unreadable (nothing true to
    say yet)."""
    if model.manifest is None:
        detail = f": {model.reason}" if model.reason else ""
        raise OipError(Kind.UNAVAILABLE, f"model {model.name} is {model.status.value}{detail}")
    return oip_model.model_metadata(model, ready_versions(repository, model.name))


def triton_config(repository: Any, served: ServedModel, *, request_timeout_s: float) -> dict[str, Any]:
    """Triton's configuration of a model being served."""
    versions = ready_versions(repository, served.name)
    return oip_model.model_config(served, versions=versions, request_timeout_s=request_timeout_s)


def _version_number(name: str, version: str | None) -> int | None:
    if version is None:
        return None
    if version.isascii() and version.isdigit() and int(version) >= 1 and str(int(version)) == version:
        return int(version)
    raise OipError(Kind.NOT_FOUND, f"model {shown(name)} has no version {shown(version)}")


def _no_such_version(repository: Any, name: str, version: str) -> OipError:
    held = ", ".join(str(entry.version) for entry in repository.versions(name)) or "none"
    return OipError(Kind.NOT_FOUND, f"model {shown(name)} has no version {shown(version)}; versions: {held}")


async def infer(
    served: ServedModel,
    request: InferenceRequest,
    pipeline: Pipeline,
    *,
    deadline: float,
    request_id: str | None = None,
) -> InferenceResponse:
    """Check ``request`` against the model, run it, and answer its outputs.

    The caller holds a place in the model's line (``served.batcher.admit()``), taken before it read
    the request's tensors where it can (HTTP: before the body), else use :func:`admit_and_infer`."""
    images = decode_inputs(served, request.inputs)
    output = requested_output(served, request.outputs)
    try:
        results = await pipeline.infer(
            served, images, top_k=output.classification or LOGITS, deadline=deadline, request_id=request_id
        )
    except ServiceError as exc:
        raise from_service_error(exc) from None
    count = len(results)
    if output.classification:
        strings = [s for result in results for s in classification_strings(result.output)]  # type: ignore[arg-type]
        tensor = OutputTensor(
            oip_model.LOGITS_OUTPUT, BYTES, (count, output.classification), strings, output.binary
        )
    else:
        logits = results[0].output[np.newaxis] if count == 1 else np.stack([r.output for r in results])
        tensor = OutputTensor(oip_model.LOGITS_OUTPUT, FP32, logits.shape, logits, output.binary)
    return InferenceResponse(served.name, str(served.version), request.id, [tensor])


async def admit_and_infer(
    served: ServedModel,
    request: InferenceRequest,
    pipeline: Pipeline,
    *,
    deadline: float,
    request_id: str | None = None,
) -> InferenceResponse:
    """:func:`infer` with a place in the model's line: OVERLOADED when every place is taken (the one
    admission rule, behind /classify's 429 too), UNAVAILABLE while the server stops."""
    assert served.batcher is not None
    try:
        with served.batcher.admit():
            return await infer(served, request, pipeline, deadline=deadline, request_id=request_id)
    except ServiceError as exc:
        raise from_service_error(exc) from None


def decode_inputs(served: ServedModel, inputs: Sequence[InputTensor]) -> list[bytes] | np.ndarray:
    """The request's images: encoded (from ``image``) or an (N, 3, H, W) float32 array (from ``input``)."""
    if len(inputs) != 1:
        raise OipError(
            Kind.INVALID,
            f"expected 1 input ({oip_model.IMAGE_INPUT!r} or {oip_model.TENSOR_INPUT!r}), got {len(inputs)}",
        )
    tensor = inputs[0]
    try:
        if tensor.name == oip_model.IMAGE_INPUT:
            return _images(served, tensor)
        if tensor.name == oip_model.TENSOR_INPUT:
            return _preprocessed(served, tensor)
    except TensorFormatError as exc:
        raise OipError(Kind.INVALID, str(exc)) from None
    raise OipError(
        Kind.INVALID,
        f"unexpected input {shown(tensor.name)} for model {served.name}: "
        f"send {oip_model.IMAGE_INPUT!r} (BYTES) or {oip_model.TENSOR_INPUT!r} (FP32)",
    )


def requested_output(served: ServedModel, outputs: Sequence[RequestedOutput]) -> RequestedOutput:
    """The one output there is, as asked for (all outputs by default)."""
    if not outputs:
        return RequestedOutput(oip_model.LOGITS_OUTPUT)
    if len(outputs) > 1:
        raise OipError(Kind.INVALID, f"model {served.name} has one output, {oip_model.LOGITS_OUTPUT!r}")
    output = outputs[0]
    if output.name != oip_model.LOGITS_OUTPUT:
        raise OipError(
            Kind.INVALID,
            f"unexpected output {shown(output.name)} for model {served.name}: "
            f"it has {oip_model.LOGITS_OUTPUT!r}",
        )
    k = output.classification
    classes = oip_model.classes(served)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= classes:
        raise OipError(Kind.INVALID, f"classification must be an integer from 1 to {classes}, got {shown(k)}")
    return output


def _batch(served: ServedModel, name: str, shape: tuple[int, ...]) -> int:
    """How many images a tensor of ``shape`` holds (its first dimension), within the model's places."""
    assert served.batcher is not None
    limit = served.batcher.max_queue_size
    if not shape or shape[0] < 1:
        raise TensorFormatError(f"input {name!r}: shape {list(shape)} holds no image")
    if shape[0] > limit:
        raise TensorFormatError(
            f"input {name!r}: {shape[0]} images in one request; the limit is {limit} (the model's queue size)"
        )
    return shape[0]


def _images(served: ServedModel, tensor: InputTensor) -> list[bytes]:
    name = oip_model.IMAGE_INPUT
    if tensor.datatype != BYTES:
        raise TensorFormatError(f"input {name!r} is BYTES, got {shown(tensor.datatype)}")
    shape = tensor.shape
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise TensorFormatError(f"input {name!r} has shape [-1] or [-1, 1], got {list(shape)}")
    count = _batch(served, name, shape)
    if tensor.raw is not None:
        return deserialize_bytes(tensor.raw, count, name=name)
    values = _flat(tensor.values, name)
    if len(values) != count:
        raise TensorFormatError(
            f"input {name!r}: shape {list(shape)} holds {count} elements, data has {len(values)}"
        )
    return [_image_bytes(value, i) for i, value in enumerate(values)]


def _image_bytes(value: object, index: int) -> bytes:
    if isinstance(value, bytes):  # gRPC's bytes_contents
        return value
    if isinstance(value, str):  # a JSON string: the image in base64
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise TensorFormatError(
                f"input 'image' element {index}: in JSON an image is its bytes in base64, "
                f"and this string is not base64"
            ) from None
    raise TensorFormatError(f"input 'image' element {index} must be a string, got {type(value).__name__}")


def _preprocessed(served: ServedModel, tensor: InputTensor) -> np.ndarray:
    name = oip_model.TENSOR_INPUT
    if tensor.datatype != FP32:
        raise TensorFormatError(f"input {name!r} is FP32, got {shown(tensor.datatype)}")
    size = oip_model.input_size(served)
    shape = tensor.shape
    if len(shape) != 4 or shape[1:] != (3, size, size):
        raise TensorFormatError(f"input {name!r} has shape [-1, 3, {size}, {size}], got {list(shape)}")
    count = _batch(served, name, shape)
    expected = element_count(shape)
    if tensor.raw is not None:
        itemsize = ELEMENT_SIZE[FP32]
        assert itemsize is not None
        if len(tensor.raw) != expected * itemsize:
            raise TensorFormatError(
                f"input {name!r}: shape {list(shape)} takes {expected * itemsize} bytes, "
                f"got {len(tensor.raw)}"
            )
        array = np.frombuffer(tensor.raw, dtype="<f4").astype(np.float32, copy=False)
    else:
        array = _numbers(tensor.values, name)
        if array.size != expected:
            raise TensorFormatError(
                f"input {name!r}: shape {list(shape)} holds {expected} elements, data has {array.size}"
            )
    if not np.isfinite(array).all():
        raise TensorFormatError(f"input {name!r}: every element must be a finite number")
    return array.reshape(count, 3, size, size)


def _flat(values: object, name: str) -> list:
    """JSON data as a flat list (the protocol allows nested lists in row-major order)."""
    if isinstance(values, (list, tuple)):
        if any(isinstance(v, (list, tuple)) for v in values):
            flat: list = []
            for value in values:
                flat.extend(_flat(value, name) if isinstance(value, (list, tuple)) else [value])
            return flat
        return list(values)
    if values is None:
        raise TensorFormatError(f"input {name!r} has no data (neither 'data' nor binary_data_size)")
    try:  # gRPC's repeated fields
        return list(values)  # type: ignore[call-overload]
    except TypeError:
        raise TensorFormatError(f"input {name!r}: data must be a list, got {type(values).__name__}") from None


def _numbers(values: object, name: str) -> np.ndarray:
    if values is None:
        raise TensorFormatError(f"input {name!r} has no data (neither 'data' nor binary_data_size)")
    try:
        array = np.asarray(values)
    except (ValueError, TypeError):
        raise TensorFormatError(f"input {name!r}: data must be a (nested) list of numbers") from None
    if array.dtype.kind not in "fiu":
        raise TensorFormatError(f"input {name!r} is FP32: data must be numbers")
    return array.astype(np.float32).reshape(-1)
