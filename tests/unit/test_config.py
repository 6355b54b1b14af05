"""Settings from the environment: values a deployment needs, and clear refusals."""

from pathlib import Path

import pytest

from app.bus import stream_config
from app.config import ConfigError, Settings
from app.protocol import Namespace


def test_defaults_need_no_environment() -> None:
    settings = Settings.from_env({})
    assert settings.nats_stream_replicas == 1
    assert settings.max_upload_bytes == 5 * 1024**3
    assert settings.audit_key_path == Path(".jobledger") / "keys" / "audit-ed25519.pem"


def test_replicated_streams_are_configured_not_reset() -> None:
    """A cluster's replica count comes from the settings, so a restart keeps it."""
    settings = Settings.from_env({"JOBLEDGER_NATS_STREAM_REPLICAS": "3"})
    assert settings.nats_stream_replicas == 3
    for spec in Namespace().streams():
        assert stream_config(spec, settings.nats_stream_replicas).num_replicas == 3


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("JOBLEDGER_NATS_STREAM_REPLICAS", "0", "at least 1"),
        ("JOBLEDGER_NATS_STREAM_REPLICAS", "7", "at most 5"),
        ("JOBLEDGER_NATS_STREAM_REPLICAS", "three", "integer"),
        ("JOBLEDGER_MAX_UPLOAD_BYTES", "-5", "at least 1"),
        ("JOBLEDGER_AUDIT_CHECKPOINT_SECONDS", "0", "at least 0.1"),
        ("JOBLEDGER_RATE_LIMITS", "maybe", "'on' or 'off'"),
    ],
)
def test_unusable_values_are_refused_by_name(name: str, value: str, says: str) -> None:
    with pytest.raises(ConfigError, match=name) as refused:
        Settings.from_env({name: value})
    assert says in str(refused.value)


def test_the_audit_key_file_can_be_placed_elsewhere() -> None:
    settings = Settings.from_env({"JOBLEDGER_AUDIT_KEY_FILE": "/etc/jobledger/audit.pem"})
    assert settings.audit_key_path == Path("/etc/jobledger/audit.pem")
