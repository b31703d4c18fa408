"""A gRPC client for the load generator: one ``grpc.aio`` channel sending prepared ``ModelInfer`` messages.

The messages are serialized once, before a level (``benchmarks/oip_requests.py``), and the answers are
kept as bytes and read after it: the call is made without a serializer or a deserializer, so a
request costs the generator the channel's own work and nothing more, as the HTTP client's prepared
bytes do. One channel carries every concurrent call (HTTP/2 streams), as Triton's clients do.
"""

from __future__ import annotations

import grpc

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
OK = "OK"  # the status of a successful call; failures are named by their gRPC status code


def grpc_target(address: str) -> str:
    """``HOST:PORT`` (a ``grpc://`` or ``http://`` prefix dropped); anything else stops the command."""
    target = address.split("://", 1)[-1].rstrip("/")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"--grpc-url must be HOST:PORT, got {address!r}")
    return target


class GrpcChannel:
    """One channel to the server's ``GRPCInferenceService``; ``exchange`` sends one prepared message."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._channel: grpc.aio.Channel | None = None
        self._infer = None

    async def exchange(self, message: bytes, timeout_s: float) -> tuple[str, bytes]:
        """(status, answer): ``OK`` and the serialized ``ModelInferResponse``, or the status code's name
        and its details. The deadline travels with the call, so the server sees it too."""
        if self._infer is None:
            # Made on first use, inside the running event loop that grpc.aio binds the channel to.
            self._channel = grpc.aio.insecure_channel(self.target)
            self._infer = self._channel.unary_unary(MODEL_INFER)
        try:
            return OK, await self._infer(message, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name, (exc.details() or "").encode()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = self._infer = None
