"""Per-key limits hold across API processes sharing one database, with the usual headers."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.e2e.conftest import Served

LIMITS_ON = {"JOBLEDGER_RATE_LIMITS": "on"}


def assert_429(answer: httpx.Response) -> None:
    assert answer.status_code == 429, answer.text
    assert int(answer.headers["Retry-After"]) >= 1
    assert int(answer.headers["Retry-After"]) <= 60
    body = answer.json()
    assert set(body) == {"error"} and set(body["error"]) == {"status", "message", "details"}
    assert body["error"]["status"] == 429


@pytest.fixture(scope="module")
def pair(serve_factory: Callable[..., Served]) -> tuple[Served, Served]:
    """Two API processes on one database, rate limits on with the defaults."""
    first = serve_factory(env=LIMITS_ON)
    second = serve_factory(env=LIMITS_ON, database_url=first.database_url)
    return first, second


def burst(pair: tuple[Served, Served], key: str, count: int) -> list[httpx.Response]:
    clients = [served.client(key) for served in pair]
    return [clients[i % 2].get("/v1/jobs") for i in range(count)]


def test_a_key_gets_sixty_a_minute_across_two_servers(pair: tuple[Served, Served]) -> None:
    for _ in range(2):
        key = pair[0].new_key("client")
        minute = int(time.time()) // 60
        answers = burst(pair, key, 70)
        if int(time.time()) // 60 == minute:
            break
    else:
        pytest.fail("two bursts in a row crossed a minute boundary")
    codes = [answer.status_code for answer in answers]
    assert codes == [200] * 60 + [429] * 10, codes
    window_end = (minute + 1) * 60
    for sent, answer in enumerate(answers[:60], start=1):
        assert answer.headers["X-RateLimit-Limit"] == "60"
        assert answer.headers["X-RateLimit-Remaining"] == str(60 - sent)
        assert int(answer.headers["X-RateLimit-Reset"]) == window_end
        assert "Retry-After" not in answer.headers
    for answer in answers[60:]:
        assert_429(answer)
        assert answer.headers["X-RateLimit-Remaining"] == "0"
        assert int(answer.headers["X-RateLimit-Reset"]) == window_end
    # Both servers took part in admitting and in refusing.
    assert {a.url.port for a in answers[:60]} == {a.url.port for a in answers[60:]}
    assert len({a.url.port for a in answers}) == 2
    # Another key of the same owner kind has its own budget.
    other = pair[1].new_key("client")
    fresh = pair[1].client(other).get("/v1/jobs")
    assert fresh.status_code == 200, fresh.text
    assert fresh.headers["X-RateLimit-Remaining"] == "59"
    # Still limited on either server until the window ends.
    if int(time.time()) // 60 == minute:
        assert_429(pair[0].client(key).get("/v1/jobs"))
        assert_429(pair[1].client(key).get("/v1/jobs"))


def test_a_configured_per_minute_limit_applies(serve_factory: Callable[..., Served]) -> None:
    served = serve_factory(env={**LIMITS_ON, "JOBLEDGER_RATE_LIMIT_PER_MINUTE": "5"})
    for _ in range(2):
        client = served.client(served.new_key("client"))
        minute = int(time.time()) // 60
        answers = [client.get("/v1/jobs") for _ in range(7)]
        if int(time.time()) // 60 == minute:
            break
    codes = [answer.status_code for answer in answers]
    assert codes == [200] * 5 + [429] * 2, codes
    assert [a.headers["X-RateLimit-Remaining"] for a in answers[:5]] == ["4", "3", "2", "1", "0"]
    assert all(a.headers["X-RateLimit-Limit"] == "5" for a in answers)
    assert_429(answers[5])


def test_health_and_schema_are_neither_limited_nor_authenticated(
    pair: tuple[Served, Served],
) -> None:
    served = pair[0]
    for path in ("/healthz", "/schema/openapi.json"):
        for _ in range(70):
            answer = httpx.get(served.url + path, timeout=30)
            assert answer.status_code == 200, (path, answer.text)
        assert "X-RateLimit-Limit" not in answer.headers
    assert "/v1/jobs" in httpx.get(served.url + "/schema/openapi.json").json()["paths"]


def test_without_a_key_the_answer_is_401_not_429(pair: tuple[Served, Served]) -> None:
    """An unauthenticated flood is refused as such and burns nobody's budget."""
    key = pair[0].new_key("client")
    for _ in range(65):
        answer = httpx.get(pair[0].url + "/v1/jobs", headers={"X-Api-Key": "garbage"})
        assert answer.status_code == 401
    assert pair[0].client(key).get("/v1/jobs").headers["X-RateLimit-Remaining"] == "59"


def test_two_hundred_concurrent_requests_admit_exactly_the_limit(
    pair: tuple[Served, Served],
) -> None:
    """200 requests at once from one key, over both processes: 60 pass, 140 are refused."""
    for _ in range(2):
        key = pair[0].new_key("client")
        bystander = pair[1].new_key("client")
        minute = int(time.time()) // 60
        clients = [served.client(key) for served in pair]
        with ThreadPoolExecutor(max_workers=50) as pool:
            answers = list(
                pool.map(lambda i, c=clients: c[i % 2].get("/v1/jobs"), range(200))  # type: ignore[misc]
            )
        if int(time.time()) // 60 == minute:
            break
    else:
        pytest.fail("two bursts in a row crossed a minute boundary")
    codes = Counter(answer.status_code for answer in answers)
    assert codes == {200: 60, 429: 140}, codes
    assert {a.url.port for a in answers if a.status_code == 200} == {
        a.url.port for a in answers
    }  # both processes admitted some
    for answer in answers:
        if answer.status_code == 429:
            assert_429(answer)
    # Another key is unaffected by the storm.
    other = pair[0].client(bystander).get("/v1/jobs")
    assert other.status_code == 200 and other.headers["X-RateLimit-Remaining"] == "59"
