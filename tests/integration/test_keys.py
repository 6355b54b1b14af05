"""API keys against a real PostgreSQL: issue, authenticate, revoke, bootstrap admin."""

import asyncio
import hashlib
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from app.config import ConfigError
from app.keys import ApiKeys, KeyCache, Principal, Role, bootstrap_key_id, create_schema

pytestmark = pytest.mark.integration

Pool = AsyncConnectionPool[AsyncConnection[Any]]


async def listening_cache(database_url: str) -> KeyCache:
    cache = KeyCache(database_url)
    await cache.start()
    for _ in range(100):
        if cache.listening:
            return cache
        await asyncio.sleep(0.05)
    raise AssertionError("the key cache never started listening")


@pytest.fixture(params=["uncached", "cached"])
async def keys(
    request: pytest.FixtureRequest, pg_pool: Pool, database_url: str
) -> AsyncIterator[ApiKeys]:
    """Every test here holds with and without the per-process key cache."""
    await create_schema(pg_pool)
    if request.param == "uncached":
        yield ApiKeys(pg_pool)
        return
    cache = await listening_cache(database_url)
    yield ApiKeys(pg_pool, cache)
    await cache.stop()


def _secret_of(key: str) -> str:
    match = re.fullmatch(r"jl_([0-9a-f]{12})_(.+)", key)
    assert match is not None, key
    return match[2]


async def test_created_key_authenticates_as_its_principal(keys: ApiKeys) -> None:
    principal, key = await keys.create(Role.CLIENT, "alice")

    assert re.fullmatch(rf"jl_{principal.key_id}_[A-Za-z0-9_-]{{43}}", key)
    assert principal == Principal(
        key_id=principal.key_id, role=Role.CLIENT, name="alice", subject=principal.key_id
    )
    assert await keys.authenticate(key) == principal


async def test_miner_key_carries_the_given_subject(keys: ApiKeys) -> None:
    _, key = await keys.create(Role.MINER, "rig-7", subject="miner_rig7")

    found = await keys.authenticate(key)

    assert found is not None
    assert (found.role, found.name, found.subject) == (Role.MINER, "rig-7", "miner_rig7")


async def test_role_may_be_given_as_its_string(keys: ApiKeys) -> None:
    principal, key = await keys.create("auditor", "carol")  # type: ignore[arg-type]

    assert principal.role is Role.AUDITOR
    found = await keys.authenticate(key)
    assert found is not None and found.role is Role.AUDITOR


async def test_each_key_is_distinct_and_only_opens_itself(keys: ApiKeys) -> None:
    issued = [await keys.create(Role.CLIENT, f"user{i}") for i in range(5)]

    assert len({p.key_id for p, _ in issued}) == 5
    assert len({k for _, k in issued}) == 5
    for principal, key in issued:
        assert await keys.authenticate(key) == principal
    # Another key's secret under this key's id does not authenticate.
    (first, _), (_, second_key) = issued[0], issued[1]
    assert await keys.authenticate(f"jl_{first.key_id}_{_secret_of(second_key)}") is None


async def test_wrong_secret_is_refused(keys: ApiKeys) -> None:
    principal, key = await keys.create(Role.CLIENT, "alice")
    secret = _secret_of(key)
    flipped = ("A" if secret[0] != "A" else "B") + secret[1:]

    assert await keys.authenticate(f"jl_{principal.key_id}_{flipped}") is None
    assert await keys.authenticate(key[:-1]) is None
    assert await keys.authenticate(key + "x") is None
    assert await keys.authenticate(key.upper()) is None


@pytest.mark.parametrize(
    "presented",
    [
        "",
        " ",
        "garbage",
        "jl_",
        "jl__",
        "jl_0123456789ab",
        "jl_0123456789ab_",
        "jl_ZZZZZZZZZZZZ_" + "a" * 43,
        "Bearer jl_0123456789ab_" + "a" * 43,
        "x" * 100_000,
        "jl_" + "a" * 12 + "_" + "b" * 10_000,
        "jl_ключ_секрет",
        "🔑" * 50,
        "\x00",
        "jl_0123456789ab_\x00" + "a" * 42,
        "\udc80 lone surrogate",
        "'; DROP TABLE jobledger_api_keys; --",
    ],
)
async def test_malformed_keys_are_refused_without_raising(keys: ApiKeys, presented: str) -> None:
    await keys.create(Role.ADMIN, "root")

    assert await keys.authenticate(presented) is None


async def test_unknown_key_id_is_refused(keys: ApiKeys) -> None:
    principal, key = await keys.create(Role.CLIENT, "alice")
    other_id = "0" * 12 if principal.key_id != "0" * 12 else "1" * 12

    assert await keys.authenticate(f"jl_{other_id}_{_secret_of(key)}") is None


async def test_revoked_key_is_refused_and_others_still_work(keys: ApiKeys) -> None:
    alice, alice_key = await keys.create(Role.CLIENT, "alice")
    bob, bob_key = await keys.create(Role.CLIENT, "bob")

    assert await keys.revoke(alice.key_id) is True

    assert await keys.authenticate(alice_key) is None
    assert await keys.authenticate(bob_key) == bob
    assert await keys.revoke(alice.key_id) is False  # already revoked
    assert await keys.revoke("0123456789ab") is False  # never existed


async def test_plaintext_secret_is_never_stored(keys: ApiKeys, pg_pool: Pool) -> None:
    principal, key = await keys.create(Role.CLIENT, "alice")
    secret = _secret_of(key)

    async with pg_pool.connection() as conn:
        cur = await conn.execute(
            "SELECT t::text, secret_hash FROM jobledger_api_keys t WHERE key_id = %s",
            (principal.key_id,),
        )
        row = await cur.fetchone()

    assert row is not None
    whole_row, secret_hash = row
    assert secret not in whole_row
    assert key not in whole_row
    assert secret.encode() not in bytes(secret_hash)
    assert bytes(secret_hash) == hashlib.sha256(secret.encode()).digest()


@pytest.mark.parametrize("name", ["", "   ", "x" * 101, "line\nbreak", "nul\x00"])
async def test_bad_names_are_rejected(keys: ApiKeys, name: str) -> None:
    with pytest.raises(ValueError, match="key name"):
        await keys.create(Role.CLIENT, name)


async def test_name_of_exactly_100_characters_is_accepted(keys: ApiKeys) -> None:
    principal, key = await keys.create(Role.CLIENT, "n" * 100)

    assert (await keys.authenticate(key)) == principal


async def test_unknown_role_is_rejected(keys: ApiKeys) -> None:
    with pytest.raises(ValueError, match="superuser"):
        await keys.create("superuser", "mallory")  # type: ignore[arg-type]


async def test_bootstrap_admin_authenticates_and_is_idempotent(
    keys: ApiKeys, pg_pool: Pool
) -> None:
    configured = "operator-chose-this admin key!"

    first = await keys.ensure_bootstrap_admin(configured)
    again = await keys.ensure_bootstrap_admin(configured)
    # A fleet of processes starting at once, each with its own pool connection.
    at_once = await asyncio.gather(
        *(ApiKeys(pg_pool).ensure_bootstrap_admin(configured) for _ in range(8))
    )

    assert first.role is Role.ADMIN
    assert first.key_id == bootstrap_key_id(configured)
    assert {again, *at_once} == {first}
    assert await keys.authenticate(configured) == first
    assert await keys.authenticate(configured + " ") is None
    async with pg_pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*), bool_and(t::text NOT LIKE %s) FROM jobledger_api_keys t",
            (f"%{configured}%",),
        )
        assert await cur.fetchone() == (1, True)


async def test_bootstrap_admin_survives_a_restart(keys: ApiKeys, database_url: str) -> None:
    configured = "restart-me-admin-key"
    before = await keys.ensure_bootstrap_admin(configured)

    async with AsyncConnectionPool(database_url, open=False) as restarted:
        await create_schema(restarted)
        after = await ApiKeys(restarted).ensure_bootstrap_admin(configured)
        assert await ApiKeys(restarted).authenticate(configured) == before

    assert after == before


async def test_bootstrap_key_shaped_like_a_generated_key_works(keys: ApiKeys) -> None:
    configured = "jl_0123456789ab_" + "s" * 43

    admin = await keys.ensure_bootstrap_admin(configured)

    assert await keys.authenticate(configured) == admin


async def test_different_bootstrap_keys_are_different_admins(keys: ApiKeys) -> None:
    one = await keys.ensure_bootstrap_admin("first admin key")
    two = await keys.ensure_bootstrap_admin("second admin key")

    assert one.key_id != two.key_id
    assert await keys.authenticate("first admin key") == one
    assert await keys.authenticate("second admin key") == two


async def test_revoked_bootstrap_key_stays_revoked(keys: ApiKeys) -> None:
    admin = await keys.ensure_bootstrap_admin("leaked admin key")
    assert await keys.revoke(admin.key_id) is True

    with pytest.raises(ConfigError, match="revoked"):
        await keys.ensure_bootstrap_admin("leaked admin key")
    assert await keys.authenticate("leaked admin key") is None


@pytest.mark.parametrize("configured", ["", "   ", "k" * 513])
async def test_unusable_bootstrap_key_is_a_config_error(keys: ApiKeys, configured: str) -> None:
    with pytest.raises(ConfigError, match="JOBLEDGER_ADMIN_KEY"):
        await keys.ensure_bootstrap_admin(configured)


async def test_schema_creation_is_idempotent_and_concurrency_safe(pg_pool: Pool) -> None:
    await asyncio.gather(*(create_schema(pg_pool) for _ in range(5)))
    await create_schema(pg_pool)

    principal, key = await ApiKeys(pg_pool).create(Role.CLIENT, "alice")
    assert await ApiKeys(pg_pool).authenticate(key) == principal


@pytest.fixture
async def cache(pg_pool: Pool, database_url: str) -> AsyncIterator[KeyCache]:
    await create_schema(pg_pool)
    cache = await listening_cache(database_url)
    yield cache
    await cache.stop()


async def test_a_cached_key_revoked_by_hand_stops_working_at_once(
    pg_pool: Pool, cache: KeyCache
) -> None:
    """Any change to the key table empties every process's cache: even SQL by hand."""
    keys = ApiKeys(pg_pool, cache)
    principal, key = await keys.create(Role.CLIENT, "alice")
    assert await keys.authenticate(key) == principal
    assert cache.get(key) == principal  # the next request will not read the table
    async with pg_pool.connection() as conn:
        await conn.execute(
            "UPDATE jobledger_api_keys SET revoked_at = now() WHERE key_id = %s",
            (principal.key_id,),
        )
    for _ in range(100):
        if cache.get(key) is None:
            break
        await asyncio.sleep(0.01)
    assert cache.get(key) is None
    assert await keys.authenticate(key) is None


async def test_a_lookup_that_raced_with_a_change_is_not_cached(
    pg_pool: Pool, cache: KeyCache
) -> None:
    keys = ApiKeys(pg_pool, cache)
    principal, key = await keys.create(Role.CLIENT, "bob")
    before = cache.generation
    _, other = await keys.create(Role.CLIENT, "carol")
    await keys.revoke((await keys.authenticate(other)).key_id)  # a change announced...
    for _ in range(100):
        if cache.generation != before:
            break
        await asyncio.sleep(0.01)
    cache.put(key, principal, before)  # ...after this lookup began: not kept
    assert cache.get(key) is None
