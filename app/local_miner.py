"""The miner `serve --with-miner` runs: registered once, remembered in $JOBLEDGER_HOME."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from decimal import Decimal
from pathlib import Path
from typing import Any

from psycopg_pool import AsyncConnectionPool

from app import keys
from app.services import prepare_database
from domain.errors import NotFound
from domain.miners import Capabilities

LOCAL_MAX_CONCURRENT = 4
# What the local miner is registered with; its agent replaces the GPU facts with NVML's.
_PLACEHOLDER = Capabilities(
    gpu_type="cpu",
    gpu_count=1,
    vram_gb=0,
    location="local",
    price_per_hour=Decimal(0),
    max_concurrent=LOCAL_MAX_CONCURRENT,
)


def local_miner_key(path: Path, dsn: str) -> str:
    """The local miner's API key: the remembered one if still valid, else a new miner's."""
    ledger = prepare_database(dsn)
    try:
        remembered = _remembered(path)
        if remembered is not None:
            miner_id, key = remembered
            try:
                active = ledger.miner(miner_id).active
            except NotFound:
                active = False
            if active and asyncio.run(_authenticates(dsn, key)):
                return key
        miner, _ = ledger.register_miner(f"local {socket.gethostname()}", _PLACEHOLDER)
    finally:
        ledger.close()
    key = asyncio.run(_create_key(dsn, miner.miner_id))
    path.write_text(json.dumps({"miner_id": miner.miner_id, "key": key}))
    os.chmod(path, 0o600)  # the key is a secret
    return key


def _remembered(path: Path) -> tuple[str, str] | None:
    if not path.exists():
        return None
    saved: dict[str, Any] = json.loads(path.read_text())
    return str(saved["miner_id"]), str(saved["key"])


async def _authenticates(dsn: str, key: str) -> bool:
    async with AsyncConnectionPool(dsn, min_size=1, max_size=1, open=False) as pool:
        await keys.create_schema(pool)
        return await keys.ApiKeys(pool).authenticate(key) is not None


async def _create_key(dsn: str, miner_id: str) -> str:
    async with AsyncConnectionPool(dsn, min_size=1, max_size=1, open=False) as pool:
        await keys.create_schema(pool)
        _, key = await keys.ApiKeys(pool).create(keys.Role.MINER, "local miner", subject=miner_id)
    return key
