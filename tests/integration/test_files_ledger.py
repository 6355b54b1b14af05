"""Files and stored results on the real event store: dedup, ownership, deletion, fencing."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import pytest

from app.store import FileFacts, JobLedger
from domain.errors import (
    FileInUse,
    FileNotFound,
    InvalidJobRequest,
    JobNotFound,
    NotFound,
)
from tests.integration.helpers import spec

DIGEST = hashlib.sha256(b"prompts").hexdigest()


def upload(ledger: JobLedger, owner: str = "alice", sha256: str = DIGEST, where: str = "a"):
    return ledger.upload_file(
        owner=owner,
        sha256=sha256,
        size_bytes=7,
        content_type="text/plain",
        filename="prompts.txt",
        location=f"local:files/{where}",
    )


def test_the_same_bytes_from_one_owner_are_one_file(ledger: JobLedger) -> None:
    first = upload(ledger, where="a")
    again = upload(ledger, where="b")
    assert first.created and not again.created
    assert again.file.file_id == first.file.file_id
    # The copy stored second is the caller's to remove; the file keeps the first.
    assert again.file.location == "local:files/a"


def test_owners_do_not_share_files(ledger: JobLedger) -> None:
    alice = upload(ledger, owner="alice")
    bob = upload(ledger, owner="bob", where="b")
    assert alice.file.file_id != bob.file.file_id
    with pytest.raises(FileNotFound):
        ledger.file(alice.file.file_id, owner="bob")
    assert ledger.file(alice.file.file_id, owner=None).owner == "alice"  # auditors see all


def test_racing_uploads_of_the_same_bytes_make_one_file(ledger: JobLedger) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(lambda n: upload(ledger, where=f"u{n}"), range(8)))
    assert len({o.file.file_id for o in outcomes}) == 1
    assert sum(o.created for o in outcomes) == 1


def test_a_job_can_take_its_owners_file(ledger: JobLedger) -> None:
    file = upload(ledger).file
    outcome = ledger.submit(
        owner="alice", spec=spec(input_text=None, input_file_id=file.file_id), idempotency_key=None
    )
    job = ledger.job(outcome.job_id)
    assert (job.input_file_id, job.input_sha256, job.input_size_bytes) == (file.file_id, DIGEST, 7)
    assert ledger.file(file.file_id, owner="alice").used_by == outcome.job_id


@pytest.mark.parametrize("case", ["unknown", "someone_elses", "deleted", "malformed"])
def test_a_job_naming_a_file_it_cannot_use_is_refused(ledger: JobLedger, case: str) -> None:
    file = upload(ledger, owner="bob" if case == "someone_elses" else "alice").file
    file_id = {
        "unknown": "file_" + "0" * 32,
        "malformed": "file_../../etc/passwd",
    }.get(case, file.file_id)
    if case == "deleted":
        ledger.delete_file(file.file_id, owner="alice")
    with pytest.raises(InvalidJobRequest) as refused:
        ledger.submit(
            owner="alice", spec=spec(input_text=None, input_file_id=file_id), idempotency_key=None
        )
    assert refused.value.details["field"] == "input"


def test_a_used_file_cannot_be_deleted(ledger: JobLedger) -> None:
    file = upload(ledger).file
    job = ledger.submit(
        owner="alice", spec=spec(input_text=None, input_file_id=file.file_id), idempotency_key=None
    )
    with pytest.raises(FileInUse) as refused:
        ledger.delete_file(file.file_id, owner="alice")
    assert refused.value.details["used_by"] == job.job_id


def test_an_unused_file_is_deleted_and_can_come_back(ledger: JobLedger) -> None:
    file = upload(ledger, where="a").file
    assert ledger.delete_file(file.file_id, owner="alice") == "local:files/a"
    with pytest.raises(FileNotFound):
        ledger.file(file.file_id, owner="alice")
    with pytest.raises(FileNotFound):
        ledger.delete_file(file.file_id, owner="alice")
    back = upload(ledger, where="b")
    assert back.created and back.file.file_id == file.file_id
    assert back.file.location == "local:files/b"


def test_delete_racing_first_use_leaves_a_consistent_answer(ledger: JobLedger) -> None:
    """Either the job got the file (and it is kept) or the delete won (and the job is refused)."""
    for round_number in range(10):
        file = upload(ledger, sha256=hashlib.sha256(bytes([round_number])).hexdigest()).file

        def use(file: FileFacts = file) -> str:
            try:
                return ledger.submit(
                    owner="alice",
                    spec=spec(input_text=None, input_file_id=file.file_id),
                    idempotency_key=None,
                ).job_id
            except InvalidJobRequest:
                return "refused"

        def delete(file: FileFacts = file) -> str:
            try:
                ledger.delete_file(file.file_id, owner="alice")
            except (FileInUse, FileNotFound):
                return "kept"
            return "deleted"

        with ThreadPoolExecutor(max_workers=2) as pool:
            submitted, deleted = pool.submit(use), pool.submit(delete)
            outcome = (submitted.result() == "refused", deleted.result())
        assert outcome in {(True, "deleted"), (False, "kept")}


def test_only_the_holder_of_the_attempt_fetches_input_and_stores_results(
    ledger: JobLedger,
) -> None:
    file = upload(ledger).file
    job_id = ledger.submit(
        owner="alice", spec=spec(input_text=None, input_file_id=file.file_id), idempotency_key=None
    ).job_id
    ledger.change_job(job_id, lambda job: job.assign("miner_a"))
    facts = ledger.attempt_input(job_id, miner_id="miner_a", attempt=1)
    assert (facts.location, facts.sha256, facts.size_bytes) == ("local:files/a", DIGEST, 7)
    for miner, attempt in (("miner_b", 1), ("miner_a", 2)):
        with pytest.raises(JobNotFound):
            ledger.attempt_input(job_id, miner_id=miner, attempt=attempt)
        with pytest.raises(JobNotFound):
            ledger.store_result(
                job_id,
                miner_id=miner,
                attempt=attempt,
                location="local:results/x",
                size_bytes=1,
                sha256=DIGEST,
                content_type="application/json",
            )
    ledger.store_result(
        job_id,
        miner_id="miner_a",
        attempt=1,
        location="local:results/x",
        size_bytes=1,
        sha256=DIGEST,
        content_type="application/json",
    )
    stored = ledger.job(job_id).stored_result
    assert stored is not None and (stored.attempt, stored.location) == (1, "local:results/x")


def test_text_inputs_are_served_as_utf8(ledger: JobLedger) -> None:
    job_id = ledger.submit(
        owner="alice", spec=spec(input_text="héllo"), idempotency_key=None
    ).job_id
    ledger.change_job(job_id, lambda job: job.assign("miner_a"))
    facts = ledger.attempt_input(job_id, miner_id="miner_a", attempt=1)
    assert (facts.text, facts.size_bytes, facts.location) == ("héllo", 6, None)


def test_an_aggregate_id_spelt_as_another_kind_is_not_found(ledger: JobLedger) -> None:
    """A file's UUID written as job_… (or a job's as file_…) names nothing."""
    file = upload(ledger).file
    job_id = ledger.submit(owner="alice", spec=spec(), idempotency_key=None).job_id
    as_job = "job_" + file.file_id.removeprefix("file_")
    as_file = "file_" + job_id.removeprefix("job_")
    for call in (
        lambda: ledger.job_row(as_job, owner="alice"),
        lambda: ledger.job_events(as_job, owner=None),
        lambda: ledger.cancel(as_job, owner=None),
        lambda: ledger.file(as_file, owner=None),
        lambda: ledger.miner("miner_" + file.file_id.removeprefix("file_")),
    ):
        with pytest.raises(NotFound):
            call()
