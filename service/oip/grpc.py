"""The Open Inference Protocol over gRPC: package ``inference``, service ``GRPCInferenceService``.

A ``grpc.aio`` server in the HTTP server's process and event loop, started and stopped by the app's
lifespan (``service/app.py``), on GRPC_PORT. It is a front door like ``/classify``: each call goes
through the protocol-neutral OIP layer (``service/oip/infer.py``, ``model.py``, ``tensors.py``) to the
same repository, admission, batchers, deadlines and metrics, and its failures take their gRPC status
codes from that layer's one table. The messages are the generated ones that Triton's client ships
(``tritonclient.grpc.service_pb2``), the very ones its clients are built from. Served: ServerLive,
ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelConfig, ModelInfer (data as
``raw_input_contents`` / ``raw_output_contents``, or typed contents) and, with REPOSITORY_API,
RepositoryIndex, RepositoryModelLoad and RepositoryModelUnload (``service/oip/repository_api.py``); any
other method of the service is UNIMPLEMENTED.

Limits, as on the HTTP port: gRPC itself refuses a message over MAX_BODY_BYTES and a call whose
metadata is over MAX_HEADER_BYTES (RESOURCE_EXHAUSTED), before anything is parsed. A message that
does not parse (e.g. a name that is not UTF-8) is the client's error, INVALID_ARGUMENT: requests reach
the servicer as bytes and are parsed here, where gRPC's own parsing would answer UNKNOWN.
With AUTH_TOKEN set, every call needs ``authorization: Bearer <token>`` metadata (UNAUTHENTICATED
otherwise), as every ``/v2`` route needs the header: the probes of a deployment are ``/healthz`` and
``/readyz``. A call's deadline is the client's when it is sooner than REQUEST_TIMEOUT_S.

Stopping: :meth:`OipGrpcServer.refuse_new_calls` closes the port (new calls get UNAVAILABLE) while
the calls in flight finish; ``python -m service`` calls it at the moment it closes the HTTP port, and
the lifespan's end waits for the calls in flight before the batchers stop.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
import numpy as np
from google.protobuf.json_format import ParseDict
from google.protobuf.message import DecodeError, Message
from tritonclient.grpc import model_config_pb2, service_pb2

from service.config import Settings
from service.core.metrics import OIP_GRPC, Metrics
from service.core.pipeline import Pipeline
from service.core.repository import ModelRepository, ModelStatus
from service.errors import ClientDisconnected, InternalError, shown
from service.http.middleware import new_request_id
from service.logs import request_id_var
from service.oip import model as oip_model
from service.oip import repository_api
from service.oip.infer import (
    InferenceRequest,
    InferenceResponse,
    InputTensor,
    Kind,
    OipError,
    RequestedOutput,
    admit_and_infer,
    configured_model,
    model_metadata,
    served_model,
    triton_config,
)
from service.oip.tensors import BYTES, FP32, TensorFormatError, check_shape, serialize_bytes

log = logging.getLogger("service")
access_log = logging.getLogger("service.access")

SERVICE = "inference.GRPCInferenceService"
_AUTHORIZATION = "authorization"
_CLASSIFICATION = "classification"


class OipGrpcServer:
    """The gRPC server of one app: :meth:`start` in its lifespan, :meth:`stop` at its end."""

    def __init__(
        self, settings: Settings, repository: ModelRepository, pipeline: Pipeline, metrics: Metrics
    ) -> None:
        self._settings = settings
        self._servicer = InferenceServicer(settings, repository, pipeline, metrics)
        self._server: grpc.aio.Server | None = None
        self._stopping: asyncio.Future[None] | None = None
        self.port: int | None = None  # the bound port, once started (GRPC_PORT, or the system's pick for 0)

    def options(self) -> list[tuple[str, int]]:
        settings = self._settings
        return [
            ("grpc.max_receive_message_length", settings.max_body_bytes),
            # The soft limit (over which gRPC refuses a share of the calls, at random) and the hard one:
            # set together, every call over the cap is refused and none under it.
            ("grpc.max_metadata_size", settings.max_header_bytes),
            ("grpc.absolute_max_metadata_size", settings.max_header_bytes),
            # gRPC shares a port between processes on Linux by default, which would hide that another
            # server holds it: binding must fail instead.
            ("grpc.so_reuseport", 0),
        ]

    async def start(self) -> None:
        """Bind GRPC_PORT on HOST and serve; OSError when the port cannot be bound."""
        server = grpc.aio.server(options=self.options())
        handlers = self._servicer.method_handlers()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        # As the generated code does: a registered method is found without the generic lookup.
        server.add_registered_method_handlers(SERVICE, handlers)
        host, port = self._settings.host, self._settings.grpc_port
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            self.port = server.add_insecure_port(address)
        except RuntimeError as exc:  # how grpc says that the address is taken or invalid
            raise OSError(f"cannot serve gRPC on {address} (GRPC_PORT): {exc}") from None
        await server.start()
        self._server = server
        log.info("Open Inference Protocol over gRPC on %s:%d", host, self.port)

    def refuse_new_calls(self, grace_s: float) -> None:
        """From now on the port is closed and new calls get UNAVAILABLE; the calls in flight have
        ``grace_s`` seconds to finish before they are cancelled."""
        if self._server is not None and self._stopping is None:
            self._stopping = asyncio.ensure_future(self._server.stop(grace_s))

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls (if that has not begun) and wait for those in flight, at most ``grace_s``."""
        self.refuse_new_calls(grace_s)
        if self._stopping is not None:
            await self._stopping


Handler = Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Message]]


class InferenceServicer:
    """``GRPCInferenceService``: health, metadata and inference, each a thin call into the OIP layer.

    Each method takes the request's bytes (see the module's docstring) and returns its response message.
    """

    def __init__(
        self, settings: Settings, repository: ModelRepository, pipeline: Pipeline, metrics: Metrics
    ) -> None:
        self._settings = settings
        self._repository = repository
        self._pipeline = pipeline
        self._metrics = metrics
        self._token = settings.expected_token()

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        methods: dict[str, tuple[Handler, type[Message]]] = {
            "ServerLive": (self.server_live, service_pb2.ServerLiveResponse),
            "ServerReady": (self.server_ready, service_pb2.ServerReadyResponse),
            "ModelReady": (self.model_ready, service_pb2.ModelReadyResponse),
            "ServerMetadata": (self.server_metadata, service_pb2.ServerMetadataResponse),
            "ModelMetadata": (self.model_metadata, service_pb2.ModelMetadataResponse),
            "ModelConfig": (self.model_config, service_pb2.ModelConfigResponse),
            "ModelInfer": (self.model_infer, service_pb2.ModelInferResponse),
            "RepositoryIndex": (self.repository_index, service_pb2.RepositoryIndexResponse),
            "RepositoryModelLoad": (self.repository_model_load, service_pb2.RepositoryModelLoadResponse),
            "RepositoryModelUnload": (
                self.repository_model_unload,
                service_pb2.RepositoryModelUnloadResponse,
            ),
        }
        return {
            # No request_deserializer: the method gets the bytes, and parses them itself.
            name: grpc.unary_unary_rpc_method_handler(
                handler if self._token is None else self._authorized(handler),
                response_serializer=response.SerializeToString,
            )
            for name, (handler, response) in methods.items()
        }

    def _authorized(self, handler: Handler) -> Handler:
        token = self._token
        assert token is not None

        async def authorized(raw: bytes, context: grpc.aio.ServicerContext) -> Message:
            given = bearer_token(context.invocation_metadata() or ())
            if given is None:
                await context.abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "this server needs a bearer token: send 'authorization: Bearer <token>' metadata",
                )
            if not hmac.compare_digest(given, token):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not valid")
            return await handler(raw, context)

        return authorized

    # --- health and metadata ----------------------------------------------------------------------
    async def server_live(self, raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        return service_pb2.ServerLiveResponse(live=True)

    async def server_ready(self, raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        return service_pb2.ServerReadyResponse(ready=self._repository.ready)

    async def server_metadata(self, raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        return service_pb2.ServerMetadataResponse(**oip_model.server_metadata())

    async def model_ready(self, raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        try:
            request = _parse(service_pb2.ModelReadyRequest, raw)
            model = configured_model(self._repository, request.name, request.version or None)
        except OipError as exc:
            await _abort(context, exc)
        return service_pb2.ModelReadyResponse(ready=model.status is ModelStatus.READY)

    async def model_metadata(self, raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        try:
            request = _parse(service_pb2.ModelMetadataRequest, raw)
            model = configured_model(self._repository, request.name, request.version or None)
            metadata = model_metadata(self._repository, model)
        except OipError as exc:
            await _abort(context, exc)
        return service_pb2.ModelMetadataResponse(**metadata)

    async def model_config(self, raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        try:
            request = _parse(service_pb2.ModelConfigRequest, raw)
            served = served_model(self._repository, request.name, request.version or None)
        except OipError as exc:
            await _abort(context, exc)
        timeout_s = self._settings.request_timeout_s
        config = triton_config(self._repository, served, request_timeout_s=timeout_s)
        return service_pb2.ModelConfigResponse(config=ParseDict(config, model_config_pb2.ModelConfig()))

    # --- the model repository extension -------------------------------------------------------------
    async def repository_index(self, raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        try:
            repository_api.check_enabled(self._settings)
            request = _parse(service_pb2.RepositoryIndexRequest, raw)
        except OipError as exc:
            await _abort(context, exc)
        entries = repository_api.index(self._repository, self._settings, ready_only=request.ready)
        models = [service_pb2.RepositoryIndexResponse.ModelIndex(**entry) for entry in entries]
        return service_pb2.RepositoryIndexResponse(models=models)

    async def repository_model_load(self, raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        await self._change_model(raw, context, service_pb2.RepositoryModelLoadRequest, repository_api.load)
        return service_pb2.RepositoryModelLoadResponse()

    async def repository_model_unload(self, raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        request_type = service_pb2.RepositoryModelUnloadRequest
        await self._change_model(raw, context, request_type, repository_api.unload)
        return service_pb2.RepositoryModelUnloadResponse()

    async def _change_model(
        self,
        raw: bytes,
        context: grpc.aio.ServicerContext,
        request_type: type[Message],
        change: Callable[[ModelRepository, str], Awaitable[None]],
    ) -> None:
        try:
            repository_api.check_enabled(self._settings)
            request = _parse(request_type, raw)
            repository_api.check_parameters({"parameters": dict(request.parameters)})
            await change(self._repository, request.model_name)
        except OipError as exc:
            await _abort(context, exc)

    # --- inference --------------------------------------------------------------------------------
    async def model_infer(self, raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        started = time.monotonic()
        request_id = new_request_id()
        token = request_id_var.set(request_id)
        model: str | None = None
        status = InternalError.status_code
        try:
            message = _parse(service_pb2.ModelInferRequest, raw)
            model = message.model_name
            served = served_model(self._repository, model, message.model_version or None)
            # The client's deadline, when it is sooner than the service's.
            remaining = context.time_remaining()
            timeout_s = self._settings.request_timeout_s
            deadline = started + (timeout_s if remaining is None else min(timeout_s, remaining))
            response = await admit_and_infer(
                served, decode_request(message), self._pipeline, deadline=deadline, request_id=request_id
            )
            status = 200
            return encode_response(response)
        except OipError as exc:
            status = exc.http_status
            await _abort(context, exc)
        except asyncio.CancelledError:
            status = ClientDisconnected.status_code  # the client cancelled, or its deadline passed
            raise
        except Exception:
            error_id = uuid.uuid4().hex[:12]
            log.exception("unhandled error in ModelInfer (error %s)", error_id)
            await context.abort(
                grpc.StatusCode.INTERNAL, f"internal error (error {error_id}, request {request_id})"
            )
        finally:
            seconds = time.monotonic() - started
            self._metrics.observe_request(model, status, seconds, protocol=OIP_GRPC)
            access_log.info(
                "gRPC ModelInfer %d %.1f ms",
                status,
                seconds * 1000,
                extra={
                    "method": "gRPC",
                    "path": "ModelInfer",
                    "status": status,
                    "ms": round(seconds * 1000, 2),
                },
            )
            request_id_var.reset(token)


def _parse(message_type: type[Message], raw: bytes) -> Any:
    try:
        return message_type.FromString(raw)
    except DecodeError:
        raise OipError(
            Kind.INVALID,
            f"the request is not a valid inference.{message_type.__name__} (are its strings UTF-8?)",
        ) from None


async def _abort(context: grpc.aio.ServicerContext, error: OipError) -> None:
    trailers = (("retry-after", error.headers["Retry-After"]),) if "Retry-After" in error.headers else ()
    await context.abort(getattr(grpc.StatusCode, error.grpc_code), error.message, trailing_metadata=trailers)


# --- between the wire format and the OIP layer -------------------------------------------------------
def decode_request(message: Any) -> InferenceRequest:
    """A ``ModelInferRequest`` as the OIP layer's request; INVALID (OipError) when it is malformed."""
    raw_contents = message.raw_input_contents
    if raw_contents and len(raw_contents) != len(message.inputs):
        raise OipError(
            Kind.INVALID,
            f"raw_input_contents has {len(raw_contents)} entries for {len(message.inputs)} inputs: "
            "one per input, in the order of the inputs",
        )
    inputs = []
    for i, tensor in enumerate(message.inputs):
        try:
            shape = check_shape(list(tensor.shape))
        except TensorFormatError as exc:
            raise OipError(Kind.INVALID, f"input {shown(tensor.name)}: {exc}") from None
        if raw_contents:
            if tensor.HasField("contents"):
                raise OipError(
                    Kind.INVALID,
                    f"input {shown(tensor.name)} has contents as well as raw_input_contents: send one",
                )
            inputs.append(InputTensor(tensor.name, tensor.datatype, shape, raw=raw_contents[i]))
        else:
            values = _typed_contents(tensor) if tensor.HasField("contents") else None
            inputs.append(InputTensor(tensor.name, tensor.datatype, shape, values=values))
    outputs = [RequestedOutput(output.name, _classification(output.parameters)) for output in message.outputs]
    return InferenceRequest(
        model=message.model_name,
        version=message.model_version or None,
        inputs=inputs,
        outputs=outputs,
        id=message.id or None,
    )


def _typed_contents(tensor: Any) -> Sequence[Any]:
    """The tensor's values from the contents field of its datatype (the others are not read)."""
    contents = tensor.contents
    if tensor.datatype == BYTES:
        return contents.bytes_contents
    if tensor.datatype == FP32:
        return np.asarray(contents.fp32_contents, dtype=np.float32)
    return ()  # a datatype no input takes: the OIP layer names the one expected


def _classification(parameters: Any) -> Any:
    """The classification extension's k, as sent (the OIP layer checks it is a whole number in range)."""
    if _CLASSIFICATION not in parameters:
        return 0
    parameter = parameters[_CLASSIFICATION]
    choice = parameter.WhichOneof("parameter_choice")
    return 0 if choice is None else getattr(parameter, choice)


def encode_response(response: InferenceResponse) -> Any:
    """The OIP layer's answer as a ``ModelInferResponse``, every output's data in raw_output_contents."""
    message = service_pb2.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id or ""
    )
    for output in response.outputs:
        message.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
        if output.datatype == BYTES:
            message.raw_output_contents.append(serialize_bytes(output.data))  # type: ignore[arg-type]
        else:
            message.raw_output_contents.append(np.ascontiguousarray(output.data, dtype="<f4").tobytes())
    return message


def bearer_token(metadata: Sequence[tuple[str, str | bytes]]) -> bytes | None:
    """The token of a call's first ``authorization: Bearer`` metadata entry, or None."""
    for key, value in metadata:
        if key == _AUTHORIZATION:
            if isinstance(value, str):
                try:
                    value = value.encode("ascii")
                except UnicodeEncodeError:
                    return None
            scheme, _, token = value.partition(b" ")
            token = token.strip()
            return token if scheme.lower() == b"bearer" and token else None
    return None
