"""Every relayed event is published under the public id of its own aggregate."""

from uuid import uuid4

from app.relay import aggregate_id_of_event
from domain.files import File
from domain.miners import Miner
from tests.unit.job_builders import RIG, submitted


def test_each_aggregate_is_named_by_its_own_kind_of_id() -> None:
    job = submitted()
    file = File.upload(
        owner="alice",
        sha256="0" * 64,
        size_bytes=1,
        content_type="text/plain",
        filename=None,
        location=f"local:files/{uuid4().hex}",
    )
    file.use(job.job_id)
    miner = Miner.register("rig", RIG)
    ids = {
        aggregate_id_of_event(event)
        for aggregate in (job, file, miner)
        for event in aggregate.collect_events()
    }
    assert ids == {job.job_id, file.file_id, miner.miner_id}
