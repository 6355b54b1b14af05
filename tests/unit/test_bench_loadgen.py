"""The benchmarks' load generator frames responses right and counts what failed.

A tiny HTTP server on loopback answers with a Content-Length body, a chunked body (with
a trailer), an unexpected status, or a dropped connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.bench.loadgen import Connection, Request, closed_loop, percentile

CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: yes\r\n\r\n"
)


def fixed(status: int, body: bytes) -> bytes:
    head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\nContent-Type: text/plain\r\n\r\n"
    return head.encode() + body


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer each request on the connection by its path."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1]
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            body = await reader.readexactly(length)
            if path == b"/chunked":
                writer.write(CHUNKED)
            elif path == b"/echo":
                writer.write(fixed(201, body))
            elif path == b"/fail":
                writer.write(fixed(500, b'{"error": "boom"}'))
            elif path == b"/drop":
                writer.close()
                return
            else:
                writer.write(fixed(200, b"plain"))
            await writer.drain()
    except asyncio.IncompleteReadError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def server_url() -> AsyncIterator[str]:
    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}"


async def test_bodies_framed_by_length_and_by_chunks_on_one_connection(server_url: str) -> None:
    async with Connection(server_url) as connection:
        plain = await connection.send(Request("GET", "/"))
        chunked = await connection.send(Request("GET", "/chunked"))
        echoed = await connection.send(Request.json("POST", "/echo", {"a": 1}))
        again = await connection.send(Request("GET", "/"))

    assert (plain.status, plain.body) == (200, b"plain")
    assert (chunked.status, chunked.body) == (200, b"hello, world")
    assert (echoed.status, echoed.json()) == (201, {"a": 1})
    assert again.body == b"plain"


async def test_a_closed_loop_counts_every_request_and_its_latency(server_url: str) -> None:
    result = await closed_loop(
        server_url, lambda i: Request("GET", "/chunked"), concurrency=3, count=50
    )

    assert (result.count, result.ok, result.errors) == (50, 50, {})
    assert 0 < result.p50_ms <= result.p90_ms <= result.p99_ms <= result.max_ms
    assert result.rate > 0


async def test_unexpected_statuses_and_dropped_connections_are_errors(server_url: str) -> None:
    paths = ["/", "/fail", "/drop", "/"]
    result = await closed_loop(
        server_url, lambda i: Request("GET", paths[i % 4]), concurrency=1, count=8
    )

    assert result.ok == 4
    assert result.errors == {"500": 2, "connection: IncompleteReadError": 2}
    assert any('{"error": "boom"}' in sample for sample in result.error_samples)
    assert "4 of 8 requests failed" in result.describe_errors()


async def test_a_run_stops_after_its_duration(server_url: str) -> None:
    result = await closed_loop(
        server_url, lambda i: Request("GET", "/"), concurrency=2, seconds=0.2
    )

    assert result.count > 0 and result.errors == {}
    assert 0.2 <= result.seconds < 2


def test_percentiles_are_nearest_rank() -> None:
    values = [float(n) for n in range(1, 101)]
    assert percentile(values, 0.5) == 50
    assert percentile(values, 0.99) == 99
    assert percentile([7.0], 0.99) == 7
