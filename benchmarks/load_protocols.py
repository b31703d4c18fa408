"""How the load generator speaks each protocol: what it sends, over what, and how it reads the answers.

- ``classify``: ``POST /classify`` with the image as the body (``benchmarks/classify_requests.py``)
  over the keep-alive HTTP/1.1 client (``benchmarks/http_client.py``), one connection per concurrent
  request;
- ``oip-http``: the Open Inference Protocol's ``POST /v2/models/{model}/infer`` with the binary tensor
  data extension, BYTES JPEG input and the classification extension's top-k output
  (``benchmarks/oip_requests.py``), over the same HTTP client;
- ``oip-grpc``: the same request as ``GRPCInferenceService/ModelInfer`` over one ``grpc.aio``
  channel that every concurrent call shares (``benchmarks/grpc_client.py``).

Every request is built before the level starts, and every answer is read after it ends
(``read_answers``), so the generator's own CPU per request stays small next to the server's.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from benchmarks import oip_requests
from benchmarks.classify_requests import Image, build_requests
from benchmarks.grpc_client import OK, GrpcChannel, grpc_target
from benchmarks.http_client import Connection, HttpError, address

PROTOCOLS = ("classify", "oip-http", "oip-grpc")
DEFAULT_GRPC_PORT = 8001  # the service's GRPC_PORT default
TRANSPORT_ERROR = "connection"
TIMEOUT_ERROR = "timeout"
# A successful answer: HTTP 200, or a gRPC call that ended OK.
SUCCESS = frozenset({200, OK})
# Failures of the client's own (no answer from the server): everything else is an answer.
UNANSWERED = frozenset({TRANSPORT_ERROR, TIMEOUT_ERROR})
MALFORMED = "malformed"  # errors key: a successful status whose answer is not what was asked for

Status = int | str
Send = Callable[[Any, bytes, float], Awaitable[tuple[Status, bytes]]]


async def send_http(connection: Connection, raw: bytes, timeout_s: float) -> tuple[Status, bytes]:
    try:
        # asyncio.timeout, not wait_for: no task per request (Python 3.11's wait_for makes one).
        async with asyncio.timeout(timeout_s):
            return await connection.exchange(raw)
    except TimeoutError:
        connection.close()
        return TIMEOUT_ERROR, b""
    except HttpError:
        return TRANSPORT_ERROR, b""


class ConnectionPool:
    """Idle HTTP connections for the open loop; a new one opens whenever none is idle."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[Connection] = []
        self.opened = 0

    def get(self) -> Connection:
        if self.idle:
            return self.idle.pop()
        self.opened += 1
        return Connection(self.host, self.port)

    def put(self, connection: Connection) -> None:
        self.idle.append(connection)

    def close(self) -> None:
        for connection in self.idle:
            connection.close()
        self.idle.clear()


class SharedChannel:
    """The open loop's pool for gRPC: every call goes over the one channel (HTTP/2 streams)."""

    opened = 1

    def __init__(self, channel: GrpcChannel) -> None:
        self.channel = channel

    def get(self) -> GrpcChannel:
        return self.channel

    def put(self, channel: GrpcChannel) -> None:
        pass

    def close(self) -> None:
        pass  # the channel is closed with the level (ProtocolClient.close)


class ProtocolClient:
    """One model's requests in one protocol for one level, and the clients that send them.

    ``requests`` (prepared bytes) go through ``send(client, raw, timeout_s)``; ``clients(n)`` gives the
    closed loop's ``n`` clients, ``pool()`` the open loop's; ``cpu_clock`` measures the generator's own
    CPU over the level; ``read_answers`` reads the successful answers once the level is over.
    """

    protocol = "classify"
    send: Send = staticmethod(send_http)
    # The generator is this one thread (its event loop) for HTTP.
    cpu_clock: Callable[[], float] = staticmethod(time.thread_time)

    def __init__(
        self, url: str, model: str, images: Sequence[Image], *, top_k: int = 5, images_per_request: int = 1
    ) -> None:
        self.host, self.port = address(url)
        self.top_k = top_k
        self.images_per_request = images_per_request
        self.requests = self.build(model, images)
        self._opened: list[Connection] = []

    def build(self, model: str, images: Sequence[Image]) -> list[bytes]:
        return build_requests(
            f"{self.host}:{self.port}",
            model,
            images,
            top_k=self.top_k,
            files_per_request=self.images_per_request,
        )

    def clients(self, count: int) -> list:
        """One keep-alive connection per concurrent request."""
        self._opened = [Connection(self.host, self.port) for _ in range(count)]
        return self._opened

    def pool(self) -> ConnectionPool:
        return ConnectionPool(self.host, self.port)

    @property
    def opened(self) -> int:
        """Connections the closed loop opened."""
        return len(self._opened)

    async def close(self) -> None:
        for connection in self._opened:
            connection.close()

    def read_answers(self, bodies: Sequence[bytes]) -> tuple[dict[str, list[float]], int]:
        """(the server's ``timings_ms`` by stage over every answer, how many answers were malformed)."""
        stages: dict[str, list[float]] = {}
        for body in bodies:
            try:
                timings = json.loads(body)["timings_ms"]
            except (ValueError, KeyError, TypeError):
                continue
            for stage, value in timings.items():
                stages.setdefault(stage, []).append(value)
        return stages, 0


class OipHttpClient(ProtocolClient):
    """The Open Inference Protocol over HTTP: binary BYTES input, classification output."""

    protocol = "oip-http"

    def build(self, model: str, images: Sequence[Image]) -> list[bytes]:
        return oip_requests.build_http_requests(
            f"{self.host}:{self.port}",
            model,
            images,
            top_k=self.top_k,
            images_per_request=self.images_per_request,
        )

    def read_answers(self, bodies: Sequence[bytes]) -> tuple[dict[str, list[float]], int]:
        """OIP answers carry no server timings; each is checked to hold the classification asked for."""
        return {}, sum(1 for body in bodies if not self._well_formed(oip_requests.read_http_answer, body))

    def _well_formed(self, read: Callable[[bytes], list[list[str]]], body: bytes) -> bool:
        try:
            rows = read(body)
            return len(rows) == self.images_per_request and all(
                len(row) == self.top_k and all(oip_requests.parse_classification(e) for e in row)
                for row in rows
            )
        except (oip_requests.AnswerError, ValueError, UnicodeDecodeError):
            return False


class OipGrpcClient(OipHttpClient):
    """The Open Inference Protocol over gRPC: the same request as ``ModelInfer`` on one shared channel."""

    protocol = "oip-grpc"
    send: Send = staticmethod(GrpcChannel.exchange)
    # grpc's core runs the channel's I/O on threads of its own: the process's CPU is the generator's.
    cpu_clock: Callable[[], float] = staticmethod(time.process_time)

    def __init__(
        self,
        grpc_url: str,
        model: str,
        images: Sequence[Image],
        *,
        top_k: int = 5,
        images_per_request: int = 1,
    ) -> None:
        self.target = grpc_target(grpc_url)
        self.top_k = top_k
        self.images_per_request = images_per_request
        self.requests = oip_requests.build_grpc_requests(
            model, images, top_k=top_k, images_per_request=images_per_request
        )
        self.channel = GrpcChannel(self.target)

    def clients(self, count: int) -> list:
        return [self.channel] * count

    def pool(self) -> SharedChannel:
        return SharedChannel(self.channel)

    @property
    def opened(self) -> int:
        return 1

    async def close(self) -> None:
        await self.channel.close()

    def read_answers(self, bodies: Sequence[bytes]) -> tuple[dict[str, list[float]], int]:
        return {}, sum(1 for body in bodies if not self._well_formed(oip_requests.read_grpc_answer, body))


def protocol_client(
    protocol: str,
    url: str,
    grpc_url: str | None,
    model: str,
    images: Sequence[Image],
    *,
    top_k: int = 5,
    images_per_request: int = 1,
) -> ProtocolClient:
    """The client of ``protocol`` for one model's level. ``grpc_url`` (HOST:PORT) defaults to the HTTP
    server's host on the service's default gRPC port."""
    if protocol == "oip-grpc":
        target = grpc_url or f"{address(url)[0]}:{DEFAULT_GRPC_PORT}"
        return OipGrpcClient(target, model, images, top_k=top_k, images_per_request=images_per_request)
    kinds = {"classify": ProtocolClient, "oip-http": OipHttpClient}
    if protocol not in kinds:
        raise ValueError(f"unknown protocol {protocol!r}: one of {', '.join(PROTOCOLS)}")
    return kinds[protocol](url, model, images, top_k=top_k, images_per_request=images_per_request)
