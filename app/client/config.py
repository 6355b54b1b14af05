"""Where the SDK and `jobledger jobs` find the API and their key.

Precedence: explicit arguments, then JOBLEDGER_URL / JOBLEDGER_API_KEY, then a
profile in the config file (TOML: `$JOBLEDGER_CONFIG`, else
`$XDG_CONFIG_HOME/jobledger/config.toml`, else `~/.config/jobledger/config.toml`)::

    [profiles.default]
    url = "http://127.0.0.1:8000"
    api_key = "jl_..."

The profile is the one named by the argument, else JOBLEDGER_PROFILE, else `default`.
"""

from __future__ import annotations

import stat
import tomllib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.client.errors import ConfigError

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_PROFILE = "default"


class InsecureConfigWarning(UserWarning):
    """A file holding an API key is readable by other users."""


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """The resolved URL and key, and where the key came from (for error hints)."""

    url: str
    api_key: str | None
    # "--api-key", "JOBLEDGER_API_KEY", "profile 'name' in PATH", or None without a key.
    key_source: str | None = None
    profile: str | None = None


def config_path(environ: Mapping[str, str], home: Path | None = None) -> Path:
    """The profile file: $JOBLEDGER_CONFIG, else jobledger/config.toml in the XDG config dir."""
    if explicit := environ.get("JOBLEDGER_CONFIG", "").strip():
        return Path(explicit).expanduser()
    base = environ.get("XDG_CONFIG_HOME", "").strip()
    config_home = Path(base) if base else (home or Path.home()) / ".config"
    return config_home / "jobledger" / "config.toml"


def _load_profiles(path: Path) -> dict[str, Any]:
    """The `[profiles.*]` tables of a config file; {} when there is no file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror}") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(
            f"{path} is not valid TOML: {error}",
            "fix the file, or point JOBLEDGER_CONFIG elsewhere",
        ) from None
    profiles = document.get("profiles", {})
    if not isinstance(profiles, dict):
        raise ConfigError(f"{path}: `profiles` must be a table of [profiles.<name>] tables")
    return profiles


def _profile(path: Path, name: str, required: bool) -> dict[str, Any]:
    """One profile's table; a missing profile is an error only when it was asked for by name."""
    profiles = _load_profiles(path)
    table = profiles.get(name)
    if table is None:
        if not required:
            return {}
        known = ", ".join(sorted(profiles)) or "none"
        raise ConfigError(
            f"no profile {name!r} in {path} (profiles there: {known})",
            f"add a [profiles.{name}] table with url and api_key, or choose another profile",
        )
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [profiles.{name}] must be a table with url and api_key")
    for key in ("url", "api_key"):
        if key in table and not isinstance(table[key], str):
            raise ConfigError(f"{path}: [profiles.{name}] {key} must be a string")
    return table


def checked_url(url: str, source: str) -> str:
    """The API's base URL without a trailing slash; ConfigError unless it is http(s)."""
    if not url.lower().startswith(("http://", "https://")):
        raise ConfigError(
            f"{source} must be an http:// or https:// URL, got {url!r}",
            "e.g. http://127.0.0.1:8000 (JOBLEDGER_URL, --url, or url in a profile)",
        )
    return url.rstrip("/")


def warn_if_exposed(path: Path) -> None:
    """Warn (once per file) when a file holding an API key is readable by group or others."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        warnings.warn(
            f"{path} holds an API key and is readable by other users; run: chmod 600 {path}",
            InsecureConfigWarning,
            stacklevel=1,  # one place, so the default filter shows each file's warning once
        )


def resolve_config(
    environ: Mapping[str, str],
    *,
    url: str | None = None,
    api_key: str | None = None,
    profile: str | None = None,
    home: Path | None = None,
) -> ClientConfig:
    """The URL and key to use: arguments, then the environment, then the profile file."""
    env_url = environ.get("JOBLEDGER_URL", "").strip() or None
    env_key = environ.get("JOBLEDGER_API_KEY", "").strip() or None
    named = profile or environ.get("JOBLEDGER_PROFILE", "").strip() or None
    profile_name = named or DEFAULT_PROFILE
    path = config_path(environ, home)

    resolved_url, url_source = (url, "--url") if url else (env_url, "JOBLEDGER_URL")
    resolved_key, source = (api_key, "--api-key") if api_key else (env_key, "JOBLEDGER_API_KEY")
    # The file is read when it still has something to give, or when a profile was named.
    if named or resolved_url is None or resolved_key is None:
        table = _profile(path, profile_name, required=named is not None)
        if resolved_url is None and table.get("url"):
            resolved_url, url_source = table["url"], f"url of profile {profile_name!r} in {path}"
        if resolved_key is None and table.get("api_key"):
            resolved_key, source = table["api_key"], f"profile {profile_name!r} in {path}"
            warn_if_exposed(path)
    return ClientConfig(
        url=checked_url(resolved_url or DEFAULT_URL, url_source),
        api_key=resolved_key,
        key_source=source if resolved_key else None,
        profile=profile_name if named or path.exists() else None,
    )
