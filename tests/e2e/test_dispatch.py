"""Jobs run end to end: served ledgers, miner agents in subprocesses, real NATS and PostgreSQL.

Leases are short here (3 s) so that lost miners are noticed quickly.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from app import protocol
from app.receipts import check_claims, decode_public_key, verify_receipt
from tests.e2e.conftest import Served
from tests.e2e.dispatch import (
    Miner,
    event_types,
    events,
    start_miner,
    status,
    submit,
    wait_all_terminal,
    wait_for,
    wait_status,
)
from tests.nats_names import fresh_prefix

FAST = {"JOBLEDGER_LEASE_SECONDS": "3", "JOBLEDGER_CANCEL_GRACE_SECONDS": "10"}


@pytest.fixture(scope="module")
def miners(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Miner]]:
    """Start miners; every one still running is stopped at the end of the module."""
    started: list[Miner] = []
    directory = tmp_path_factory.mktemp("miners")

    def start(served: Served, nats_url: str, gpu_type: str, **kwargs: Any) -> Miner:
        miner = start_miner(served, nats_url, directory, gpu_type, **kwargs)
        started.append(miner)
        return miner

    yield start
    for miner in started:
        miner.kill()


@pytest.fixture(scope="module")
def ledger(serve_factory: Callable[..., Served]) -> Served:
    """One ledger with short leases, shared by the tests that do not break it."""
    return serve_factory(env=FAST)


@pytest.fixture(scope="module")
def client(ledger: Served) -> httpx.Client:
    return ledger.client(ledger.new_key("client"))


def logs(*things: Served | Miner) -> Callable[[], str]:
    return lambda: "\n".join(f"--- {type(t).__name__} log ---\n{t.log()[-6000:]}" for t in things)


def test_the_seed_loop_echo_job_completes_with_its_result(
    ledger: Served, client: httpx.Client, miners: Callable[..., Miner], nats_url: str
) -> None:
    miner = miners(ledger, nats_url, "cpu")
    job_id = submit(client, "echo", "hello, miner")
    done = wait_status(client, job_id, {"completed"}, on_fail=logs(ledger, miner))

    assert done["miner_id"] == miner.miner_id
    # The seed's default format is json: the echoed text arrives as a JSON string.
    assert done["result"]["format"] == "json"
    assert json.loads(done["result"]["data"]) == "hello, miner"
    assert done["result"]["sha256"] and done["result"]["size_bytes"] == len('"hello, miner"')
    assert done["cost"] > 0 and done["progress"] == 100
    assert event_types(client, job_id) == [
        "JobSubmitted",
        "JobAssigned",
        "JobStarted",
        "JobCompleted",
    ]
    miner.stop()


def test_a_miners_completion_is_signed_by_the_key_it_registered(
    ledger: Served, client: httpx.Client, miners: Callable[..., Miner], nats_url: str
) -> None:
    miner = miners(ledger, nats_url, "cpu")
    job_id = submit(client, "echo", "signed and delivered")
    wait_status(client, job_id, {"completed"}, on_fail=logs(ledger, miner))

    listed = ledger.client(miner.key).get(f"/v1/miners/{miner.miner_id}/keys")
    assert listed.status_code == 200, listed.text
    [key] = listed.json()["keys"]
    assert key["status"] == "active"
    [done] = [e["data"] for e in events(client, job_id) if e["type"] == "JobCompleted"]
    receipt = msgspec.convert(done["receipt"], protocol.Receipt)
    assert receipt.key_id == key["key_id"]
    claims = verify_receipt(receipt, decode_public_key(key["public_key"]))
    check_claims(
        claims,
        job_id=job_id,
        attempt=done["attempt"],
        miner_id=miner.miner_id,
        result_sha256=done["result"]["sha256"],
        result_size_bytes=done["result"]["size_bytes"],
    )
    assert msgspec.to_builtins(claims.metrics) == done["metrics"]
    key_file = (
        miner.log_path.parent
        / f"miner-home-{miner.miner_id}"
        / "miner-work"
        / "keys"
        / f"{miner.miner_id}.ed25519"
    )
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert miner.stop() == 0

    # The key routes: registering an active key again changes nothing; garbage is a 422.
    routes = f"/v1/miners/{miner.miner_id}/keys"
    own = ledger.client(miner.key)
    again = own.post(routes, json={"public_key": key["public_key"]})
    assert (again.status_code, again.json()) == (200, key)
    garbage = own.post(routes, json={"public_key": "bm90IGEga2V5"})
    assert garbage.status_code == 422 and "public_key" in garbage.text
    assert ledger.client(ledger.new_key("auditor")).get(routes).json() == {"keys": [key]}
    assert ledger.client(ledger.new_key("client")).get(routes).status_code == 403
    assert own.delete(f"{routes}/ed25519:{'0' * 32}").status_code == 404

    # Revoked, the key is refused: the restarted agent says which file to delete, and exits.
    revoked = ledger.client(ledger.admin_key).delete(f"{routes}/{key['key_id']}")
    assert revoked.status_code == 200, revoked.text
    assert revoked.json() == key | {"status": "revoked"}
    assert own.post(routes, json={"public_key": key["public_key"]}).status_code == 409
    restarted = miners(ledger, nats_url, "cpu", key=(miner.miner_id, miner.key))
    assert restarted.process is not None
    assert restarted.process.wait(60) == 2
    assert f"delete {key_file}" in restarted.log()


def test_each_miner_receives_only_jobs_matching_its_gpu_type(
    ledger: Served, client: httpx.Client, miners: Callable[..., Miner], nats_url: str
) -> None:
    t4 = miners(ledger, nats_url, "t4", max_concurrent=3)
    a100 = miners(ledger, nats_url, "NVIDIA A100-SXM4-80GB", max_concurrent=3)
    wanted = {
        submit(client, "echo", f"job {n}", gpu_type="t4" if n % 2 else "a100"): (
            t4 if n % 2 else a100
        )
        for n in range(20)
    }
    final = wait_all_terminal(client, list(wanted), 60, logs(ledger, t4, a100))

    for job_id, miner in wanted.items():
        assert final[job_id]["status"] == "completed"
        assert final[job_id]["miner_id"] == miner.miner_id
    t4.stop()
    a100.stop()


def test_a_job_no_miner_can_run_stays_pending_with_a_reason(
    client: httpx.Client, ledger: Served
) -> None:
    job_id = submit(client, "echo", "x", gpu_type="b200")
    view = wait_for(
        lambda: (s := status(client, job_id)).get("pending_reason") and s,
        15,
        "a pending_reason",
        logs(ledger),
    )
    assert view["status"] == "pending"
    assert "no registered miner offers 1x b200" in view["pending_reason"]


def test_unknown_model_fails_with_a_clear_error_code(
    ledger: Served, client: httpx.Client, miners: Callable[..., Miner], nats_url: str
) -> None:
    miner = miners(ledger, nats_url, "l4")
    job_id = submit(client, "no-such-model", "x", gpu_type="l4")
    view = wait_status(client, job_id, {"failed"}, on_fail=logs(ledger, miner))
    assert view["error_code"] == "unknown_model"
    assert "no-such-model" in view["error"]
    miner.stop()


def test_cancel_reaches_a_running_sleep_job(
    ledger: Served, client: httpx.Client, miners: Callable[..., Miner], nats_url: str
) -> None:
    miner = miners(ledger, nats_url, "rtx4090")
    job_id = submit(client, "sleep", "120", gpu_type="rtx4090")
    wait_for(lambda: status(client, job_id)["progress"] > 0, 30, "progress", logs(ledger, miner))

    answer = client.delete(f"/v1/jobs/{job_id}")
    assert answer.status_code == 202, answer.text
    assert answer.json()["status"] == "canceling"

    wait_status(client, job_id, {"canceled"}, timeout=20, on_fail=logs(ledger, miner))
    history = events(client, job_id)
    assert [e["type"] for e in history][-2:] == ["JobCancelRequested", "JobCanceled"]
    assert history[-1]["data"]["reason"] == "stopped by miner"
    # Progress came in between, always forward.
    progress = [e["data"]["progress"] for e in history if e["type"] == "JobProgressReported"]
    assert progress and progress == sorted(set(progress))
    miner.stop()


def test_timeout_is_enforced_and_the_miner_is_told_to_stop(
    ledger: Served, client: httpx.Client, miners: Callable[..., Miner], nats_url: str
) -> None:
    miner = miners(ledger, nats_url, "a10", max_concurrent=1)
    slow = submit(client, "sleep", "60", gpu_type="a10", timeout_seconds=2)
    view = wait_status(client, slow, {"timed_out"}, timeout=30, on_fail=logs(ledger, miner))
    assert view["error_code"] == "timed_out"
    # The miner stopped the attempt and freed its only slot for the next job.
    quick = submit(client, "echo", "next", gpu_type="a10")
    wait_status(client, quick, {"completed"}, timeout=30, on_fail=logs(ledger, miner))
    assert "cancel order for " + slow in miner.log()
    miner.stop()


def test_a_miner_killed_mid_job_loses_its_job_to_another_miner(
    ledger: Served, client: httpx.Client, miners: Callable[..., Miner], nats_url: str
) -> None:
    doomed = miners(ledger, nats_url, "v100", max_concurrent=1)
    job_id = submit(client, "sleep", "3", gpu_type="v100")
    wait_status(client, job_id, {"running"}, on_fail=logs(ledger, doomed))
    survivor = miners(ledger, nats_url, "v100", max_concurrent=1)
    doomed.kill()

    view = wait_status(
        client, job_id, {"completed"}, timeout=60, on_fail=logs(ledger, doomed, survivor)
    )
    assert view["miner_id"] == survivor.miner_id
    assert view["attempt"] == 2
    history = events(client, job_id)
    requeues = [e for e in history if e["type"] == "JobRequeued"]
    assert [(e["data"]["cause"], e["data"]["previous_miner_id"]) for e in requeues] == [
        ("lease_expired", doomed.miner_id)
    ]
    assert [e["type"] for e in history].count("JobCompleted") == 1
    survivor.stop()


def test_a_draining_miner_hands_back_what_it_cannot_finish(
    ledger: Served, client: httpx.Client, miners: Callable[..., Miner], nats_url: str
) -> None:
    leaving = miners(ledger, nats_url, "l40", max_concurrent=1, extra=["--drain-seconds", "1"])
    job_id = submit(client, "sleep", "30", gpu_type="l40")
    wait_status(client, job_id, {"running"}, on_fail=logs(ledger, leaving))

    assert leaving.stop() == 0
    view = wait_status(client, job_id, {"pending"}, timeout=20, on_fail=logs(ledger, leaving))
    assert view["attempt"] == 2
    requeued = [e for e in events(client, job_id) if e["type"] == "JobRequeued"]
    assert requeued[-1]["data"]["cause"] == "miner_released"


def test_two_hundred_jobs_of_mixed_priority_on_two_ledgers_all_complete_once(
    serve_factory: Callable[..., Served],
    make_database: Callable[[], str],
    miners: Callable[..., Miner],
    nats_url: str,
) -> None:
    database = make_database()
    shared = FAST | {"JOBLEDGER_NATS_PREFIX": fresh_prefix()}
    first = serve_factory(database_url=database, env=shared)
    second = serve_factory(database_url=database, env=shared)  # a second scheduler and relay
    key = first.new_key("client")
    clients = [first.client(key), second.client(key)]
    inputs: dict[str, str] = {}
    priorities = ["low", "normal", "high", "urgent"]
    for n in range(200):
        text = f"job-{n}-{secrets.token_hex(4)}"
        inputs[submit(clients[n % 2], "echo", text, priority=priorities[n % 4])] = text
    workers = [miners(first, nats_url, "cpu", max_concurrent=4) for _ in range(2)]

    final = wait_all_terminal(clients[0], list(inputs), 120, logs(first, second, *workers))

    assert Counter(view["status"] for view in final.values()) == {"completed": 200}
    results = {json.loads(final[job_id]["result"]["data"]) for job_id in inputs}
    assert results == set(inputs.values())
    for job_id in inputs:
        kinds = Counter(event_types(clients[0], job_id))
        assert kinds["JobAssigned"] == 1 + kinds["JobRequeued"], job_id
        assert kinds["JobCompleted"] == 1, job_id
    used = {view["miner_id"] for view in final.values()}
    assert used == {w.miner_id for w in workers}


def test_urgent_jobs_are_started_before_earlier_low_priority_ones(
    ledger: Served, client: httpx.Client, miners: Callable[..., Miner], nats_url: str
) -> None:
    low = [submit(client, "echo", f"low {n}", gpu_type="a40", priority="low") for n in range(5)]
    urgent = [
        submit(client, "echo", f"urgent {n}", gpu_type="a40", priority="urgent") for n in range(5)
    ]
    miner = miners(ledger, nats_url, "a40", max_concurrent=1)
    final = wait_all_terminal(client, low + urgent, 60, logs(ledger, miner))
    started = sorted(low + urgent, key=lambda job_id: final[job_id]["started_at"])
    assert started == urgent + low
    miner.stop()


def stream_events(nats_url: str, prefix: str) -> dict[str, list[int]]:
    """Every message of the events stream: versions per aggregate, in stream order."""

    async def read() -> dict[str, list[int]]:
        connection = await nats.connect(nats_url)
        try:
            js = connection.jetstream()
            stream = prefix.upper() + "_EVENTS"
            info = await js.stream_info(stream)
            subscription = await js.pull_subscribe(
                f"{prefix}.events.>",
                stream=stream,
                config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL),
            )
            versions: dict[str, list[int]] = defaultdict(list)
            seen = 0
            while seen < info.state.messages:
                for message in await subscription.fetch(500, timeout=5):
                    body = json.loads(message.data)
                    versions[body["aggregate_id"]].append(body["version"])
                    seen += 1
            return versions
        finally:
            await connection.close()

    return asyncio.run(read())


def test_a_relay_killed_mid_run_loses_no_message_and_duplicates_none(
    serve_factory: Callable[..., Served],
    make_database: Callable[[], str],
    miners: Callable[..., Miner],
    nats_url: str,
) -> None:
    database = make_database()
    shared = FAST | {"JOBLEDGER_NATS_PREFIX": fresh_prefix()}
    doomed = serve_factory(database_url=database, env=shared)
    key = doomed.new_key("client")
    client = doomed.client(key)
    worker = miners(doomed, nats_url, "cpu", max_concurrent=4)
    job_ids = [submit(client, "sleep", "0.3") for _ in range(40)]
    wait_for(
        lambda: sum(status(client, j)["status"] == "completed" for j in job_ids[:10]) >= 3,
        60,
        "some jobs done",
        logs(doomed, worker),
    )
    doomed.process.kill()  # SIGKILL: the relay dies wherever it was
    doomed.process.wait()

    successor = serve_factory(database_url=database, env=shared)
    client = successor.client(key)
    final = wait_all_terminal(client, job_ids, 120, logs(successor, worker))
    assert Counter(view["status"] for view in final.values()) == {"completed": 40}

    def relayed_everything() -> dict[str, list[int]] | None:
        published = stream_events(nats_url, shared["JOBLEDGER_NATS_PREFIX"])
        expected = {job_id: len(events(client, job_id)) for job_id in job_ids}
        done = all(len(published.get(job_id, [])) >= n for job_id, n in expected.items())
        return published if done else None

    published = wait_for(relayed_everything, 30, "the relay to catch up", logs(successor))
    for job_id in job_ids:
        count = len(events(client, job_id))
        # Every event exactly once, in order.
        assert published[job_id] == list(range(1, count + 1)), job_id


def test_a_nats_restart_mid_run_loses_no_job(
    serve_factory: Callable[..., Served],
    miners: Callable[..., Miner],
    tmp_path: Path,
) -> None:
    from app.embedded import EmbeddedNats

    store = tmp_path / "nats"
    broker = EmbeddedNats(store)
    url = broker.start()
    port = broker.port
    try:
        served = serve_factory(env={"JOBLEDGER_LEASE_SECONDS": "5"}, nats_url=url)
        client = served.client(served.new_key("client"))
        worker = miners(served, url, "cpu", max_concurrent=4)
        job_ids = [submit(client, "sleep", "0.5") for _ in range(30)]
        wait_for(
            lambda: any(status(client, j)["status"] == "completed" for j in job_ids),
            60,
            "a first completion",
            logs(served, worker),
        )
        broker.stop()
        time.sleep(7)  # longer than the lease: silence from miners the ledger cannot hear
        broker = EmbeddedNats(store, port=port)
        broker.start()

        final = wait_all_terminal(client, job_ids, 120, logs(served, worker))
        assert Counter(view["status"] for view in final.values()) == {"completed": 30}
        for job_id in job_ids:
            assert event_types(client, job_id).count("JobCompleted") == 1
        # The outage cost no lease: nobody's heartbeats could arrive, so none expired.
        assert {view["attempt"] for view in final.values()} == {1}
        worker.stop()
    finally:
        broker.stop()


def test_cancel_finishes_without_a_miner_that_died(
    ledger: Served, client: httpx.Client, miners: Callable[..., Miner], nats_url: str
) -> None:
    miner = miners(ledger, nats_url, "h200", max_concurrent=1)
    job_id = submit(client, "sleep", "120", gpu_type="h200")
    wait_status(client, job_id, {"running"}, on_fail=logs(ledger, miner))
    miner.kill()

    assert client.delete(f"/v1/jobs/{job_id}").status_code == 202
    wait_status(client, job_id, {"canceled"}, timeout=30, on_fail=logs(ledger))
    canceled = events(client, job_id)[-1]
    assert canceled["type"] == "JobCanceled"
    assert canceled["data"]["reason"] == "the miner is gone"


def test_a_miner_that_restarts_and_forgets_its_job_gets_it_again_as_a_new_attempt(
    ledger: Served, client: httpx.Client, miners: Callable[..., Miner], nats_url: str
) -> None:
    first = miners(ledger, nats_url, "mi300x", max_concurrent=1)
    job_id = submit(client, "sleep", "2", gpu_type="mi300x")
    wait_status(client, job_id, {"running"}, on_fail=logs(ledger, first))
    first.kill()
    # The same miner, back at once: alive, but it no longer knows the attempt.
    again = miners(ledger, nats_url, "mi300x", max_concurrent=1, key=(first.miner_id, first.key))

    view = wait_status(client, job_id, {"completed"}, timeout=60, on_fail=logs(ledger, again))
    assert view["attempt"] == 2
    assert view["miner_id"] == first.miner_id
    causes = [e["data"]["cause"] for e in events(client, job_id) if e["type"] == "JobRequeued"]
    assert causes == ["lost_by_miner"]
    again.stop()
