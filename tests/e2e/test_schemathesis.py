"""schemathesis against a served ledger: every check, every phase, with a client key and with none.

`schemathesis run` (its CLI, in a subprocess) loads /schema/openapi.json and sends what it
generates from it: the documented examples, boundary and invalid values (coverage phase),
random requests (fuzzing), and chains that follow the document's links (stateful: submit
a job, then read, cancel or download it; upload a file, then read, delete or submit it).
Every check must hold on every answer: no 5xx, only documented statuses, bodies, content
types and headers; invalid requests refused, valid ones accepted, authentication
enforced, OPTIONS listing the methods the document has. The few allowances schemathesis
cannot know are in schemathesis.toml beside this file, each with its reason. Nothing is
excluded: a client key gets 403 on miner, admin and audit routes, documented on each.

The run is reproducible (a fixed seed, JOBLEDGER_SCHEMATHESIS_SEED, default 1: the same
generation every time) and bounded by JOBLEDGER_SCHEMATHESIS_EXAMPLES test cases per
operation and phase (default 40; the stateful phase gets four times as many scenarios).
A longer hunt, e.g. in a chaos or nightly run, raises the one and varies the other:

    export JOBLEDGER_SCHEMATHESIS_EXAMPLES=500 JOBLEDGER_SCHEMATHESIS_SEED=7
    .venv/bin/pytest tests/e2e/test_schemathesis.py
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Served

pytestmark = pytest.mark.e2e

EXAMPLES = int(os.environ.get("JOBLEDGER_SCHEMATHESIS_EXAMPLES", "40"))
SEED = int(os.environ.get("JOBLEDGER_SCHEMATHESIS_SEED", "1"))
CONFIG = Path(__file__).with_name("schemathesis.toml")
METHODS = ("get", "put", "post", "delete", "patch")
PUBLIC = ("/healthz",)


@pytest.fixture(scope="module")
def document(served: Served) -> dict[str, Any]:
    answer = httpx.get(f"{served.url}/schema/openapi.json", timeout=30)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def operations(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every operation of the document by "METHOD /path"."""
    return {
        f"{method.upper()} {path}": operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    }


def has_field(document: dict[str, Any], schema: dict[str, Any], steps: list[str]) -> bool:
    """Whether a value of the schema can have the field at `steps` (["jobs", "0", "job_id"])."""
    if not steps:
        return True
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        return has_field(document, document["components"]["schemas"][name], steps)
    alternatives = [*schema.get("allOf", []), *schema.get("anyOf", []), *schema.get("oneOf", [])]
    if any(has_field(document, alternative, steps) for alternative in alternatives):
        return True
    step, rest = steps[0], steps[1:]
    if step.isdigit() and "items" in schema:
        return has_field(document, schema["items"], rest)
    if step in schema.get("properties", {}):
        return has_field(document, schema["properties"][step], rest)
    return False


def leaves(value: Any, steps: tuple[str, ...] = ()) -> list[tuple[list[str], Any]]:
    """The leaf values of a JSON value, each with the path to it."""
    if isinstance(value, dict):
        return [leaf for key, inner in value.items() for leaf in leaves(inner, (*steps, key))]
    return [(list(steps), value)]


def parameter_names(operation: dict[str, Any]) -> dict[str, str]:
    """An operation's parameters: name → where ("path", "query", "header")."""
    return {parameter["name"]: parameter["in"] for parameter in operation.get("parameters", [])}


def expression_problems(
    document: dict[str, Any], source: dict[str, Any], answer: dict[str, Any], expression: Any
) -> list[str]:
    """A runtime expression naming nothing in the source's request or answer; [] if fine."""
    if not isinstance(expression, str) or not expression.startswith("$"):
        return []  # a constant
    if expression.startswith("$response.body#/"):
        steps = expression.removeprefix("$response.body#/").split("/")
        return [] if has_field(document, answer, steps) else [f"the answer has no {expression}"]
    if match := re.fullmatch(r"\$request\.(path|query|header)\.(.+)", expression):
        known = parameter_names(source).get(match.group(2)) == match.group(1)
        return [] if known else [f"the request has no {expression}"]
    return [f"an expression this test does not read: {expression}"]


def link_problems(document: dict[str, Any]) -> list[str]:
    """What is wrong with the document's links: unknown targets, parameters or fields."""
    by_label = operations(document)
    by_id = {operation["operationId"]: operation for operation in by_label.values()}
    problems = []
    for label, source in by_label.items():
        for status, response in source["responses"].items():
            answer = response.get("content", {}).get("application/json", {}).get("schema", {})
            for name, link in response.get("links", {}).items():
                where = f"{label} {status} {name}"
                target = by_id.get(link.get("operationId"))
                if target is None:
                    problems.append(f"{where}: no operation {link.get('operationId')}")
                    continue
                for parameter, expression in link.get("parameters", {}).items():
                    if parameter.split(".")[-1] not in parameter_names(target):
                        problems.append(f"{where}: the target has no parameter {parameter}")
                    problems += [
                        f"{where}: {problem}"
                        for problem in expression_problems(document, source, answer, expression)
                    ]
                if "requestBody" in link:
                    body = target["requestBody"]["content"]["application/json"]["schema"]
                    for steps, value in leaves(link["requestBody"]):
                        if not has_field(document, body, steps):
                            problems.append(f"{where}: the target's body has no {'.'.join(steps)}")
                        problems += [
                            f"{where}: {problem}"
                            for problem in expression_problems(document, source, answer, value)
                        ]
    return problems


def test_the_document_links_each_new_job_and_file_to_what_uses_its_id(
    document: dict[str, Any],
) -> None:
    by_label = operations(document)
    by_id = {operation["operationId"]: label for label, operation in by_label.items()}

    def followed(label: str, status: str) -> set[str]:
        links = by_label[label]["responses"][status].get("links", {})
        return {by_id[link["operationId"]] for link in links.values()}

    job_routes = {
        "GET /v1/jobs/{job_id}",
        "GET /v1/jobs/{job_id}/events",
        "GET /v1/jobs/{job_id}/download",
        "DELETE /v1/jobs/{job_id}",
        "GET /v1/jobs/{job_id}/watch",
    }
    file_routes = {
        "GET /v1/files/{file_id}",
        "GET /v1/files/{file_id}/content",
        "DELETE /v1/files/{file_id}",
        "POST /v1/jobs",
    }
    assert followed("POST /v1/jobs", "201") == job_routes
    assert job_routes <= followed("GET /v1/jobs", "200")
    assert followed("POST /v1/files", "201") == file_routes
    assert followed("POST /v1/files", "200") == file_routes
    assert link_problems(document) == []


def test_a_link_to_nowhere_is_found(document: dict[str, Any]) -> None:
    """The check above can fail: a wrong target, parameter or field is reported."""
    broken = copy.deepcopy(document)
    links = broken["paths"]["/v1/jobs"]["post"]["responses"]["201"]["links"]
    links["gone"] = {"operationId": "NoSuchOperation"}
    links["typo"] = {**links["status"], "parameters": {"jobid": "$response.body#/job_id"}}
    links["field"] = {**links["status"], "parameters": {"job_id": "$response.body#/id"}}
    links["query"] = {**links["status"], "parameters": {"job_id": "$request.query.job"}}
    assert link_problems(broken) == [
        "POST /v1/jobs 201 gone: no operation NoSuchOperation",
        "POST /v1/jobs 201 typo: the target has no parameter jobid",
        "POST /v1/jobs 201 field: the answer has no $response.body#/id",
        "POST /v1/jobs 201 query: the request has no $request.query.job",
    ]


def test_every_route_but_the_public_ones_documents_its_401(document: dict[str, Any]) -> None:
    for label, operation in operations(document).items():
        if label.split(" ", 1)[1] in PUBLIC:
            assert operation["security"] == [], label  # no key needed: no 401 either
            assert "401" not in operation["responses"], label
        else:
            assert "security" not in operation, label  # the document's: a key
            assert "401" in operation["responses"], label


def test_options_lists_every_method_the_path_has(served: Served, document: dict[str, Any]) -> None:
    admin = served.client(served.admin_key)  # /v1/admin and /v1/audit answer OPTIONS to it
    for path, item in document["paths"].items():
        concrete = re.sub(r"\{[^}]+\}", "1", path)
        answer = admin.options(concrete)
        documented = {method.upper() for method in item if method in METHODS}
        assert answer.status_code == 204, (path, answer.text)
        assert set(answer.headers["allow"].split(", ")) == documented | {"OPTIONS"}, path


# Operations schemathesis.toml exercises only through links (a watch stream lasts as long
# as the `timeout` a generated case asks for).
LINKS_ONLY = {"GET /v1/jobs/{job_id}/watch"}


def schemathesis(served: Served, workdir: Path, *options: str) -> tuple[int, str]:
    """Run `schemathesis run` on the served document; its exit code and everything it printed."""
    # A scenario is a short chain of calls, far cheaper than it sounds: give the stateful
    # phase more of them than the others get test cases, so that it follows most links.
    config = workdir / "schemathesis.toml"
    config.write_text(
        f"{CONFIG.read_text()}\n[phases.stateful.generation]\nmax-examples = {4 * EXAMPLES}\n"
    )
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "--config-file",
        str(config),
        "--no-color",
        "run",
        f"{served.url}/schema/openapi.json",
        # Every check is on in CONFIG (`--checks all` here would override its exceptions).
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--max-examples",
        str(EXAMPLES),
        # Not --generation-deterministic: after the other phases it leaves the stateful
        # phase a dozen scenarios, where a seed leaves it its whole budget.
        "--seed",
        str(SEED),
        # One worker: the machine is small, and the order of requests stays the same.
        "--workers",
        "1",
        "--request-timeout",
        "30",
        *options,
    ]
    finished = subprocess.run(
        command,
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=max(600, EXAMPLES * 20),
        check=False,
    )
    return finished.returncode, finished.stdout


def count(pattern: str, output: str) -> int:
    match = re.search(pattern, output)
    assert match, f"no {pattern!r} in schemathesis' output:\n{output}"
    return int(match.group(1))


@pytest.mark.parametrize("caller", ["client", "no key"])
def test_schemathesis_finds_nothing(
    served: Served, document: dict[str, Any], tmp_path: Path, caller: str
) -> None:
    credentials = []
    if caller == "client":
        key = served.new_key("client")
        # The key in both documented headers: with a valid X-Api-Key the API reads no
        # other, so a second credential invented for Authorization would go unread.
        credentials = ["-H", f"X-Api-Key: {key}", "-H", f"Authorization: Bearer {key}"]
    code, output = schemathesis(served, tmp_path, *credentials)
    print(output)  # what was tested, and how much: `pytest -rP` shows it
    assert code == 0, f"schemathesis found something ({caller}):\n{output}"
    # Not vacuous: every operation of the document was tested, in every phase (but those
    # schemathesis.toml leaves to the stateful phase's links, which it does not count).
    total = len(operations(document))
    assert count(r"Tested: (\d+)", output) == total - len(LINKS_ONLY), output
    assert count(r"Selected: \d+/(\d+)", output) == total, output
    for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):
        assert re.search(rf"✅  {phase} \(in", output), f"{phase} did not pass:\n{output}"
    if caller == "client":
        # The stateful phase followed the document's links: its chains got somewhere.
        assert count(r"API Links: +(\d+) covered", output) > 0, output


def test_a_query_parameter_given_twice_is_refused(served: Served) -> None:
    """Found by schemathesis: `?filename=a&filename=b` was taken as b without a word."""
    client = served.client(served.new_key("client"))
    answer = client.get("/v1/jobs", params=[("limit", "1"), ("limit", "100")])
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["details"] == {"field": "limit"}
    upload = client.post("/v1/files", params=[("filename", "a"), ("filename", "b")], content=b"x")
    assert upload.status_code == 400, upload.text
    assert client.get("/v1/jobs", params={"limit": "1"}).status_code == 200
