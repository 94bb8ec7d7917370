"""Configuration: every ``CHAT_`` key, its default, and how the environment overrides it.

One source of truth: README.md's configuration table is generated from ``DEFAULTS``'s
comments by hand, so keep them in step.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from .errors import ConfigError

__all__ = ["DEFAULTS", "ConfigError", "from_environ", "validate"]

DEFAULTS: dict[str, Any] = {
    # Path of the websocket endpoint; a plain GET of it serves the web chat page.
    "CHAT_PATH": "/",
    # Serve the web chat page on a plain GET of CHAT_PATH.
    "CHAT_PAGE": True,
    # Path of the JSON statistics endpoint.
    "CHAT_STATS_PATH": "/stats",
    # Largest message a client may send, in bytes (bigger: close 1009).
    "CHAT_MAX_MESSAGE_SIZE": 1 << 20,
    # Bytes queued for one client beyond what its kernel buffer took, before it is closed
    # as a slow consumer (close 1008).
    "CHAT_MAX_BACKLOG": 256 * 1024,
    # Most clients one process holds; beyond it an upgrade gets 503 (counted in /stats as
    # refused.full). 0: the open-files limit minus what the process needs for itself.
    "CHAT_MAX_CONNECTIONS": 0,
    # Seconds to wait for the peer's answer to our close frame before dropping the socket.
    "CHAT_CLOSE_TIMEOUT": 5.0,
    # Redis URL of the backplane that carries messages between processes and hosts
    # (e.g. redis://127.0.0.1:6379/0); empty: in-memory, one process.
    "CHAT_REDIS_URL": "",
    # Redis pub/sub channel of the backplane (and prefix of its keys).
    "CHAT_REDIS_CHANNEL": "greenchat",
    # --- Hardening -------------------------------------------------------------------
    # Seconds a new TCP connection has to deliver its whole HTTP request; slower or
    # silent clients are dropped (slowloris).
    "CHAT_HANDSHAKE_TIMEOUT": 10.0,
    # Browser origins allowed to open a websocket, comma-separated
    # ("https://a.example,https://b.example"); "*": any. Empty: only the server's own
    # origin (Origin's host equals the Host header). Requests without Origin (non-browser
    # clients) are always allowed. Others get 403 before the upgrade.
    "CHAT_ALLOWED_ORIGINS": "",
    # Messages per second one client may send, sustained (0: no limit) ...
    "CHAT_RATE_LIMIT": 0.0,
    # ... and in a burst above that rate.
    "CHAT_RATE_BURST": 20,
    # What happens to a client over its rate: "close" (1008) or "drop" (the message).
    "CHAT_RATE_LIMIT_ACTION": "close",
    # Seconds of silence from a client before it is pinged; a client that stays silent
    # for another interval is dropped. 0: never ping.
    "CHAT_PING_INTERVAL": 60.0,
    # --- Operability -----------------------------------------------------------------
    # Path of the Prometheus metrics endpoint.
    "CHAT_METRICS_PATH": "/metrics",
    # Path of the live dashboard page.
    "CHAT_DASHBOARD_PATH": "/dashboard",
    # Log format of greenchat serve and gunicorn.conf.py: "text" or "json".
    "CHAT_LOG_FORMAT": "text",
    # --- Rooms -----------------------------------------------------------------------
    # Prefix of named rooms: websocket at <prefix>/<name>, presence at <prefix> and
    # <prefix>/<name>, server-side publish at POST <prefix>/<name>/messages.
    "CHAT_ROOMS_PATH": "/rooms",
    # Messages of a room kept and sent to a client that joins, before live ones (0: off).
    "CHAT_HISTORY": 0,
    # Send {"presence": {"room": ..., "members": N}} to a named room's members when its
    # count changes, at most once a second per room (never to the lobby); off by default.
    "CHAT_PRESENCE_NOTICES": False,
    # Bearer token for POST <rooms>/<name>/messages; empty: the publish API is off (404).
    "CHAT_PUBLISH_TOKEN": "",
}

# Settings that may be 0 (meaning "off" or "automatic").
_ZERO_ALLOWED = {"CHAT_MAX_CONNECTIONS", "CHAT_RATE_LIMIT", "CHAT_PING_INTERVAL", "CHAT_HISTORY"}
_CHOICES = {"CHAT_RATE_LIMIT_ACTION": ("close", "drop"), "CHAT_LOG_FORMAT": ("text", "json")}


def from_environ(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The ``CHAT_*`` keys set in ``environ``, parsed like Flask's ``from_prefixed_env``.

    A setting whose default is a string takes the value as it is (a token of digits stays
    a string); any other is read as JSON (``4096``, ``2.5``, ``true``), or kept as the
    string when it does not parse, so :func:`validate` names the setting and its type.
    An unknown ``CHAT_`` name is refused, so a typo is not silently ignored.
    """
    config = {}
    for key, raw in environ.items():
        if not key.startswith("CHAT_"):
            continue
        if key not in DEFAULTS:
            raise ConfigError(f"unknown setting {key} (known: {', '.join(DEFAULTS)})")
        if isinstance(DEFAULTS[key], str):
            config[key] = raw
            continue
        try:
            config[key] = json.loads(raw)
        except ValueError:
            config[key] = raw
    return config


def validate(config: Mapping[str, Any]) -> None:
    """Check every ``CHAT_`` key has the type of its default, and sizes are positive."""
    for key, default in DEFAULTS.items():
        value = config.get(key, default)
        expected = (int, float) if type(default) is float else type(default)
        if type(value) is bool and type(default) is not bool or not isinstance(value, expected):
            raise ConfigError(f"{key} must be {type(default).__name__}, got {value!r}")
        if key in _CHOICES and value not in _CHOICES[key]:
            raise ConfigError(f"{key} must be one of {', '.join(_CHOICES[key])}, got {value!r}")
        if key in _ZERO_ALLOWED and value == 0:
            continue
        if isinstance(value, (int, float)) and type(value) is not bool and value <= 0:
            raise ConfigError(f"{key} must be positive, got {value!r}")
    url = config.get("CHAT_REDIS_URL", "")
    if url and not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"CHAT_REDIS_URL must be a redis://, rediss:// or unix:// URL, got {url!r}")
    for key in ("CHAT_PATH", "CHAT_STATS_PATH", "CHAT_METRICS_PATH", "CHAT_DASHBOARD_PATH",
                "CHAT_ROOMS_PATH"):
        if not str(config.get(key, DEFAULTS[key])).startswith("/"):
            raise ConfigError(f"{key} must start with '/', got {config[key]!r}")
