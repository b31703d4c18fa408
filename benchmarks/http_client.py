"""A minimal HTTP/1.1 keep-alive client, for the load generator and the benchmarks that drive a server.

Why not httpx or aiohttp: the load generator runs on the machine it measures, sharing its cores with
the server, and its own CPU per request is part of every result (the README quotes it beside the
server's). A general-purpose client costs several times the CPU per request; this one only ever
talks to our own server, so it sends prepared bytes and reads just what a response needs: the status
line, ``Content-Length``, ``Transfer-Encoding: chunked`` and ``Connection: close``.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit


class HttpError(Exception):
    """The connection failed or the response could not be read."""


class Connection:
    """One keep-alive connection; ``exchange`` sends a prepared request and reads the response."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def exchange(self, raw: bytes) -> tuple[int, bytes]:
        """(status, body) for the request bytes ``raw``. Raises HttpError; the connection is then closed."""
        try:
            if self._writer is None:
                self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
            assert self._reader is not None
            self._writer.write(raw)
            head = await self._reader.readuntil(b"\r\n\r\n")
            status, length, chunked, close = _parse_head(head)
            if chunked:
                body = await _read_chunked(self._reader)
            elif length is not None:
                body = await self._reader.readexactly(length)
            else:  # no length: the body runs to the end of the connection
                body = await self._reader.read()
                close = True
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            self.close()
            raise HttpError(f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            self.close()  # cancelled mid-exchange: the stream is in an unknown state
            raise
        if close:
            self.close()
        return status, body

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


def _parse_head(head: bytes) -> tuple[int, int | None, bool, bool]:
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, chunked, close = None, False, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            close = b"close" in value.lower()
    return status, length, chunked, close


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


async def http_get(url: str, path: str, timeout_s: float = 10.0) -> tuple[int, bytes]:
    """(status, body) of ``GET path`` on a connection of its own, closed afterwards."""
    host, port = address(url)
    connection = Connection(host, port)
    try:
        raw = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode("latin-1")
        return await asyncio.wait_for(connection.exchange(raw), timeout_s)
    finally:
        connection.close()


async def http_post(url: str, path: str, body: bytes = b"", timeout_s: float = 10.0) -> tuple[int, bytes]:
    """(status, body) of ``POST path`` with ``body`` (JSON) on a connection of its own, closed afterwards."""
    host, port = address(url)
    connection = Connection(host, port)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    try:
        return await asyncio.wait_for(connection.exchange(head.encode("latin-1") + body), timeout_s)
    finally:
        connection.close()


def address(url: str) -> tuple[str, int]:
    """(host, port) of an ``http://HOST[:PORT]`` URL; anything else stops the command with a message."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise SystemExit(f"--url must be http://HOST[:PORT], got {url!r}")
    return parts.hostname, parts.port or 80
