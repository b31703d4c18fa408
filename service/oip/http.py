"""The Open Inference Protocol over HTTP: every route under ``/v2``, answered straight from the ASGI
stack as ``/classify`` is (past FastAPI's router and its per-request machinery).

| route | answer |
|---|---|
| ``GET /v2`` | server metadata: name, version, extensions |
| ``GET /v2/health/live``, ``/v2/health/ready`` | 200, or 400 when not ready (empty, as the protocol says) |
| ``GET /v2/models/{m}[/versions/{v}]`` | model metadata |
| ``GET /v2/models/{m}[/versions/{v}]/ready`` | 200 when the model is ready, else 400 |
| ``GET /v2/models/{m}[/versions/{v}]/config`` | Triton's model configuration |
| ``POST /v2/models/{m}[/versions/{v}]/infer`` | inference: JSON, or JSON then binary tensor data |
| ``POST /v2/repository/index`` | the models and versions, and their state (``{"ready": true}``: ready) |
| ``POST /v2/repository/models/{m}/load``, ``.../unload`` | load or reload a model, unload it |

An inference takes a place in its model's line before its body is read (429 at the door, as for
``/classify``), reads the body once under ``MAX_BODY_BYTES`` and ``BODY_READ_TIMEOUT_S``, and is
answered by ``service/oip/infer.py`` within ``REQUEST_TIMEOUT_S``, or the client's ``timeout``
parameter (microseconds, as Triton's clients send it) when that is shorter. Errors are the protocol's
``{"error": "<message>"}``, rendered by :func:`error_response` only, with the status of
:data:`service.oip.infer.STATUS`. Inference requests are counted in the ``classifier_*`` series under
their model, and as ``oip-http`` by protocol.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service.config import Settings
from service.core.metrics import OIP_HTTP, Metrics
from service.core.repository import ModelRepository, ModelStatus
from service.errors import BodyReadTimeout, ClientDisconnected, PayloadTooLarge, ServiceError, shown
from service.http.uploads import cancel_on_disconnect, read_body
from service.oip import model as oip_model
from service.oip import repository_api
from service.oip.infer import (
    InferenceRequest,
    InferenceResponse,
    InputTensor,
    Kind,
    OipError,
    RequestedOutput,
    configured_model,
    from_service_error,
    infer,
    model_metadata,
    served_model,
    triton_config,
)
from service.oip.tensors import (
    BinarySections,
    TensorFormatError,
    byte_size,
    check_datatype,
    check_shape,
    serialize_bytes,
    split_body,
)

PREFIX = "/v2"
HEADER_LENGTH = b"inference-header-content-length"
_JSON = b"application/json"
_BINARY = b"application/octet-stream"


class OipRoutes:
    """Answers every path under ``/v2``; anything else goes on to ``app``."""

    def __init__(
        self, app: ASGIApp, *, settings: Settings, metrics: Metrics, repository: ModelRepository
    ) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.repository = repository

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"] if scope["type"] == "http" else ""
        if not path.startswith(PREFIX) or (len(path) > len(PREFIX) and path[len(PREFIX)] != "/"):
            await self.app(scope, receive, send)
            return
        segments = path[len(PREFIX) + 1 :].split("/") if len(path) > len(PREFIX) else []
        if len(segments) >= 3 and segments[0] == "models" and segments[-1] == "infer":
            await self._infer(scope, receive, send, segments)
            return
        if segments and segments[0] == "repository":
            await self._repository_call(scope, receive, send, segments)
            return
        try:
            status, body = self._read_only(scope["method"], path, segments)
        except OipError as exc:
            await _send(send, *error_response(exc))
            return
        await _send(send, status, [(b"content-type", _JSON)] if body else [], body)

    # --- metadata and health ----------------------------------------------------------------------
    def _read_only(self, method: str, path: str, segments: list[str]) -> tuple[int, bytes]:
        """Every GET route: (status, body)."""
        repository = self.repository
        if not segments:
            _only_get(method, path)
            return 200, _json(oip_model.server_metadata())
        if segments == ["health", "live"]:
            _only_get(method, path)
            return 200, b""
        if segments == ["health", "ready"]:
            _only_get(method, path)
            return (200 if repository.ready else 400), b""
        if segments[0] == "models" and len(segments) >= 2:
            name, rest, version = _model_path(segments)
            if rest in ([], ["ready"], ["config"]):
                _only_get(method, path)
                model = configured_model(repository, name, version)
                if rest == ["ready"]:
                    return (200 if model.status is ModelStatus.READY else 400), b""
                if rest == ["config"]:
                    served = served_model(repository, name, version)
                    timeout_s = self.settings.request_timeout_s
                    config = triton_config(repository, served, request_timeout_s=timeout_s)
                    return 200, _json(config)
                return 200, _json(model_metadata(repository, model))
        raise OipError(Kind.NOT_FOUND, f"no route {method} {shown(path)}")

    # --- the model repository extension ---------------------------------------------------------------
    async def _repository_call(self, scope: Scope, receive: Receive, send: Send, segments: list[str]) -> None:
        try:
            if scope["method"] != "POST":
                raise _method_not_allowed(scope["method"], scope["path"], "POST")
            repository_api.check_enabled(self.settings)
            index = segments == ["repository", "index"]
            action = segments[3] if len(segments) == 4 and segments[1] == "models" else None
            if not index and action not in ("load", "unload"):
                raise OipError(Kind.NOT_FOUND, f"no route POST {shown(scope['path'])}")
            declared = next((value for key, value in scope["headers"] if key == b"content-length"), None)
            body = await _read_body(
                receive, declared, self.settings.max_body_bytes, self.settings.body_read_timeout_s
            )
            document = _json_object(body)
            if index:
                ready_only = document.get("ready", False)
                if not isinstance(ready_only, bool):
                    raise OipError(Kind.INVALID, "'ready' must be true or false")
                entries = repository_api.index(self.repository, self.settings, ready_only=ready_only)
                await _send(send, 200, [(b"content-type", _JSON)], _json(entries))
                return
            repository_api.check_parameters(document)
            if action == "load":
                await repository_api.load(self.repository, segments[2])
            else:
                await repository_api.unload(self.repository, segments[2])
        except OipError as exc:
            await _send(send, *error_response(exc))
            return
        await _send(send, 200, [], b"")

    # --- inference ------------------------------------------------------------------------------------
    async def _infer(self, scope: Scope, receive: Receive, send: Send, segments: list[str]) -> None:
        started = time.monotonic()
        name, rest, version = _model_path(segments)
        status = 500
        try:
            if rest != ["infer"]:
                raise OipError(Kind.NOT_FOUND, f"no route {scope['method']} {shown(scope['path'])}")
            if scope["method"] != "POST":
                raise _method_not_allowed(scope["method"], scope["path"], "POST")
            status, headers, body = await self._answer(scope, receive, name, version, started)
        except OipError as exc:
            status, headers, body = error_response(exc)
        except ClientDisconnected:
            status = ClientDisconnected.status_code  # nobody to answer: counted, never sent
            return
        finally:
            self.metrics.observe_request(name, status, time.monotonic() - started, OIP_HTTP)
        await _send(send, status, headers, body)

    async def _answer(
        self, scope: Scope, receive: Receive, name: str, version: str | None, started: float
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        settings = self.settings
        served = served_model(self.repository, name, version)
        assert served.batcher is not None
        header_length = None
        declared = None
        for key, value in scope["headers"]:
            if key == HEADER_LENGTH:
                header_length = value.decode("latin-1")
            elif key == b"content-length":
                declared = value
        body_read = False
        try:
            # A place in the model's line before anything is read: 429 at the door.
            with served.batcher.admit():
                body = await _read_body(
                    receive, declared, settings.max_body_bytes, settings.body_read_timeout_s
                )
                body_read = True
                request, binary_output = decode_request(body, header_length, served.name, version)
                timeout_s = settings.request_timeout_s
                if request.timeout_s is not None:  # the client's limit, within the server's
                    timeout_s = min(timeout_s, request.timeout_s)
                work = infer(
                    served,
                    request,
                    scope["app"].state.pipeline,
                    deadline=started + timeout_s,
                    request_id=scope["state"].get("request_id"),
                )
                response = await cancel_on_disconnect(Request(scope, receive), work)
        except ServiceError as exc:
            if isinstance(exc, ClientDisconnected):
                raise
            error = from_service_error(exc)
            if not body_read:
                error.headers["Connection"] = "close"
            raise error from None
        except OipError as exc:
            if not body_read:
                # The rest of the body stays unread: only a fresh connection can carry the next request.
                exc.headers["Connection"] = "close"
            raise
        header, binary = encode_response(response, binary_output)
        if not binary:
            return 200, [(b"content-type", _JSON)], header
        return (
            200,
            [(b"content-type", _BINARY), (HEADER_LENGTH, str(len(header)).encode())],
            b"".join((header, *binary)),
        )


# --- the wire format ---------------------------------------------------------------------------------
def decode_request(
    body: bytes, header_length: str | None, model: str, version: str | None
) -> tuple[InferenceRequest, bool]:
    """An inference request body (JSON, or JSON then binary tensor data) -> the request, and whether
    its outputs default to binary (``binary_data_output``)."""
    try:
        header, binary = split_body(body, header_length)
        document = json.loads(body if header_length is None else bytes(header))
    except TensorFormatError as exc:
        raise OipError(Kind.INVALID, str(exc)) from None
    except ValueError as exc:  # not UTF-8, or not JSON
        raise OipError(Kind.INVALID, f"the request is not JSON: {str(exc)[:120]}") from None
    if not isinstance(document, dict):
        raise OipError(Kind.INVALID, "the request must be a JSON object")
    try:
        inputs = document.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise TensorFormatError("'inputs' must be a non-empty list")
        sections = BinarySections(binary)
        decoded_inputs = [_input(entry, sections) for entry in inputs]
        sections.check_consumed()
        outputs = document.get("outputs", [])
        if not isinstance(outputs, list):
            raise TensorFormatError("'outputs' must be a list")
        decoded_outputs = [_output(entry) for entry in outputs]
        names = [output.name for output in decoded_outputs]
        if len(set(names)) != len(names):
            raise TensorFormatError("an output is requested more than once")
        parameters = _parameters(document, "the request")
        binary_output = parameters.get("binary_data_output", False)
        if not isinstance(binary_output, bool):
            raise TensorFormatError("binary_data_output must be true or false")
        request_id = document.get("id")
        if request_id is not None and not isinstance(request_id, str):
            raise TensorFormatError("'id' must be a string")
        # Triton's request timeout, in microseconds (0: none), as its clients send it.
        timeout_us = parameters.get("timeout", 0)
        if isinstance(timeout_us, bool) or not isinstance(timeout_us, int) or timeout_us < 0:
            raise TensorFormatError("timeout must be a number of microseconds >= 0")
    except TensorFormatError as exc:
        raise OipError(Kind.INVALID, str(exc)) from None
    request = InferenceRequest(
        model, version, decoded_inputs, decoded_outputs, request_id, timeout_us / 1e6 if timeout_us else None
    )
    return request, binary_output


def _input(entry: object, sections: BinarySections) -> InputTensor:
    if not isinstance(entry, dict):
        raise TensorFormatError("each input must be a JSON object")
    name = entry.get("name")
    if not isinstance(name, str):
        raise TensorFormatError(f"an input's name must be a string, got {shown(name)}")
    datatype = check_datatype(entry.get("datatype"))
    shape = check_shape(entry.get("shape"))
    size = _parameters(entry, f"input {shown(name)}").get("binary_data_size")
    if size is None:
        if "data" not in entry:
            raise TensorFormatError(f"input {shown(name)} has neither 'data' nor a binary_data_size")
        return InputTensor(name, datatype, shape, values=entry["data"])
    if "data" in entry:
        raise TensorFormatError(f"input {shown(name)} has both 'data' and a binary_data_size")
    raw = sections.take(name, size)
    expected = byte_size(datatype, shape)
    if expected is not None and expected != len(raw):
        raise TensorFormatError(
            f"input {shown(name)}: {datatype} of shape {list(shape)} takes {expected} bytes, "
            f"binary_data_size says {len(raw)}"
        )
    return InputTensor(name, datatype, shape, raw=raw)


def _output(entry: object) -> RequestedOutput:
    if not isinstance(entry, dict):
        raise TensorFormatError("each requested output must be a JSON object")
    name = entry.get("name")
    if not isinstance(name, str):
        raise TensorFormatError(f"an output's name must be a string, got {shown(name)}")
    parameters = _parameters(entry, f"output {shown(name)}")
    classification = parameters.get("classification", 0)
    binary = parameters.get("binary_data")
    if binary is not None and not isinstance(binary, bool):
        raise TensorFormatError(f"output {shown(name)}: binary_data must be true or false")
    return RequestedOutput(name, classification, binary)


def _parameters(entry: dict, where: str) -> dict[str, Any]:
    parameters = entry.get("parameters", {})
    if not isinstance(parameters, dict):
        raise TensorFormatError(f"{where}: 'parameters' must be a JSON object")
    return parameters


def encode_response(response: InferenceResponse, binary_default: bool) -> tuple[bytes, list[bytes]]:
    """The response's JSON, and the binary data that follows it (empty when every output is in JSON)."""
    outputs = []
    binary: list[bytes] = []
    for tensor in response.outputs:
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        data = tensor.data
        if tensor.binary if tensor.binary is not None else binary_default:
            raw = data.tobytes() if isinstance(data, np.ndarray) else serialize_bytes(data)
            entry["parameters"] = {"binary_data_size": len(raw)}
            binary.append(raw)
        elif isinstance(data, np.ndarray):
            entry["data"] = data.ravel().tolist()
        else:
            entry["data"] = [element.decode("utf-8", "replace") for element in data]
        outputs.append(entry)
    document: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id is not None:
        document["id"] = response.id
    document["outputs"] = outputs
    return _json(document), binary


def error_response(error: OipError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The one renderer of the protocol's errors: (status, headers, ``{"error": "<message>"}``)."""
    headers = [(b"content-type", _JSON)]
    headers += [
        (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in error.headers.items()
    ]
    return error.http_status, headers, _json({"error": error.message})


# --- helpers -----------------------------------------------------------------------------------------
def _model_path(segments: list[str]) -> tuple[str, list[str], str | None]:
    """``models/{m}[/versions/{v}]/rest...`` -> (m, rest, v)."""
    name, rest = segments[1], segments[2:]
    if len(rest) >= 2 and rest[0] == "versions":
        return name, rest[2:], rest[1]
    return name, rest, None


def _only_get(method: str, path: str) -> None:
    if method != "GET":
        raise _method_not_allowed(method, path, "GET")


def _method_not_allowed(method: str, path: str, allowed: str) -> OipError:
    return OipError(
        Kind.NOT_ALLOWED, f"{shown(path)} answers {allowed}, not {shown(method)}", {"Allow": allowed}
    )


async def _read_body(receive: Receive, declared: bytes | None, limit: int, timeout_s: float) -> bytes:
    """The whole body, read as /classify reads one (the same cap and deadline), errors in OIP's terms."""
    try:
        return await read_body(
            receive, None if declared is None else declared.decode("latin-1"), limit, timeout_s
        )
    except (PayloadTooLarge, BodyReadTimeout) as exc:
        raise from_service_error(exc) from None


def _json_object(body: bytes) -> dict[str, Any]:
    """An optional JSON object body (empty: ``{}``)."""
    if not body.strip():
        return {}
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise OipError(Kind.INVALID, f"the body is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise OipError(Kind.INVALID, "the body must be a JSON object")
    return document


def _json(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


async def _send(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
