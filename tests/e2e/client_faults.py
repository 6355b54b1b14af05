"""Client-side faults for the SDK and CLI tests: httpx's real transport, with answers lost,
streams cut or bytes flipped on their way back (the server handled every request)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx


class Wrapping(httpx.BaseTransport):
    """httpx's real transport, with a hook that may change (or lose) each answer."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.requests: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.alter(request, self.inner.handle_request(request))

    def alter(self, request: httpx.Request, response: httpx.Response) -> httpx.Response:
        return response

    def close(self) -> None:
        self.inner.close()


class LoseFirstSubmitAnswer(Wrapping):
    """The first POST /v1/jobs reaches the server and is handled; its answer never arrives."""

    lost = False

    def alter(self, request: httpx.Request, response: httpx.Response) -> httpx.Response:
        if request.method == "POST" and request.url.path == "/v1/jobs" and not self.lost:
            self.lost = True
            response.read()
            response.close()
            raise httpx.ReadError("connection reset after the server answered", request=request)
        return response


class CutStream(httpx.SyncByteStream):
    """The inner body up to `messages` SSE job messages and half a chunk more, then a reset."""

    def __init__(self, inner: httpx.Response, messages: int) -> None:
        self.inner = inner
        self.messages = messages

    def __iter__(self) -> Iterator[bytes]:
        seen = 0
        for chunk in self.inner.iter_raw():
            if seen >= self.messages:
                yield chunk[: len(chunk) // 2]
                break
            seen += chunk.count(b"event: job")
            yield chunk
        self.inner.close()
        raise httpx.ReadError("connection reset mid-stream")

    def close(self) -> None:
        self.inner.close()


class CutWatches(Wrapping):
    """The first `cuts` watch streams break after a few messages."""

    def __init__(self, cuts: int, messages: int) -> None:
        super().__init__()
        self.cuts = cuts
        self.messages = messages

    def alter(self, request: httpx.Request, response: httpx.Response) -> httpx.Response:
        if request.url.path.endswith("/watch") and response.status_code == 200 and self.cuts:
            self.cuts -= 1
            return httpx.Response(
                200, headers=response.headers, stream=CutStream(response, self.messages)
            )
        return response


class CutFirstDownload(Wrapping):
    """The first download breaks after half its body; the server is asked again for the rest."""

    cut = False

    def alter(self, request: httpx.Request, response: httpx.Response) -> httpx.Response:
        if request.url.path.endswith("/download") and not self.cut:
            self.cut = True
            body = response.read()
            return httpx.Response(
                response.status_code,
                headers=response.headers,
                stream=Dropping(body[: len(body) // 2]),
            )
        return response


class Dropping(httpx.SyncByteStream):
    """Some bytes, then a reset connection."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __iter__(self) -> Iterator[bytes]:
        yield self.data
        raise httpx.ReadError("connection reset mid-download")


class FlipDownloadedByte(Wrapping):
    """Every download arrives with one byte changed (same length, same headers)."""

    def alter(self, request: httpx.Request, response: httpx.Response) -> httpx.Response:
        if request.url.path.endswith("/download") and response.status_code in (200, 206):
            data = bytearray(response.read())
            data[len(data) // 2] ^= 0x01
            return httpx.Response(
                response.status_code, headers=response.headers, content=bytes(data)
            )
        return response
