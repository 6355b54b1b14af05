"""GET /v1/jobs/throughput: how many jobs were submitted per hour or day, by status.

The dashboard's chart reads it; anyone may (a client sees its own jobs only). Counted
in SQL over the job views, never row by row in Python.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from litestar import Controller, Request, get
from litestar.datastructures import State
from litestar.openapi.spec import Example
from litestar.params import Parameter

from app.api import openapi
from app.api.auth import allow, owner_filter
from app.api.errors import LedgerResponse
from app.api.jobs import READERS, parse_bound, services_of
from app.api.schemas import (
    ThroughputBucketCounts,
    ThroughputBucketSize,
    ThroughputResponse,
    ThroughputTotals,
)
from app.keys import Principal
from domain.errors import InvalidJobRequest
from projections.queries import BUCKET_LENGTHS, bucket_count, bucket_start

# At most this many buckets in one answer; a wider window is a 422, never cut short.
MAX_BUCKETS = 1000
# The window when `from` is not given: the last 24 hours, or the last 30 days.
DEFAULT_BUCKETS = {"hour": 24, "day": 30}

THROUGHPUT_EXAMPLE: dict[str, Any] = {
    "from": "2026-02-13T08:00:00Z",
    "to": "2026-02-13T09:59:59.999999Z",
    "bucket": "hour",
    "buckets": [
        {"start": "2026-02-13T08:00:00Z", "jobs": 0, "by_status": {}},
        {
            "start": "2026-02-13T09:00:00Z",
            "jobs": 5,
            "by_status": {"completed": 3, "failed": 1, "running": 1},
        },
    ],
    "totals": {"jobs": 5, "by_status": {"completed": 3, "failed": 1, "running": 1}},
}


def window(
    window_from: str | None, window_to: str | None, bucket: str, now: datetime
) -> tuple[datetime, datetime]:
    """The inclusive window asked for, with the defaults filled in and its size checked."""
    end = parse_bound(window_to, "to", end=True) if window_to else now
    if window_from:
        start = parse_bound(window_from, "from", end=False)
    else:
        back = BUCKET_LENGTHS[bucket] * (DEFAULT_BUCKETS[bucket] - 1)
        earliest = datetime.min.replace(tzinfo=UTC)
        # Whole buckets: the first starts on the hour (or at midnight UTC).
        start = bucket_start(end - back if end - earliest > back else earliest, bucket)
    if start > end:
        raise InvalidJobRequest("from must not be after to", details={"field": "from"})
    count = bucket_count(start, end, bucket)
    if count > MAX_BUCKETS:
        raise InvalidJobRequest(
            f"the window spans {count} {bucket} buckets; at most {MAX_BUCKETS} are answered: "
            "narrow it" + (" or ask for bucket=day" if bucket == "hour" else ""),
            details={"field": "from", "buckets": count, "max_buckets": MAX_BUCKETS},
        )
    return start, end


class ThroughputController(Controller):
    """/v1/jobs/throughput: jobs submitted over time, for charts and capacity planning."""

    path = "/v1/jobs/throughput"
    tags = ["jobs"]
    response_class = LedgerResponse

    @get(
        "/",
        guards=[allow(*READERS)],
        summary="Jobs submitted per hour or day, by status",
        responses={
            200: openapi.response(
                ThroughputResponse, "counts per bucket, oldest first", THROUGHPUT_EXAMPLE
            ),
            **openapi.errors(401, 403, 422, 429),
        },
    )
    async def throughput(
        self,
        request: Request[Principal, Any, Any],
        state: State,
        window_from: Annotated[
            str | None,
            Parameter(
                query="from",
                description="YYYY-MM-DD or RFC 3339; default: the start of the hour 23 hours "
                "(bucket=hour) or of the day 29 days (bucket=day) before `to`: 24 or 30 buckets",
                examples=[Example(value="2026-01-01")],
            ),
        ] = None,
        window_to: Annotated[
            str | None,
            Parameter(
                query="to",
                description="YYYY-MM-DD (the whole day) or RFC 3339, inclusive; default: now",
                examples=[Example(value="2026-01-31")],
            ),
        ] = None,
        bucket: Annotated[
            ThroughputBucketSize,
            Parameter(description="bucket size; buckets are UTC hours or days"),
        ] = "hour",
    ) -> ThroughputResponse:
        """Jobs created in the window per UTC hour or day, each split by the job's status now.

        Every bucket the window touches is listed, empty ones too, oldest first; a
        window of more than 1000 buckets is a 422. A client counts its own jobs only.
        """
        start, end = window(window_from, window_to, bucket, datetime.now(UTC))
        services = services_of(state)
        found = await services.queries.throughput(
            owner=owner_filter(request.user), start=start, end=end, bucket=bucket
        )
        totals: dict[str, int] = {}
        for counted in found:
            for status, count in counted.by_status.items():
                totals[status] = totals.get(status, 0) + count
        return ThroughputResponse(
            window_from=start,
            window_to=end,
            bucket=bucket,
            buckets=[
                ThroughputBucketCounts(
                    start=b.start, jobs=sum(b.by_status.values()), by_status=b.by_status
                )
                for b in found
            ],
            totals=ThroughputTotals(jobs=sum(totals.values()), by_status=totals),
        )
