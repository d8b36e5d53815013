"""The gateway's client to a model's tunnel: httpx over the tunnel's unix
socket, with each request sent in one write.

Why one write: httpx (httpcore + h11) writes a request's headers and its
body separately. Through ssh's forwarding the two become two small packets
on connections where OpenSSH leaves Nagle's algorithm on (a tunnel with no
terminal is not "interactive"), so the second waits for the first's ACK,
which the far end delays by ~40 ms: every request would stall that long.
Holding the writes until the request is complete (h11 ends each request
with an empty write; a read flushes too) removes the stall."""

from __future__ import annotations

import ssl
import typing

import httpcore
import httpx

_MOST_HELD = 64 * 1024  # a larger body goes out as it comes: no stall to save there


class OneWriteStream(httpcore.AsyncNetworkStream):
    def __init__(self, stream: httpcore.AsyncNetworkStream) -> None:
        self._stream = stream
        self._held: list[bytes] = []
        self._size = 0

    async def _flush(self, timeout: float | None) -> None:
        if self._held:
            data = b"".join(self._held)
            self._held.clear()
            self._size = 0
            await self._stream.write(data, timeout=timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if buffer:
            self._held.append(buffer)
            self._size += len(buffer)
        if not buffer or self._size >= _MOST_HELD:
            await self._flush(timeout)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        await self._flush(timeout)
        return await self._stream.read(max_bytes, timeout=timeout)

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:  # fmt: skip
        raise RuntimeError("no TLS to a tunnel's socket")  # never asked: http:// only

    def get_extra_info(self, info: str) -> typing.Any:
        return self._stream.get_extra_info(info)


class OneWriteBackend(httpcore.AsyncNetworkBackend):
    def __init__(self) -> None:
        self._backend = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: typing.Iterable[typing.Any] | None = None,
                          ) -> httpcore.AsyncNetworkStream:  # fmt: skip
        stream = await self._backend.connect_tcp(host, port, timeout, local_address, socket_options)
        return OneWriteStream(stream)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: typing.Iterable[typing.Any] | None = None,
                                  ) -> httpcore.AsyncNetworkStream:  # fmt: skip
        return OneWriteStream(await self._backend.connect_unix_socket(path, timeout, socket_options))

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


def client(uds: str = "") -> httpx.AsyncClient:
    """A pooled client to a tunnel (its unix socket, else any local port).
    No proxies from the environment: the tunnel is on this machine."""
    transport = httpx.AsyncHTTPTransport(uds=uds or None)
    # httpx builds its pool without a way to pass a network backend; the
    # pool it would build, with ours.
    transport._pool = httpcore.AsyncConnectionPool(
        uds=uds or None, network_backend=OneWriteBackend(), max_connections=None,
        max_keepalive_connections=64, keepalive_expiry=4.0,  # under uvicorn's 5 s
    )  # fmt: skip
    return httpx.AsyncClient(trust_env=False, timeout=httpx.Timeout(None, connect=10.0),
                             transport=transport)  # fmt: skip
