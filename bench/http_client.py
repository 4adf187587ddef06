"""A minimal asyncio HTTP/1.1 client with a keep-alive pool, for the load generator.

On a small box the generator shares the cores with the server it measures, so every millisecond of client
CPU is taken from the server. httpx spends about as much CPU per short request as the server's ingress
(pool bookkeeping, h11's parser); this client does only what a benchmark needs: plain http, one request
per connection at a time, the response parsed by hand in the protocol's data_received (status line,
headers, a body by Content-Length, chunked or up to the close), with no extra task per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import orjson


class HTTPError(Exception):
    """Everything this client raises; the load generator records the subclass's name."""


class ConnectError(HTTPError):
    """The server could not be reached (refused, unresolvable, or closed before it answered anything)."""


class ReadError(HTTPError):
    """The connection broke before the whole response arrived."""


class ProtocolError(HTTPError):
    """The server sent something that is not an HTTP/1.1 response."""


class Timeout(HTTPError):
    """The request did not complete within its timeout (pool wait, connect and exchange together)."""


class StatusError(HTTPError):
    """`Response.raise_for_status` on a status of 400 or more."""

    def __init__(self, response: "Response") -> None:
        super().__init__(f"HTTP {response.status}: {response.body[:200]!r}")
        self.response = response


class Response:
    """Status, headers (names lower-cased; repeated headers joined with ', ') and the whole body."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return orjson.loads(self.body)

    def raise_for_status(self) -> "Response":
        if self.status >= 400:
            raise StatusError(self)
        return self


_NO_BODY = -1  # body modes: a length >= 0, or one of these
_CHUNKED = -2
_UNTIL_CLOSE = -3


class _Connection(asyncio.Protocol):
    """One keep-alive connection; `exchange` sends a request and resolves once the response is complete."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reusable = True
        self.buffer = bytearray()
        self.waiter: asyncio.Future[Response] | None = None
        self.received = False  # any byte of the current response yet (a failure before one may be retried)
        self._head_only = False
        self._reset_response()

    def _reset_response(self) -> None:
        self.status = 0
        self.headers: dict[str, str] | None = None
        self.mode = _NO_BODY
        self.chunks: list[bytes] = []

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.waiter is None or self.waiter.done():
            self._close()  # bytes nobody asked for: the connection's framing can no longer be trusted
            return
        self.received = True
        self.buffer += data
        try:
            response = self._parse()
        except (ValueError, IndexError, UnicodeDecodeError) as exc:
            self._fail(ProtocolError(f"malformed response: {exc}"))
            return
        if response is not None:
            if self.buffer:
                self.reusable = False
            self.waiter.set_result(response)

    def eof_received(self) -> bool:
        self.reusable = False
        if self.waiter is not None and not self.waiter.done():
            if self.headers is not None and self.mode == _UNTIL_CLOSE:
                self.waiter.set_result(Response(self.status, self.headers, bytes(self.buffer)))
            else:
                self._fail(self._lost(None))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        if self.waiter is not None and not self.waiter.done():
            self._fail(self._lost(exc))

    # the exchange
    def exchange(self, request: bytes, head_only: bool) -> asyncio.Future[Response]:
        self.waiter = asyncio.get_running_loop().create_future()
        self.received = False
        self._head_only = head_only
        self._reset_response()
        self.buffer.clear()
        if self.transport is None or self.transport.is_closing():
            self._fail(self._lost(None))
        else:
            self.transport.write(request)
        return self.waiter

    def _lost(self, exc: Exception | None) -> HTTPError:
        what = "the server closed the connection" + (f" ({exc})" if exc else "")
        return ReadError(what + (" mid-response" if self.received else " before answering"))

    def _fail(self, error: HTTPError) -> None:
        self.reusable = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(error)
        self._close()

    def _close(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.close()

    def _parse(self) -> Response | None:
        buf = self.buffer
        while self.headers is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > 65536:
                    raise ValueError("response head over 64 KiB")
                return None
            lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
            del buf[: end + 4]
            version, status = lines[0].split(" ", 2)[:2]
            if not version.startswith("HTTP/1."):
                raise ValueError(f"status line {lines[0]!r}")
            code = int(status)
            if 100 <= code < 200:
                continue  # an interim response (100 Continue, 103 Early Hints): the real one follows
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                value = value.strip()
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
            self.status, self.headers = code, headers
            connection = headers.get("connection", "").lower()
            if "close" in connection or (version == "HTTP/1.0" and "keep-alive" not in connection):
                self.reusable = False
            if self._head_only or code in (204, 304):
                self.mode = _NO_BODY
            elif "chunked" in headers.get("transfer-encoding", "").lower():
                self.mode = _CHUNKED
            elif "content-length" in headers:
                self.mode = int(headers["content-length"])
                if self.mode < 0:
                    raise ValueError("negative Content-Length")
            else:
                self.mode = _UNTIL_CLOSE
                self.reusable = False
        if self.mode == _NO_BODY:
            return Response(self.status, self.headers, b"")
        if self.mode >= 0:
            if len(buf) < self.mode:
                return None
            body = bytes(buf[: self.mode])
            del buf[: self.mode]
            return Response(self.status, self.headers, body)
        if self.mode == _CHUNKED:
            return self._parse_chunks()
        return None  # _UNTIL_CLOSE: eof_received completes it

    def _parse_chunks(self) -> Response | None:
        buf = self.buffer
        pos = 0
        while True:
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                break
            size = int(bytes(buf[pos:line_end]).split(b";", 1)[0], 16)
            data_start = line_end + 2
            if size == 0:
                if buf[data_start : data_start + 2] == b"\r\n":
                    end = data_start + 2
                else:  # trailers, which a benchmark has no use for
                    trailer_end = buf.find(b"\r\n\r\n", data_start)
                    if trailer_end < 0:
                        break
                    end = trailer_end + 4
                del buf[:end]
                return Response(self.status, self.headers, b"".join(self.chunks))
            if len(buf) < data_start + size + 2:
                break
            if buf[data_start + size : data_start + size + 2] != b"\r\n":
                raise ValueError("chunk not followed by CRLF")
            self.chunks.append(bytes(buf[data_start : data_start + size]))
            pos = data_start + size + 2
        del buf[:pos]  # the chunks taken so far; what is left waits for the next data_received
        return None


class Client:
    """A pool of up to `connections` keep-alive connections to one http:// origin.

    `base_url`'s path is a prefix for every request path (as httpx's base_url). A request that fails on a
    reused connection before any byte of the response (the server dropped it while idle) is retried once
    on a fresh connection; `timeout_s` bounds each request as a whole, the wait for a connection included.
    """

    def __init__(self, base_url: str, connections: int = 64, headers: Mapping[str, str] | None = None,
                 timeout_s: float = 120.0) -> None:
        url = urlsplit(base_url)
        if url.scheme != "http":
            raise ValueError(f"only http:// is supported, not {base_url!r}")
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 80
        self.prefix = url.path.rstrip("/")
        self.timeout_s = timeout_s
        host = self.host if self.port == 80 else f"{self.host}:{self.port}"
        fixed = {"host": host, "user-agent": "embserve-bench", "accept": "*/*", **(headers or {})}
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in fixed.items()).encode("latin-1")
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(connections)
        self.opened = 0  # connections opened so far (tests read it; so can a curious benchmark)

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn._close()

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: Mapping[str, str] | None = None) -> Response:
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1") if headers else b""
        length = b"" if not body and method in ("GET", "HEAD") else b"content-length: %d\r\n" % len(body)
        request = b"".join((f"{method} {self.prefix}{path} HTTP/1.1\r\n".encode("latin-1"), self._fixed, extra,
                            length, b"\r\n", body))
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self._slots:
                    return await self._send(request, method == "HEAD")
        except TimeoutError as exc:
            raise Timeout(f"{method} {path}: no complete response within {self.timeout_s:g} s") from exc

    async def get(self, path: str, headers: Mapping[str, str] | None = None) -> Response:
        return await self.request("GET", path, headers=headers)

    async def post(self, path: str, body: bytes, headers: Mapping[str, str] | None = None) -> Response:
        return await self.request("POST", path, body, headers)

    async def _send(self, request: bytes, head_only: bool) -> Response:
        conn, reused = await self._acquire()
        try:
            try:
                response = await conn.exchange(request, head_only)
            except ReadError:
                if not reused or conn.received:
                    raise
                conn._close()
                conn, reused = await self._open(), False
                response = await conn.exchange(request, head_only)
        except BaseException:
            conn._close()  # a timeout or cancel mid-exchange leaves the framing unknown
            raise
        if conn.reusable:
            self._idle.append(conn)
        else:
            conn._close()
        return response

    async def _acquire(self) -> tuple[_Connection, bool]:
        while self._idle:
            conn = self._idle.pop()  # the most recently used one is the likeliest to be still open
            if conn.reusable and conn.transport is not None and not conn.transport.is_closing():
                return conn, True
            conn._close()
        return await self._open(), False

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(_Connection, self.host, self.port)
        except OSError as exc:
            raise ConnectError(f"{self.host}:{self.port}: {exc}") from exc
        self.opened += 1
        return conn
