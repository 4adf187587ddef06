"""bench.http_client against a real HTTP/1.1 server on a local socket, written here so that each test can
choose how the server frames, keeps or drops its connections."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import orjson
import pytest

from bench import http_client as http
from bench.load import EmbeddingsClient

Request = tuple[str, str, dict[str, str], bytes]  # method, target, headers, body
Reply = Callable[[Request, int], Awaitable[bytes | None]]  # the bytes to send, or None to drop the connection


def response(status: int = 200, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    head = [f"HTTP/1.1 {status} X"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
    if "transfer-encoding" not in {k.lower() for k in headers or {}}:
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def chunked(parts: list[bytes], trailers: str = "") -> bytes:
    body = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n" + trailers.encode() + b"\r\n"
    return response(200, body, {"Transfer-Encoding": "chunked"})


class Server:
    """A keep-alive server: reads one request at a time per connection and answers what `reply` returns."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.connections = 0
        self.requests: list[Request] = []

    async def __aenter__(self) -> "Server":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                lines = head.decode().split("\r\n")
                method, target, _ = lines[0].split(" ")
                headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:] if l)}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                request = (method, target, headers, body)
                self.requests.append(request)
                out = await self.reply(request, served)
                served += 1
                if out is None:
                    return
                writer.write(out)
                await writer.drain()
                if b"connection: close" in out.lower():
                    return
        finally:
            writer.close()


def run(coro: Awaitable[object]) -> object:
    return asyncio.run(asyncio.wait_for(coro, 20))  # a hang fails the test instead of stalling the suite


def answer(data: bytes) -> Reply:
    async def reply(request: Request, served: int) -> bytes:
        return data
    return reply


def test_content_length_body_and_headers_arrive_whole_over_several_packets():
    body = orjson.dumps({"data": "x" * 200_000})

    async def reply(request: Request, served: int) -> bytes:
        return response(200, body, {"X-Embserve-Total-Ms": "1.5", "X-Other": "a"})

    async def go() -> None:
        async with Server(reply) as server, http.Client(server.url) as client:
            r = await client.get("/models")
            assert (r.status, r.body, r.json()["data"][:3]) == (200, body, "xxx")
            assert r.headers["x-embserve-total-ms"] == "1.5"
            assert server.requests[0][:2] == ("GET", "/v1/models")
    run(go())


def test_chunked_body_is_joined_with_extensions_and_trailers_ignored():
    async def go() -> None:
        async with Server(answer(chunked([b"hello ", b"chunked world"], "X-T: 1\r\n"))) as server, \
                http.Client(server.url) as client:
            first = await client.get("/a")
            second = await client.get("/b")  # the trailers were consumed: the connection's framing still holds
            assert first.body == second.body == b"hello chunked world"
            assert server.connections == 1
    run(go())


def test_chunked_body_split_byte_by_byte_still_parses():
    payload = chunked([b"a" * 300, b"b" * 17])

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        for i in range(len(payload)):
            writer.write(payload[i : i + 1])
            await writer.drain()
            await asyncio.sleep(0)
        writer.close()

    async def go() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with http.Client(f"http://127.0.0.1:{port}") as client:
            assert (await client.get("/")).body == b"a" * 300 + b"b" * 17
        server.close()
    run(go())


def test_sequential_requests_reuse_one_keep_alive_connection():
    async def go() -> None:
        async with Server(answer(response(200, b"{}"))) as server, http.Client(server.url) as client:
            for _ in range(20):
                assert (await client.post("/embeddings", b"{}")).status == 200
            assert (server.connections, client.opened, len(server.requests)) == (1, 1, 20)
    run(go())


def test_server_that_closes_after_each_response_gets_a_fresh_connection_each_time():
    async def go() -> None:
        async with Server(answer(response(200, b"ok", {"Connection": "close"}))) as server, \
                http.Client(server.url) as client:
            bodies = [(await client.get("/")).body for _ in range(5)]
            assert bodies == [b"ok"] * 5
            assert server.connections == 5
    run(go())


def test_request_dropped_on_a_reused_connection_before_any_reply_is_retried_once_on_a_fresh_one():
    async def reply(request: Request, served: int) -> bytes | None:
        return None if served == 1 else response(200, b"ok")  # each connection's second request is dropped

    async def go() -> None:
        async with Server(reply) as server, http.Client(server.url) as client:
            assert (await client.get("/1")).body == b"ok"
            assert (await client.get("/2")).body == b"ok"  # dropped on connection 1, answered on connection 2
            assert server.connections == 2
            assert [r[1] for r in server.requests] == ["/v1/1", "/v1/2", "/v1/2"]
    run(go())


def test_request_dropped_on_a_fresh_connection_is_not_retried():
    async def reply(request: Request, served: int) -> bytes | None:
        return None

    async def go() -> None:
        async with Server(reply) as server, http.Client(server.url) as client:
            with pytest.raises(http.ReadError):
                await client.get("/")
            assert len(server.requests) == 1
    run(go())


def test_retry_happens_only_once():
    async def reply(request: Request, served: int) -> bytes | None:
        return response(200, b"ok") if request[1] == "/v1/warm" else None

    async def go() -> None:
        async with Server(reply) as server, http.Client(server.url) as client:
            await client.get("/warm")
            with pytest.raises(http.ReadError):
                await client.get("/dropped")
            assert [r[1] for r in server.requests].count("/v1/dropped") == 2
    run(go())


def test_connection_the_server_closed_while_idle_is_replaced():
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(response(200, b"ok"))
        await writer.drain()
        writer.close()  # keep-alive promised, then an idle timeout on the server's side

    async def go() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with http.Client(f"http://127.0.0.1:{port}") as client:
            for _ in range(3):
                assert (await client.get("/")).body == b"ok"
                await asyncio.sleep(0.05)  # the close reaches the client while the connection is idle
            assert client.opened == 3
        server.close()
    run(go())


def test_response_cut_mid_body_is_a_read_error_and_not_retried():
    async def reply(request: Request, served: int) -> bytes:
        # the second response promises 5 bytes of body, sends 3 and closes
        return response(200, b"short", {"Connection": "close"})[:-2] if served else response(200, b"ok")

    async def go() -> None:
        async with Server(reply) as server, http.Client(server.url) as client:
            await client.get("/")
            with pytest.raises(http.ReadError, match="mid-response"):
                await client.get("/cut")
            assert [r[1] for r in server.requests].count("/v1/cut") == 1  # a byte arrived: no retry
    run(go())


def test_body_delimited_by_close_is_read_to_the_end():
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
        await writer.drain()
        writer.close()

    async def go() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with http.Client(f"http://127.0.0.1:{port}") as client:
            assert (await client.get("/")).body == b"until the end"
        server.close()
    run(go())


def test_slow_server_raises_timeout_and_the_pool_recovers():
    async def reply(request: Request, served: int) -> bytes:
        if request[1] == "/v1/slow":
            await asyncio.sleep(1.0)
        return response(200, b"ok")

    async def go() -> None:
        async with Server(reply) as server, http.Client(server.url, connections=1, timeout_s=0.2) as client:
            with pytest.raises(http.Timeout):
                await client.get("/slow")
            assert (await client.get("/fast")).body == b"ok"  # the only slot came back, on a new connection
            assert client.opened == 2
    run(go())


def test_non_200_status_is_returned_and_raise_for_status_raises():
    async def go() -> None:
        async with Server(answer(response(429, b'{"error": {}}'))) as server, http.Client(server.url) as client:
            r = await client.get("/")
            assert r.status == 429
            with pytest.raises(http.StatusError):
                r.raise_for_status()
    run(go())


def test_refused_connection_is_a_connect_error():
    async def go() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        async with http.Client(f"http://127.0.0.1:{port}") as client:
            with pytest.raises(http.ConnectError):
                await client.get("/")
    run(go())


def test_garbage_from_the_server_is_a_protocol_error():
    async def go() -> None:
        async with Server(answer(b"SSH-2.0-nope\r\n\r\n")) as server, http.Client(server.url) as client:
            with pytest.raises(http.ProtocolError):
                await client.get("/")
    run(go())


def test_many_concurrent_requests_share_a_bounded_pool():
    in_flight = 0
    most = 0

    async def reply(request: Request, served: int) -> bytes:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return response(200, request[3])  # echo: each caller must get its own answer back

    async def go() -> None:
        async with Server(reply) as server, http.Client(server.url, connections=8) as client:
            bodies = [b"%d" % i for i in range(200)]
            answers = await asyncio.gather(*(client.post("/echo", b) for b in bodies))
            assert [a.body for a in answers] == bodies
            assert server.connections == client.opened <= 8
            assert most == 8
    run(go())


def test_embeddings_client_reports_tokens_timings_and_errors_as_before():
    async def reply(request: Request, served: int) -> bytes:
        body = orjson.loads(request[3])
        if body.get("input") == "bad":
            return response(400, b'{"error": {}}')
        assert (request[2]["authorization"], request[2]["content-type"]) == ("Bearer k", "application/json")
        out = {"data": [{"embedding": "AAAA", "index": 0}], "usage": {"prompt_tokens": 7, "total_tokens": 7}}
        return response(200, orjson.dumps(out), {"x-embserve-total-ms": "2.5", "X-EMBSERVE-QUEUE-MS": "0.5"})

    async def go() -> None:
        async with Server(reply) as server, EmbeddingsClient(server.url, "m", api_key="k") as client:
            ok = await client.embed("hello", truncate=True)
            assert (ok.error, ok.tokens, ok.texts, ok.timings) == (None, 7, 1, {"ingress_ms": 2.5, "queue_ms": 0.5})
            assert orjson.loads(server.requests[0][3]) == {"model": "m", "input": "hello",
                                                           "encoding_format": "base64", "truncate": True}
            assert (await client.embed("bad")).error == "http_400"
            assert await client.post_json("/performance/reset") == {"data": [{"embedding": "AAAA", "index": 0}],
                                                                  "usage": {"prompt_tokens": 7, "total_tokens": 7}}
            server.server.close()
        async with EmbeddingsClient(server.url, "m") as gone:
            assert (await gone.embed(["a", "b"])).error == "ConnectError"
    run(go())
