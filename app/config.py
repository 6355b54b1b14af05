"""Settings read once from the environment by each composition root."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal, cast, get_args

import msgspec

from app.logs import LOG_FORMATS, LogFormat

# What one `jobledger serve` process runs (docs/operations.md, "Several API processes").
Role = Literal["all", "api", "workers"]
ROLES: tuple[str, ...] = get_args(Role)


class ConfigError(ValueError):
    """An environment variable holds a value jobledger cannot use."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a jobledger process is configured with; see docs/operations.md."""

    home: Path = Path(".jobledger")
    database_url: str | None = None
    nats_url: str | None = None
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    admin_key: str | None = None
    rate_limits: bool = True
    rate_limit_per_minute: int = 60
    rate_limit_per_hour: int = 1000
    max_json_body_bytes: int = 1024 * 1024
    # The largest input file or result the ledger accepts (POST /v1/files, result uploads).
    max_upload_bytes: int = 5 * 1024**3
    s3_endpoint_url: str | None = None
    s3_allowed_buckets: frozenset[str] = frozenset()
    # How long a write waits for the views to include it before answering.
    view_wait_seconds: float = 5.0
    # The subject namespace on NATS (docs/protocol.md); lets ledgers share a NATS server.
    nats_prefix: str = "jobledger"
    # Copies of each protocol stream a JetStream cluster keeps (1 on a single server).
    nats_stream_replicas: int = 1
    # A miner silent for this long is offline and loses its assignments.
    lease_seconds: float = 30.0
    # A job whose attempts keep getting lost fails after this many.
    max_attempts: int = 3
    # How long a canceling job waits for its miner's confirmation before it is canceled anyway.
    cancel_grace_seconds: float = 30.0
    # The ledger's Ed25519 signing key for audit checkpoints (None: under home/keys).
    audit_key_file: Path | None = None
    # A signed checkpoint at least this often while events arrive (and every 1,000 events).
    audit_checkpoint_seconds: float = 10.0
    # What this process runs: "all" (the API and the workers), "api" or "workers".
    role: Role = "all"
    # How the process logs to stderr: "json" (one object per line) or "text".
    log_format: LogFormat = "json"

    @property
    def audit_key_path(self) -> Path:
        """Where the ledger's audit signing key is kept."""
        return self.audit_key_file or self.home / "keys" / "audit-ed25519.pem"

    @property
    def blob_root(self) -> Path:
        """The local blob store: uploaded files and results for `destination: "local"`."""
        return self.home / "blobs"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Build settings from JOBLEDGER_* variables; unknown values raise ConfigError."""

        def text(name: str) -> str | None:
            value = environ.get(name, "").strip()
            return value or None

        def integer(name: str, default: int, minimum: int = 0) -> int:
            raw = text(name)
            if raw is None:
                return default
            try:
                value = int(raw)
            except ValueError:
                raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
            if value < minimum:
                raise ConfigError(f"{name} must be at least {minimum}, got {value}")
            return value

        def number(name: str, default: float, minimum: float = 0.0) -> float:
            raw = text(name)
            if raw is None:
                return default
            try:
                value = float(raw)
            except ValueError:
                raise ConfigError(f"{name} must be a number, got {raw!r}") from None
            if not value >= minimum:  # also refuses nan
                raise ConfigError(f"{name} must be at least {minimum}, got {raw!r}")
            return value

        def switch(name: str, default: bool) -> bool:
            raw = text(name)
            if raw is None:
                return default
            if raw.lower() in ("on", "true", "yes", "1"):
                return True
            if raw.lower() in ("off", "false", "no", "0"):
                return False
            raise ConfigError(f"{name} must be 'on' or 'off', got {raw!r}")

        replicas = integer("JOBLEDGER_NATS_STREAM_REPLICAS", 1, minimum=1)
        if replicas > 5:
            raise ConfigError(
                f"JOBLEDGER_NATS_STREAM_REPLICAS is at most 5 (JetStream's), got {replicas}"
            )
        buckets = text("JOBLEDGER_S3_ALLOWED_BUCKETS") or ""
        role = text("JOBLEDGER_ROLE") or "all"
        log_format = (text("JOBLEDGER_LOG_FORMAT") or "json").lower()
        if log_format not in LOG_FORMATS:
            raise ConfigError(f"JOBLEDGER_LOG_FORMAT must be json or text, got {log_format!r}")
        if role not in ROLES:
            raise ConfigError(f"JOBLEDGER_ROLE must be one of {', '.join(ROLES)}, got {role!r}")
        return cls(
            home=Path(text("JOBLEDGER_HOME") or ".jobledger"),
            database_url=text("JOBLEDGER_DATABASE_URL"),
            nats_url=text("JOBLEDGER_NATS_URL"),
            http_host=text("JOBLEDGER_HTTP_HOST") or "127.0.0.1",
            http_port=integer("JOBLEDGER_HTTP_PORT", 8000, minimum=0),
            admin_key=text("JOBLEDGER_ADMIN_KEY"),
            rate_limits=switch("JOBLEDGER_RATE_LIMITS", True),
            rate_limit_per_minute=integer("JOBLEDGER_RATE_LIMIT_PER_MINUTE", 60, minimum=1),
            rate_limit_per_hour=integer("JOBLEDGER_RATE_LIMIT_PER_HOUR", 1000, minimum=1),
            max_json_body_bytes=integer("JOBLEDGER_MAX_JSON_BODY_BYTES", 1024 * 1024, minimum=1),
            max_upload_bytes=integer("JOBLEDGER_MAX_UPLOAD_BYTES", 5 * 1024**3, minimum=1),
            s3_endpoint_url=text("JOBLEDGER_S3_ENDPOINT_URL"),
            s3_allowed_buckets=frozenset(b.strip() for b in buckets.split(",") if b.strip()),
            view_wait_seconds=number("JOBLEDGER_VIEW_WAIT_SECONDS", 5.0),
            nats_prefix=text("JOBLEDGER_NATS_PREFIX") or "jobledger",
            nats_stream_replicas=replicas,
            lease_seconds=number("JOBLEDGER_LEASE_SECONDS", 30.0, minimum=1.0),
            max_attempts=integer("JOBLEDGER_MAX_ATTEMPTS", 3, minimum=1),
            cancel_grace_seconds=number("JOBLEDGER_CANCEL_GRACE_SECONDS", 30.0, minimum=0.0),
            audit_key_file=Path(key_file)
            if (key_file := text("JOBLEDGER_AUDIT_KEY_FILE"))
            else None,
            audit_checkpoint_seconds=number(
                "JOBLEDGER_AUDIT_CHECKPOINT_SECONDS", 10.0, minimum=0.1
            ),
            role=cast(Role, role),
            log_format=cast(LogFormat, log_format),
        )
