"""The HTTP layer's request ids and path ids, on a small Litestar app run in-process."""

from __future__ import annotations

import pytest
from litestar import Litestar, get
from litestar.exceptions import NotAuthorizedException
from litestar.testing import TestClient

from app.api.observability import BindPathIds, RequestObserver
from app.logs import current_ids

# The app's own handlers declare path parameters this way too (Litestar warns about it).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@get("/things/{job_id:str}")
async def thing(job_id: str) -> dict[str, str]:
    return current_ids()


@get("/refused")
async def refused() -> None:
    raise NotAuthorizedException("no key")


def app() -> Litestar:
    made = Litestar([thing, refused], middleware=[BindPathIds()])
    made.asgi_handler = RequestObserver(made.asgi_handler)
    return made


def test_a_handler_logs_with_the_request_id_and_the_job_of_its_path() -> None:
    with TestClient(app()) as client:
        answer = client.get("/things/job_42", headers={"X-Request-Id": "abc-123"})
    assert answer.status_code == 200
    assert answer.json() == {"request_id": "abc-123", "job_id": "job_42"}
    assert answer.headers["x-request-id"] == "abc-123"


def test_every_answer_carries_a_request_id_errors_included() -> None:
    with TestClient(app()) as client:
        unmatched = client.get("/nowhere")
        error = client.get("/refused", headers={"X-Request-Id": "bad id"})
    assert unmatched.status_code == 404 and len(unmatched.headers["x-request-id"]) == 32
    assert error.status_code == 401 and len(error.headers["x-request-id"]) == 32
    assert unmatched.headers["x-request-id"] != error.headers["x-request-id"]
