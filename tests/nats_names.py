"""Subject prefixes for the tests: unique per ledger, recognisable per test session.

On a shared NATS server (`JOBLEDGER_NATS_URL`) every test ledger gets its own
prefix, so its subjects and streams never meet anyone else's, and the session
deletes the streams it created when it ends.
"""

import secrets

SESSION = secrets.token_hex(3)


def fresh_prefix() -> str:
    """A subject prefix no other ledger uses."""
    return f"jltest{SESSION}x{secrets.token_hex(3)}"


def created_this_session(stream_name: str) -> bool:
    """True for the streams of prefixes made by `fresh_prefix` in this session."""
    return stream_name.startswith(f"JLTEST{SESSION.upper()}X")
