"""What a verification reports: findings by position and aggregate, and what it covered."""

from __future__ import annotations

from typing import Literal

import msgspec

FindingKind = Literal[
    "modified", "deleted", "inserted", "reordered", "chain", "checkpoint", "receipt", "export"
]


class Finding(msgspec.Struct, frozen=True, kw_only=True):
    """One place where the stored history differs from what was sealed."""

    kind: FindingKind
    position: int | None
    aggregate_id: str | None
    version: int | None
    detail: str


class Report(msgspec.Struct, kw_only=True):
    """What a verification covered and what it found."""

    scope: str
    events: int = 0
    sealed_through: int = 0
    unsealed: int = 0
    checkpoints: int = 0
    signed_through: int = 0
    key_ids: list[str] = []
    receipts_verified: int = 0
    unsigned_completions: int = 0
    findings: list[Finding] = []

    @property
    def ok(self) -> bool:
        """True when nothing was found."""
        return not self.findings
