"""API keys: issued once in plaintext, stored only as hashes, looked up by key id.

A generated key reads `jl_<key_id>_<secret>`: the key id (12 hex characters) is
public and indexes the row, so authenticating is one primary-key query; the
secret is `secrets.token_urlsafe(32)` and only its SHA-256 is stored.

The bootstrap admin key (`JOBLEDGER_ADMIN_KEY`) is an operator-chosen string of
any shape. It is stored under a key id derived from its own hash
(`admin_` + the first 12 hex digits of its SHA-256) with the hash of the whole
string, so any process can find it again without extra configuration.

A principal's `subject` is the identity that owns what the key creates. Unless
the caller passes one (a miner key names its miner id), it is the key id itself:
simple, stable for the life of the key, and unique.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import hmac
import logging
import re
import secrets
from collections import OrderedDict
from typing import Any, Final

import msgspec
import psycopg
from psycopg import AsyncConnection
from psycopg.rows import TupleRow, tuple_row
from psycopg_pool import AsyncConnectionPool

from app.backoff import Backoff
from app.config import ConfigError

log = logging.getLogger("jobledger.keys")

KEY_PREFIX: Final = "jl_"
MAX_NAME_LENGTH: Final = 100
MAX_SUBJECT_LENGTH: Final = 200
# Longer presented strings are refused before any hashing or database work.
MAX_PRESENTED_KEY_LENGTH: Final = 512
BOOTSTRAP_ADMIN_NAME: Final = "bootstrap admin"

_KEY_ID_HEX_CHARS: Final = 12
_SECRET_BYTES: Final = 32
_CREATE_ATTEMPTS: Final = 5
# token_urlsafe(32) gives 43 characters; accept a range so a future secret size still parses.
_GENERATED_KEY = re.compile(r"jl_(?P<key_id>[0-9a-f]{12})_(?P<secret>[A-Za-z0-9_-]{32,128})")
# Serialises concurrent schema creation by several processes starting at once.
_SCHEMA_LOCK_ID: Final = 0x6A6C_6B65  # "jlke"

# Every change to a key row is announced here, however it is made (the API, the CLI,
# or SQL by hand), so every process's KeyCache forgets what it knew at once.
KEYS_CHANNEL: Final = "jobledger_keys"
# The key cache proves its listening connection alive this often (and gives it as long).
_PROBE_SECONDS: Final = 1.0

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS jobledger_api_keys (
    key_id      text PRIMARY KEY,
    role        text NOT NULL CHECK (role IN ('client', 'miner', 'auditor', 'admin')),
    name        text NOT NULL,
    subject     text NOT NULL,
    secret_hash bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE OR REPLACE FUNCTION jobledger_api_keys_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('jobledger_keys', '');
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER jobledger_api_keys_changed
    AFTER UPDATE OR DELETE OR TRUNCATE ON jobledger_api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION jobledger_api_keys_changed();
"""


class Role(enum.StrEnum):
    """What a key may do: clients own jobs, miners run them, auditors read, admins manage."""

    CLIENT = "client"
    MINER = "miner"
    AUDITOR = "auditor"
    ADMIN = "admin"


class Principal(msgspec.Struct, frozen=True):
    """The authenticated caller behind a key, as the API's authorisation checks see it."""

    key_id: str
    role: Role
    name: str
    subject: str


async def create_schema(pool: AsyncConnectionPool[AsyncConnection[Any]]) -> None:
    """Create the key table if missing; safe when several processes start together."""
    async with pool.connection() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_ID,))
        await conn.execute(SCHEMA)


def _hash(secret: str) -> bytes:
    """SHA-256 of a secret, the only form in which secrets are stored."""
    # A fast unsalted hash is right for generated keys: 256 random bits cannot be
    # brute-forced, and a slow KDF would make every request pay for nothing.
    # surrogatepass: a str that is not valid UTF-8 still hashes instead of raising.
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


KEY_ID_PATTERN: Final = re.compile(rf"(admin_)?[0-9a-f]{{{_KEY_ID_HEX_CHARS}}}")


def bootstrap_key_id(key: str) -> str:
    """The deterministic key id under which an operator-chosen admin key is stored."""
    return "admin_" + _hash(key).hex()[:_KEY_ID_HEX_CHARS]


def _validated_text(value: str, what: str, max_length: int) -> str:
    """Return value if it is non-empty, printable and short enough, else raise ValueError."""
    if not value.strip():
        raise ValueError(f"{what} must not be empty")
    if len(value) > max_length:
        raise ValueError(f"{what} must be at most {max_length} characters, got {len(value)}")
    if not value.isprintable():
        raise ValueError(f"{what} must not contain control characters")
    return value


class KeyCache:
    """The principals of recently authenticated keys, forgotten the moment any key changes.

    Without it every request reads the key table: a pool checkout and a query, about a
    tenth of the API's CPU per request. With it, a key is read once; a trigger on the
    table announces every update, delete or truncate on KEYS_CHANNEL, and each process
    empties its cache when the announcement arrives, so a revocation takes effect in
    every process within the notification's delivery (milliseconds), not at some expiry.

    The cache answers only while its LISTEN connection is up (probed every second). It
    is emptied whenever that connection is (re)established, and a lookup that raced
    with a change is not kept (a generation number moves with every announcement).
    Unknown keys are never cached, so a new key works at once. Entries are keyed by
    the presented string's SHA-256, never by the key itself, and the oldest go first
    beyond `max_entries`.
    """

    def __init__(self, dsn: str, *, max_entries: int = 10_000) -> None:
        self._dsn = dsn
        self._max_entries = max_entries
        self._entries: OrderedDict[bytes, Principal] = OrderedDict()
        self._generation = 0
        self._listening = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start listening for key changes (the cache answers once that is up)."""
        self._task = asyncio.create_task(self._listen(), name="key-cache")

    async def stop(self) -> None:
        """Stop listening; the cache stops answering."""
        self._forget(listening=False)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def listening(self) -> bool:
        """True while changes reach the cache, so that it answers."""
        return self._listening

    @property
    def generation(self) -> int:
        """Take this before reading the table; `put` keeps the result only if unchanged."""
        return self._generation

    def get(self, presented: str) -> Principal | None:
        """The cached principal of a presented key, or None (look it up)."""
        if not self._listening:
            return None
        digest = _hash(presented)
        principal = self._entries.get(digest)
        if principal is not None:
            self._entries.move_to_end(digest)
        return principal

    def put(self, presented: str, principal: Principal, generation: int) -> None:
        """Remember a principal read at `generation`, unless a key changed since."""
        if not self._listening or generation != self._generation:
            return
        self._entries[_hash(presented)] = principal
        if len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def changed(self) -> None:
        """Forget everything now: this process changed a key (others hear the trigger)."""
        self._forget(listening=self._listening)

    def _forget(self, *, listening: bool) -> None:
        self._entries.clear()
        self._generation += 1
        self._listening = listening

    async def _listen(self) -> None:
        backoff = Backoff(first=0.1, most=5.0)
        while True:
            try:
                async with await AsyncConnection.connect(self._dsn, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {KEYS_CHANNEL}")
                    self._forget(listening=True)  # what changed while we were not listening
                    while True:
                        async for _ in conn.notifies(timeout=_PROBE_SECONDS):
                            self._forget(listening=True)
                        # A connection that died silently would hear nothing: prove it lives.
                        async with asyncio.timeout(_PROBE_SECONDS):
                            await conn.execute("SELECT 1")
            except (psycopg.OperationalError, psycopg.InterfaceError, TimeoutError) as error:
                self._forget(listening=False)
                log.warning("key cache lost the database (%s); reading keys uncached", error)
                await asyncio.sleep(backoff.next_delay())
            except BaseException:
                self._forget(listening=False)
                raise


class ApiKeys:
    """Issues, authenticates and revokes API keys stored in PostgreSQL."""

    def __init__(
        self, pool: AsyncConnectionPool[AsyncConnection[Any]], cache: KeyCache | None = None
    ) -> None:
        self._pool = pool
        self._cache = cache

    async def create(
        self, role: Role, name: str, subject: str | None = None
    ) -> tuple[Principal, str]:
        """Issue a key; the plaintext is returned here once and never stored."""
        role = Role(role)
        name = _validated_text(name, "key name", MAX_NAME_LENGTH)
        if subject is not None:
            subject = _validated_text(subject, "key subject", MAX_SUBJECT_LENGTH)
        async with self._pool.connection() as conn:
            for _ in range(_CREATE_ATTEMPTS):
                key_id = secrets.token_hex(_KEY_ID_HEX_CHARS // 2)
                secret = secrets.token_urlsafe(_SECRET_BYTES)
                principal = Principal(
                    key_id=key_id, role=role, name=name, subject=subject or key_id
                )
                cur = await conn.execute(
                    "INSERT INTO jobledger_api_keys (key_id, role, name, subject, secret_hash)"
                    " VALUES (%s, %s, %s, %s, %s)"
                    " ON CONFLICT (key_id) DO NOTHING RETURNING key_id",
                    (key_id, role.value, name, principal.subject, _hash(secret)),
                )
                if cur.rowcount == 1:
                    return principal, f"{KEY_PREFIX}{key_id}_{secret}"
        # 48 random bits colliding five times in a row means the generator is broken.
        raise RuntimeError("could not allocate a unique API key id")

    async def authenticate(self, presented: str) -> Principal | None:
        """The principal for a presented key, or None if it is malformed, unknown or revoked."""
        if not presented or len(presented) > MAX_PRESENTED_KEY_LENGTH:
            return None
        if self._cache is None:
            return await self._look_up(presented)
        if (cached := self._cache.get(presented)) is not None:
            return cached
        generation = self._cache.generation
        principal = await self._look_up(presented)
        if principal is not None:
            self._cache.put(presented, principal, generation)
        return principal

    async def _look_up(self, presented: str) -> Principal | None:
        # Expected hash per candidate key id: the generated-key form hashes the
        # secret part; an operator-chosen bootstrap key hashes the whole string.
        # Checking both costs nothing extra and lets an operator pick a bootstrap
        # key that happens to look like a generated one.
        expected = {bootstrap_key_id(presented): _hash(presented)}
        if match := _GENERATED_KEY.fullmatch(presented):
            expected[match["key_id"]] = _hash(match["secret"])
        async with (
            self._pool.connection() as conn,
            conn.cursor(row_factory=tuple_row) as cur,
        ):
            await cur.execute(
                "SELECT key_id, role, name, subject, secret_hash FROM jobledger_api_keys"
                " WHERE key_id = ANY(%s) AND revoked_at IS NULL",
                (list(expected),),
            )
            rows = await cur.fetchall()
        for row in rows:
            if hmac.compare_digest(bytes(row[4]), expected[row[0]]):
                return _principal(row)
        return None

    async def revoke(self, key_id: str) -> bool:
        """Revoke a key for good; False if it is unknown or was already revoked."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "UPDATE jobledger_api_keys SET revoked_at = now()"
                " WHERE key_id = %s AND revoked_at IS NULL",
                (key_id,),
            )
        if self._cache is not None:
            self._cache.changed()  # this process's next request must not wait for the notify
        return cur.rowcount == 1

    async def ensure_bootstrap_admin(self, key: str) -> Principal:
        """Make the operator's JOBLEDGER_ADMIN_KEY a working admin key; idempotent."""
        if not key.strip():
            raise ConfigError("JOBLEDGER_ADMIN_KEY must not be empty")
        if len(key) > MAX_PRESENTED_KEY_LENGTH:
            raise ConfigError(
                f"JOBLEDGER_ADMIN_KEY must be at most {MAX_PRESENTED_KEY_LENGTH} characters"
            )
        key_id = bootstrap_key_id(key)
        async with (
            self._pool.connection() as conn,
            conn.cursor(row_factory=tuple_row) as cur,
        ):
            # Insert, commit, then read: when another process inserted the row
            # concurrently, DO NOTHING returns nothing and only a later snapshot sees it.
            await cur.execute(
                "INSERT INTO jobledger_api_keys (key_id, role, name, subject, secret_hash)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (key_id) DO NOTHING",
                (key_id, Role.ADMIN.value, BOOTSTRAP_ADMIN_NAME, key_id, _hash(key)),
            )
            await conn.commit()
            await cur.execute(
                "SELECT key_id, role, name, subject, secret_hash, revoked_at IS NOT NULL"
                " FROM jobledger_api_keys WHERE key_id = %s",
                (key_id,),
            )
            row = await cur.fetchone()
        if row is None or not hmac.compare_digest(bytes(row[4]), _hash(key)):
            raise RuntimeError(f"bootstrap admin key row {key_id} is missing or does not match")
        if row[5]:
            # Revocation is final: a leaked key must not come back with a restart.
            raise ConfigError("JOBLEDGER_ADMIN_KEY has been revoked; configure a new one")
        principal = _principal(row)
        if principal.role is not Role.ADMIN:
            raise RuntimeError(f"key {key_id} exists but is not an admin key")
        return principal


def _principal(row: TupleRow) -> Principal:
    """Build a Principal from the leading (key_id, role, name, subject) columns."""
    return Principal(key_id=row[0], role=Role(row[1]), name=row[2], subject=row[3])
