"""The pure pieces of /metrics: lags, consumer labels, families, request ids and HTTP counts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, cast

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from app.api.observability import accepted_request_id
from app.metrics import (
    ConsumerBacklog,
    DatabaseFacts,
    Lag,
    LedgerMetrics,
    LedgerProbe,
    NatsFacts,
    Snapshot,
    consumer_label,
    families,
    lag_of,
    summed_backlogs,
)
from app.protocol import Namespace

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def exposed(snapshot: Snapshot) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The snapshot's families rendered and parsed back, as Prometheus would read them."""

    class Facts:
        def collect(self) -> Any:
            return families(snapshot)

    registry = CollectorRegistry()
    registry.register(Facts())  # type: ignore[arg-type]
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    }


def test_a_caught_up_reader_has_no_lag() -> None:
    assert lag_of(head=7, position=7, oldest_unprocessed=None, now=NOW) == Lag(0, 0.0)
    # The tracking row can briefly be ahead of a head read a moment earlier: still no lag.
    assert lag_of(head=7, position=8, oldest_unprocessed=NOW, now=NOW) == Lag(0, 0.0)


def test_a_reader_behind_is_as_late_as_its_oldest_unprocessed_event() -> None:
    lag = lag_of(head=10, position=4, oldest_unprocessed=NOW - timedelta(seconds=90), now=NOW)
    assert lag == Lag(events=6, seconds=90.0)
    # A writer's clock slightly ahead of ours never makes the lag negative.
    ahead = lag_of(head=10, position=4, oldest_unprocessed=NOW + timedelta(seconds=1), now=NOW)
    assert ahead == Lag(events=6, seconds=0.0)


def test_only_the_ledgers_own_consumers_keep_their_names() -> None:
    namespace = Namespace()
    assert consumer_label(namespace, "ingestor") == "ingestor"
    assert consumer_label(namespace, "assignments_miner_ab12") == "assignments_miner_ab12"
    assert consumer_label(namespace, "control_miner_ab12") == "control_miner_ab12"
    assert consumer_label(namespace, "Xy7ephemeral1") == "other"
    assert consumer_label(namespace, "watch_job_0123") == "other"
    summed = summed_backlogs(
        [
            ConsumerBacklog("S_EVENTS", "other", pending=3, ack_pending=1),
            ConsumerBacklog("S_REPORTS", "ingestor", pending=0, ack_pending=2),
            ConsumerBacklog("S_EVENTS", "other", pending=4, ack_pending=0),
        ]
    )
    assert summed == [
        ConsumerBacklog("S_EVENTS", "other", pending=7, ack_pending=1),
        ConsumerBacklog("S_REPORTS", "ingestor", pending=0, ack_pending=2),
    ]


def test_every_status_is_exposed_even_at_zero() -> None:
    snapshot = Snapshot(
        database=DatabaseFacts(
            up=True,
            jobs={"completed": 3, "pending": 1},
            miners={"online": 1},
            head=40,
            projection=Lag(0, 0.0),
            relay=Lag(2, 1.5),
        ),
        nats=NatsFacts(
            up=True,
            stream_messages={"S_REPORTS": 0},
            consumers=[ConsumerBacklog("S_REPORTS", "ingestor", pending=5, ack_pending=2)],
        ),
    )
    samples = exposed(snapshot)
    jobs = {
        dict(labels)["status"]: v for (n, labels), v in samples.items() if n == "jobledger_jobs"
    }
    assert jobs == {
        "pending": 1,
        "assigned": 0,
        "running": 0,
        "canceling": 0,
        "completed": 3,
        "failed": 0,
        "canceled": 0,
        "timed_out": 0,
    }
    assert samples[("jobledger_miners", frozenset({("status", "offline")}))] == 0
    assert samples[("jobledger_relay_lag_seconds", frozenset())] == 1.5
    assert samples[("jobledger_log_position", frozenset())] == 40
    backlog = frozenset({("stream", "S_REPORTS"), ("consumer", "ingestor")})
    assert samples[("jobledger_nats_consumer_pending", backlog)] == 5
    assert samples[("jobledger_nats_consumer_ack_pending", backlog)] == 2


def test_a_dependency_that_is_down_says_so_and_its_metrics_are_absent() -> None:
    samples = exposed(Snapshot(database=DatabaseFacts(up=False), nats=NatsFacts(up=False)))
    assert samples == {
        ("jobledger_postgres_up", frozenset()): 0,
        ("jobledger_nats_up", frozenset()): 0,
    }


def test_http_labels_stay_bounded() -> None:
    metrics = LedgerMetrics(CollectorRegistry(), cast(LedgerProbe, None))
    metrics.observe_request("GET", "/v1/jobs/{job_id}", 200, 0.01)
    metrics.observe_request("BREW", None, 405, 0.001)
    metrics.observe_request("GET", None, 404, 0.001)
    text = generate_latest(metrics.registry).decode()
    assert (
        'jobledger_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="200"} 1.0'
        in text
    )
    assert (
        'jobledger_http_requests_total{method="OTHER",route="unmatched",status="405"} 1.0' in text
    )
    assert 'jobledger_http_requests_total{method="GET",route="unmatched",status="404"} 1.0' in text
    # Two processes' worth of metrics in one interpreter: registries are not shared.
    again = LedgerMetrics(CollectorRegistry(), cast(LedgerProbe, None))
    assert "jobledger_http_requests_total{" not in generate_latest(again.registry).decode()


def test_a_request_id_is_kept_only_if_it_is_a_plain_token() -> None:
    for kept in ("4bf92f3577b34da6a3ce929d0e0e4736", "trace-1.2:3", "01HV6Z5K3Q9YB2V8X0M7T4R1CE"):
        assert accepted_request_id(kept) == kept
    for replaced in (None, "", "two words", "line\r\nbreak", "x" * 200, '"quoted"', "-leading"):
        fresh = accepted_request_id(replaced)
        assert fresh != replaced and len(fresh) == 32
        assert int(fresh, 16) >= 0  # hex
