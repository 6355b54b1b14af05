"""compose.yaml's topology in miniature: two `serve --role api` replicas, one `--role workers`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from app.miner.agent import HEARTBEAT_FILE
from tests.e2e.conftest import Served, fresh_prefix
from tests.e2e.dispatch import start_miner, submit, wait_all_terminal

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def shared(
    make_database: Callable[[], str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """What the processes of one deployment share: database, subjects, blobs and audit key."""
    home = tmp_path_factory.mktemp("shared-home")
    return {
        "JOBLEDGER_DATABASE_URL": make_database(),
        "JOBLEDGER_NATS_PREFIX": fresh_prefix(),
        "JOBLEDGER_HOME": str(home),
        # An API replica that waits for no projector answers after this long.
        "JOBLEDGER_VIEW_WAIT_SECONDS": "1",
    }


@pytest.fixture(scope="module")
def replicas(serve_factory: Callable[..., Served], shared: dict[str, str]) -> list[Served]:
    database = shared["JOBLEDGER_DATABASE_URL"]
    return [
        serve_factory(database_url=database, env=shared | {"JOBLEDGER_ROLE": "api"})
        for _ in range(2)
    ]


def test_api_replicas_record_jobs_that_only_a_workers_process_runs(
    replicas: list[Served],
    serve_factory: Callable[..., Served],
    shared: dict[str, str],
    nats_url: str,
    tmp_path: Path,
) -> None:
    key = replicas[0].new_key("client")
    clients = [replica.client(key) for replica in replicas]
    waiting = submit(clients[1], "echo", "before the workers")

    # No replica runs a projector (nor a scheduler): the job is in the log, not in the list.
    assert clients[0].get(f"/v1/jobs/{waiting}").json()["status"] == "pending"
    assert clients[0].get("/v1/jobs").json()["total"] == 0

    workers = serve_factory(
        database_url=shared["JOBLEDGER_DATABASE_URL"], env=shared | {"JOBLEDGER_ROLE": "workers"}
    )
    # Miners come after the workers: a miner learns who it is from the miner views.
    miner = start_miner(replicas[0], nats_url, tmp_path, "cpu")
    later = [submit(clients[n % 2], "echo", f"job {n}") for n in range(6)]
    final = wait_all_terminal(
        clients[0], [waiting, *later], 60, lambda: workers.log() + miner.log()
    )

    assert {view["status"] for view in final.values()} == {"completed"}
    assert json.loads(final[waiting]["result"]["data"]) == "before the workers"
    # Each replica reads every job, and downloads what a miner uploaded through the other.
    for client in clients:
        assert client.get(f"/v1/jobs/{later[0]}/download").status_code == 200
    # The workers process answers health checks and nothing of the client API.
    assert httpx.get(workers.url + "/healthz", timeout=10).status_code == 200
    assert httpx.get(workers.url + "/v1/jobs", headers={"X-Api-Key": key}).status_code == 404
    # One deployment, one audit key: replicas publish the key the sealer signs with.
    auditor = replicas[0].new_key("auditor")
    keys = {
        replica.client(auditor).get("/v1/audit/key").json()["public_key"] for replica in replicas
    }
    assert len(keys) == 1
    # What the miner container's health check reads: touched after each heartbeat.
    assert (tmp_path / f"miner-home-{miner.miner_id}" / "miner-work" / HEARTBEAT_FILE).exists()
    assert miner.stop() == 0
