"""The seed's example, submitted to a served API, answers exactly what the seed shows."""

from tests.e2e.conftest import SEED_JOB, Served


def test_seed_example_is_priced_as_the_seed_says(served: Served) -> None:
    client = served.client(served.new_key("client"))
    answer = client.post("/v1/jobs", json=SEED_JOB)
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert body["estimated_cost"] == 0.05
    assert body["estimated_time_seconds"] == 600
    assert b'"estimated_cost":0.05' in answer.content  # an exact JSON number, not a string
    status = client.get(f"/v1/jobs/{body['job_id']}").json()
    assert status["status"] == "pending"
    assert status["progress"] == 0
