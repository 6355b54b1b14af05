"""The hash chains that make the log tamper-evident: what is hashed, and how links are made.

An event is hashed over a canonical encoding of its stored row: the aggregate id, its
version, its topic and its state bytes exactly as the event store holds them, each
length-prefixed so no two rows encode alike. Two chains link the hashes:

- the aggregate chain, per job (and per miner, per file): link_v = H("aggregate", link_v-1,
  event_hash_v), starting from 32 zero bytes, so an aggregate's history cannot be edited,
  reordered, shortened or lengthened without changing its last link;
- the log chain, over the whole log in notification order: link_p = H("log", link_prev,
  p, event_hash_p), so no event can be added, removed or moved anywhere in the log.

Checkpoints sign (position, log link) with the ledger's Ed25519 key: whoever holds an
earlier checkpoint, or an export, can tell if the log before it was rewritten, even by
someone who also rewrote the chain table.
"""

from __future__ import annotations

import hashlib
import struct
from datetime import UTC, datetime
from typing import Final
from uuid import UUID

GENESIS: Final = bytes(32)
_EVENT: Final = b"jobledger-event-v1\n"
_AGGREGATE: Final = b"jobledger-aggregate-v1\n"
_LOG: Final = b"jobledger-log-v1\n"
_CHECKPOINT: Final = b"jobledger-checkpoint-v1\n"


def _field(data: bytes) -> bytes:
    """A length-prefixed field: 8 bytes of big-endian length, then the bytes."""
    return struct.pack(">Q", len(data)) + data


def event_hash(originator_id: UUID, version: int, topic: str, state: bytes) -> bytes:
    """The SHA-256 of one stored event row's canonical encoding."""
    encoded = (
        _EVENT
        + _field(originator_id.bytes)
        + struct.pack(">q", version)
        + _field(topic.encode("utf-8"))
        + _field(state)
    )
    return hashlib.sha256(encoded).digest()


def aggregate_link(previous: bytes, event: bytes) -> bytes:
    """The next link of an aggregate's chain."""
    return hashlib.sha256(_AGGREGATE + previous + event).digest()


def log_link(previous: bytes, position: int, event: bytes) -> bytes:
    """The next link of the log chain; the position is part of it, so moves show."""
    return hashlib.sha256(_LOG + previous + struct.pack(">q", position) + event).digest()


def checkpoint_message(position: int, log_hash: bytes, signed_at: datetime) -> bytes:
    """What a checkpoint's signature covers: a position, the log link there, and when."""
    return (
        _CHECKPOINT
        + struct.pack(">q", position)
        + _field(log_hash)
        + _field(signed_at.astimezone(UTC).isoformat().encode("ascii"))
    )
