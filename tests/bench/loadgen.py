"""A lean HTTP/1.1 keep-alive load generator on asyncio streams, for closed-loop benchmarks.

On a 2-core machine httpx spends more CPU per request than the server under test, so a
benchmark driven by it measures its client. This one encodes each request in one
string operation, parses only the status line and the headers that frame the body
(`Content-Length` or `chunked`), and keeps one connection per simulated client open for
the whole run. In a closed loop each of N connections sends its next request as soon as
the previous answer arrived: the offered load adapts to what the server sustains.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import msgspec

# uvicorn closes a keep-alive connection after 5 idle seconds; reopen before that instead
# of racing its close with the next request.
IDLE_REOPEN_SECONDS = 4.0
# How many error bodies a run keeps, to say in its notes what went wrong.
ERROR_SAMPLES = 5
_NO_BODY_STATUSES = {204, 304}


class ProtocolError(Exception):
    """The server sent something that is not an HTTP/1.1 response this client can frame."""


@dataclass(frozen=True, slots=True)
class Request:
    """One request, and the statuses that count as success for it."""

    method: str
    path: str
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    expect: Collection[int] = (200,)

    @classmethod
    def json(
        cls,
        method: str,
        path: str,
        body: object,
        *,
        headers: Mapping[str, str] | None = None,
        expect: Collection[int] = (200, 201),
    ) -> Request:
        """A request whose body is `body` encoded as JSON (bytes are sent as they are)."""
        encoded = body if isinstance(body, bytes) else msgspec.json.encode(body)
        return cls(
            method,
            path,
            encoded,
            {"Content-Type": "application/json", **(headers or {})},
            expect,
        )

    def encode(self, host: str) -> bytes:
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: {host}"]
        lines += [f"{name}: {value}" for name, value in self.headers.items()]
        if self.body or self.method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


@dataclass(frozen=True, slots=True)
class Response:
    """A response: its status, headers (names lower-cased) and whole body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        return msgspec.json.decode(self.body)


class Connection:
    """One keep-alive HTTP/1.1 connection; it (re)opens itself when it has to."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"only plain http://host:port URLs are supported, not {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self._host_header = parts.netloc
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._last_used = 0.0

    async def open(self) -> None:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
            self._last_used = time.monotonic()

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            # Already reset by the server: closed either way.
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def send(self, request: Request) -> Response:
        """Send `request` and read its whole response."""
        if self._writer is not None and time.monotonic() - self._last_used > IDLE_REOPEN_SECONDS:
            await self.close()
        await self.open()
        assert self._reader is not None and self._writer is not None
        self._writer.write(request.encode(self._host_header))
        response = await self._read_response(self._reader, request.method)
        self._last_used = time.monotonic()
        if response.headers.get("connection", "").lower() == "close":
            await self.close()
        return response

    async def _read_response(self, reader: asyncio.StreamReader, method: str) -> Response:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].decode("latin-1").split("\r\n")
        status_line = lines[0].split(" ", 2)
        if len(status_line) < 2 or not status_line[0].startswith("HTTP/1."):
            raise ProtocolError(f"not an HTTP/1.x status line: {lines[0]!r}")
        status = int(status_line[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if method == "HEAD" or status in _NO_BODY_STATUSES or 100 <= status < 200:
            body = b""
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body = await _read_chunked(reader)
        elif "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        else:
            # Neither framing: the body runs until the server closes the connection.
            body = await reader.read()
            headers["connection"] = "close"
        return Response(status, headers, body)

    async def __aenter__(self) -> Connection:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            # Trailers, if any, end with an empty line.
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass
            return b"".join(chunks)
        chunks.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise ProtocolError("a chunk did not end with CRLF")


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile of `values` (already sorted), NaN when there are none."""
    if not values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(values)))
    return values[rank - 1]


class LoadResult(msgspec.Struct, kw_only=True):
    """What a closed-loop run saw: how many answers, which failed, how fast, how long each took."""

    count: int  # requests that got an answer or failed
    ok: int  # answers with an expected status
    # By status ("500") or by what broke the connection ("connection: ConnectionResetError").
    errors: dict[str, int]
    error_samples: list[str]
    seconds: float
    rate: float  # ok answers per second
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def describe_errors(self) -> str:
        """One line for a comparison's notes, empty when nothing failed."""
        if not self.errors:
            return ""
        counts = ", ".join(f"{what} x{n}" for what, n in sorted(self.errors.items()))
        samples = " | ".join(self.error_samples)
        return f"{self.error_count} of {self.count} requests failed ({counts}); e.g. {samples}"


def summarise(
    latencies: list[float], errors: Counter[str], samples: list[str], seconds: float
) -> LoadResult:
    """A LoadResult from raw latencies (seconds) and error counts."""
    latencies.sort()
    ok = len(latencies)
    return LoadResult(
        count=ok + sum(errors.values()),
        ok=ok,
        errors=dict(errors),
        error_samples=samples,
        seconds=seconds,
        rate=ok / seconds if seconds > 0 else 0.0,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p90_ms=percentile(latencies, 0.90) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        max_ms=(latencies[-1] * 1000) if latencies else math.nan,
    )


async def closed_loop(
    url: str,
    requests: Callable[[int], Request],
    *,
    concurrency: int,
    seconds: float | None = None,
    count: int | None = None,
    timeout: float = 30.0,
    on_response: Callable[[int, Response], None] | None = None,
) -> LoadResult:
    """Drive `url` with `concurrency` keep-alive connections, each sending as soon as answered.

    `requests(i)` builds the i-th request (0, 1, 2, ... across all connections). The run
    stops starting requests after `seconds`, or once `count` were started; either way
    it waits for those in flight. Connections open before the clock starts. A failed
    request is counted, not retried; its connection is reopened for the next one.
    `on_response(i, response)` sees every answer, expected or not.
    """
    if (seconds is None) == (count is None):
        raise ValueError("give exactly one of seconds and count")
    indices = itertools.count()
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    samples: list[str] = []
    connections = [Connection(url) for _ in range(concurrency)]
    await asyncio.gather(*(connection.open() for connection in connections))
    started = time.perf_counter()
    stop_at = started + seconds if seconds is not None else math.inf
    limit = count if count is not None else math.inf

    def record_error(what: str, detail: str) -> None:
        errors[what] += 1
        if len(samples) < ERROR_SAMPLES:
            samples.append(f"{what}: {detail[:300]}")

    async def client(connection: Connection) -> None:
        while True:
            index = next(indices)
            if index >= limit or time.perf_counter() >= stop_at:
                return
            request = requests(index)
            begin = time.perf_counter()
            try:
                async with asyncio.timeout(timeout):
                    response = await connection.send(request)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ProtocolError) as error:
                record_error(f"connection: {type(error).__name__}", str(error))
                await connection.close()
                continue
            elapsed = time.perf_counter() - begin
            if response.status in request.expect:
                latencies.append(elapsed)
            else:
                record_error(str(response.status), response.body.decode("utf-8", "replace"))
            if on_response is not None:
                on_response(index, response)

    try:
        await asyncio.gather(*(client(connection) for connection in connections))
    finally:
        await asyncio.gather(*(connection.close() for connection in connections))
    return summarise(latencies, errors, samples, time.perf_counter() - started)
