"""/v1/audit: the ledger's public key, verification of the log, and signed exports.

Read-only, for auditors and admins. docs/audit.md explains what these prove.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
import psycopg
from anyio import to_thread
from litestar import Controller, Response, get
from litestar.datastructures import State
from litestar.openapi.spec import Example
from litestar.params import Parameter
from litestar.response import Stream

from app.api import openapi
from app.api.auth import allow
from app.api.errors import LedgerResponse
from app.api.jobs import parse_bound, services_of
from app.audit.export import MEDIA_TYPE, export_lines
from app.audit.findings import Report
from app.audit.signing import ALGORITHM
from app.audit.verify import verify_job, verify_ledger
from app.keys import Role
from app.receipts import encode_public_key
from app.services import Services
from domain.errors import InvalidJobRequest
from domain.jobs import aggregate_id_of

_EXPORT_BATCH = 200


class AuditKey(msgspec.Struct, kw_only=True):
    """A public key the ledger signs checkpoints and exports with."""

    key_id: str
    public_key: str


class AuditKeyResponse(msgspec.Struct, kw_only=True):
    """The ledger's current signing key, and every key that ever signed a checkpoint."""

    key_id: str
    algorithm: str
    public_key: str
    public_key_pem: str
    keys: list[AuditKey]


def _verify(services: Services, job_id: str | None) -> Report:
    """Verify the log (or one job) on a connection of its own."""
    assert services.settings.database_url is not None
    table = services.ledger.recorder.events_table_name  # type: ignore[attr-defined]
    with psycopg.connect(services.settings.database_url, autocommit=True) as conn:
        if job_id is None:
            return verify_ledger(conn, table)
        return verify_job(conn, table, job_id)


def _known_keys(services: Services) -> list[AuditKey]:
    assert services.settings.database_url is not None
    with psycopg.connect(services.settings.database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT key_id, public_key FROM jobledger_audit_keys ORDER BY first_used"
        ).fetchall()
    return [AuditKey(key_id=str(r[0]), public_key=encode_public_key(bytes(r[1]))) for r in rows]


def _take(lines: Iterator[bytes], count: int) -> list[bytes]:
    """Up to `count` more lines (blocking: run in a worker thread)."""
    batch = []
    for line in lines:
        batch.append(line)
        if len(batch) == count:
            break
    return batch


class AuditController(Controller):
    """/v1/audit: what auditors need to check the ledger without trusting it."""

    path = "/v1/audit"
    tags = ["audit"]
    guards = [allow(Role.AUDITOR, Role.ADMIN)]
    response_class = LedgerResponse

    @get(
        "/key",
        summary="The ledger's public signing key",
        responses=openapi.errors(401, 403, 429),
    )
    async def key(self, state: State) -> AuditKeyResponse:
        """Keep it: checkpoints and exports verify against it, whatever the database says."""
        services = services_of(state)
        key = services.audit_key
        return AuditKeyResponse(
            key_id=key.key_id,
            algorithm=ALGORITHM,
            public_key=encode_public_key(key.public_key),
            public_key_pem=key.public_pem(),
            keys=await to_thread.run_sync(_known_keys, services),
        )

    @get(
        "/verify",
        summary="Recompute the hash chains and report any tampering",
        responses=openapi.errors(401, 403, 404, 429),
    )
    async def verify(
        self,
        state: State,
        job: Annotated[
            str | None,
            Parameter(
                description="verify only this job (else the whole log)",
                examples=[Example(value="job_3f0c5a7e9b2d4e61a8c47d1e0b9f2a36")],
            ),
        ] = None,
    ) -> Report:
        """Every modified, deleted, inserted or reordered event, by position and aggregate."""
        services = services_of(state)
        if job is not None:
            aggregate_id_of(job)  # a malformed id is not found without asking the database
        return await to_thread.run_sync(_verify, services, job)

    @get(
        "/export",
        summary="Events with their hashes and signed checkpoints, as NDJSON",
        media_type=MEDIA_TYPE,
        responses=openapi.errors(401, 403, 422, 429),
    )
    async def export(
        self,
        state: State,
        window_from: Annotated[
            str | None,
            Parameter(query="from", description="YYYY-MM-DD or RFC 3339 (default: the start)"),
        ] = None,
        window_to: Annotated[
            str | None,
            Parameter(query="to", description="YYYY-MM-DD or RFC 3339, inclusive (default: now)"),
        ] = None,
    ) -> Response[Any]:
        """Sealed events recorded in the window, signed at the end; verify offline with the CLI."""
        services = services_of(state)
        start = parse_bound(window_from, "from", end=False) if window_from else datetime.min
        end = parse_bound(window_to, "to", end=True) if window_to else datetime.now(UTC)
        start = start.replace(tzinfo=UTC) if start.tzinfo is None else start
        if start > end:
            raise InvalidJobRequest("from must not be after to", details={"field": "from"})
        assert services.settings.database_url is not None
        dsn = services.settings.database_url

        async def lines() -> AsyncIterator[bytes]:
            conn = await to_thread.run_sync(lambda: psycopg.connect(dsn, autocommit=True))
            produced = export_lines(services.ledger, conn, services.audit_key, start, end)
            try:
                while batch := await to_thread.run_sync(_take, produced, _EXPORT_BATCH):
                    for line in batch:
                        yield line
            finally:
                await to_thread.run_sync(produced.close)
                await to_thread.run_sync(conn.close)

        name = f"jobledger-audit-{start.date()}-{end.date()}.ndjson"
        return Stream(
            lines(),
            media_type=MEDIA_TYPE,
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )
