"""Configuration: every ``CHAT_`` setting declared once, with its default, type and doc.

``SETTINGS`` is the single source: ``DEFAULTS``, the checks of :func:`validate` and
README.md's settings table (:func:`settings_table`, kept equal by tests/test_config.py)
are all derived from it. A setting's type is the type of its default.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import ConfigError

__all__ = ["DEFAULTS", "SETTINGS", "ConfigError", "Setting", "from_environ", "settings_table",
           "validate"]


@dataclass(frozen=True)
class Setting:
    """One ``CHAT_`` setting: its name, default (whose type it must have) and a one-line doc."""

    name: str
    default: Any
    doc: str
    #: the only values allowed, if not empty
    choices: tuple[str, ...] = ()
    #: a number that may be 0 (meaning "off" or "automatic"); other numbers must be positive
    zero_allowed: bool = False
    #: a URL path: must start with "/"
    path: bool = False

    @property
    def type(self) -> type:
        return type(self.default)


SETTINGS: tuple[Setting, ...] = (
    Setting("CHAT_PATH", "/", "websocket endpoint; a plain GET of it serves the web page",
            path=True),
    Setting("CHAT_PAGE", True, "serve the web chat page on a plain GET of `CHAT_PATH`"),
    Setting("CHAT_STATS_PATH", "/stats", "JSON statistics endpoint", path=True),
    Setting("CHAT_MAX_MESSAGE_SIZE", 1 << 20,
            "largest message a client may send, bytes; bigger: close 1009"),
    Setting("CHAT_MAX_BACKLOG", 4 << 20,
            "bytes queued for one client beyond its kernel buffer before it is closed as a "
            "slow consumer (1008), checked at every enqueue; frames are shared by reference, "
            "so this bounds how far behind a client may fall more than memory. Must be at "
            "least `CHAT_MAX_MESSAGE_SIZE` + 10 (+ `CHAT_HISTORY_BYTES` with history), so "
            "one message, or a joiner's history, never makes a reader slow"),
    Setting("CHAT_SEND_BUFFER", 64 * 1024,
            "kernel send buffer of each client socket (SO_SNDBUF; Linux doubles it); without "
            "it a client that stops reading holds up to tcp_wmem's maximum (4 MiB here) of "
            "kernel memory; 0: the kernel's autotuning", zero_allowed=True),
    Setting("CHAT_MAX_CONNECTIONS", 0,
            "most clients per process; more get 503 (1013 under the stock worker), counted "
            "in `/stats` `refused.full`; 0: open-files limit minus 100", zero_allowed=True),
    Setting("CHAT_CLOSE_TIMEOUT", 5.0, "seconds to wait for the peer's answer to our close frame"),
    Setting("CHAT_DEFLATE", True,
            "accept a client's permessage-deflate offer (RFC 7692, no context takeover either "
            "way): a broadcast is compressed once per room and flush for the members that "
            "agreed, when that makes it smaller, and they may send compressed messages; "
            "`false`: the 101 never carries the extension. Never under the stock "
            "`GeventWebSocketWorker`, whose 101 gevent-websocket writes"),
    Setting("CHAT_REDIS_URL", "",
            "Redis backplane (`redis://...`); empty: in-memory, one process"),
    Setting("CHAT_REDIS_CHANNEL", "greenchat",
            "pub/sub channel of the backplane, and prefix of its keys"),
    Setting("CHAT_REDIS_CLUSTER", False,
            "`CHAT_REDIS_URL` names a node of a Redis Cluster (Redis 7+): rooms spread over "
            "its shards with sharded pub/sub (SPUBLISH/SSUBSCRIBE), each room's history on "
            "its room's shard"),
    # --- Redis backplane ---------------------------------------------------------------
    Setting("CHAT_REDIS_TIMEOUT", 5.0,
            "seconds Redis may take to answer (a connect, a command, a ping after this long "
            "a silence) before the backplane counts it as lost and reconnects; a frozen or "
            "vanished Redis is noticed within twice this"),
    Setting("CHAT_REDIS_QUEUE_BYTES", 16 << 20,
            "bytes of messages one process holds for Redis while it is slow or away (and "
            "at most 10,000 messages); more are dropped and counted (`backplane_dropped`)"),
    Setting("CHAT_HISTORY_TTL", 86400,
            "with Redis, seconds a room's history stream outlives the room's last message "
            "before Redis deletes it"),
    # --- Hardening ---------------------------------------------------------------------
    Setting("CHAT_HANDSHAKE_TIMEOUT", 10.0,
            "seconds one HTTP exchange may take, from its first byte to the last of the "
            "response (a websocket upgrade: until the upgrade); silent clients and slowloris "
            "are dropped (`refused.handshake_timeout`), and so is a request whose promised "
            "body never comes (`refused.request_timeout`)"),
    Setting("CHAT_KEEPALIVE_TIMEOUT", 5.0,
            "seconds a keep-alive HTTP connection may wait idle for its next request"),
    Setting("CHAT_FAST_PATH", True,
            "answer websocket upgrades to greenchat's routes in the accept loop "
            "(`greenchat serve` and gunicorn.conf.py's worker); false: every request "
            "through pywsgi and Flask, as before the fast path (slower: for comparison, "
            "or to rule the fast path out)"),
    Setting("CHAT_ALLOWED_ORIGINS", "",
            "browser origins allowed to connect, comma-separated, `*` for any; empty: only "
            "the server's own (Origin host = Host header). No Origin (not a browser): "
            "allowed. Others: 403"),
    Setting("CHAT_RATE_LIMIT", 0.0,
            "messages per second one client may send, sustained; 0: no limit",
            zero_allowed=True),
    Setting("CHAT_RATE_BURST", 20, "messages one client may send at once above that rate"),
    Setting("CHAT_RATE_LIMIT_ACTION", "close",
            "over the rate: `close` (1008) or `drop` the message; counted in `rate_limited`",
            choices=("close", "drop")),
    Setting("CHAT_PING_INTERVAL", 60.0,
            "a client silent this long is pinged; silent for another interval, it is "
            "dropped (`idle_dropped`); 0: never", zero_allowed=True),
    # --- Rooms -------------------------------------------------------------------------
    Setting("CHAT_ROOMS_PATH", "/rooms",
            "prefix of the named rooms: websocket `<prefix>/<name>`, presence, publish API "
            "(see Rooms)", path=True),
    Setting("CHAT_HISTORY", 0,
            "messages of each room kept and sent to a client when it joins, before live "
            "ones; 0: none. With Redis, kept in Redis Streams", zero_allowed=True),
    Setting("CHAT_PRESENCE_NOTICES", False,
            "send each named room's members `{\"presence\": {\"room\": ..., \"members\": N}}` "
            "when the count changes or someone joins, at most once a second per room; "
            "never to the lobby"),
    Setting("CHAT_PUBLISH_TOKEN", "",
            "bearer token of `POST <rooms>/<name>/messages` and `POST <users>/<id>/messages`; "
            "empty: that API is off (404)"),
    Setting("CHAT_HISTORY_BYTES", 1 << 20,
            "bytes of history kept per room (the newest messages that fit; a message larger "
            "than this is not kept)"),
    Setting("CHAT_HISTORY_TOTAL_BYTES", 64 << 20,
            "bytes of history one process keeps in memory over all rooms; past it, the rooms "
            "without members used least recently forget theirs (kept in Redis with Redis)"),
    Setting("CHAT_MAX_ROOMS", 10_000,
            "rooms with members one process holds; a client joining another room gets 503 "
            "(1013 under the stock worker), counted in `refused.rooms`"),
    # --- The JSON endpoint -------------------------------------------------------------
    Setting("CHAT_JSON_PATH", "/ws",
            "websocket endpoint of the JSON protocol: many rooms per socket, message ids, "
            "recovery with `since` (see The JSON endpoint)", path=True),
    Setting("CHAT_MAX_ROOMS_PER_CONNECTION", 100,
            "rooms one client of the JSON endpoint may be in at once; a join beyond gets "
            "an error event `room_limit`"),
    Setting("CHAT_PRESENCE_USERS", False,
            "with `CHAT_PRESENCE_NOTICES`, JSON clients' presence events also list the "
            "identities (from the authorize hook) of the room's members, in every process "
            "(with Redis, as of each worker's last report)"),
    # --- Operability -------------------------------------------------------------------
    Setting("CHAT_METRICS_PATH", "/metrics", "Prometheus metrics", path=True),
    Setting("CHAT_DASHBOARD_PATH", "/dashboard", "live dashboard page", path=True),
    Setting("CHAT_LOG_FORMAT", "text",
            "`text` or `json` logs (`greenchat serve`, `gunicorn.conf.py`)",
            choices=("text", "json")),
    Setting("CHAT_ADMIN_TOKEN", "",
            "bearer token required by `/stats`, `/metrics` and the dashboard's figures "
            "(`Authorization: Bearer ...`; the dashboard page takes `?token=`); empty: open "
            "to anyone"),
    Setting("CHAT_STATS_GREENLETS", False,
            "allow `/stats?greenlets=1`, which counts live greenlets by walking the whole "
            "heap on the event loop (~28 ms at 20,000 clients): for diagnosis only"),
    # --- Deployment --------------------------------------------------------------------
    Setting("CHAT_TRUSTED_PROXIES", "",
            "reverse proxies (addresses or CIDR networks, comma-separated) whose "
            "`X-Forwarded-For` names the client in refusal logs: the right-most address "
            "that is not one of them; empty: the TCP peer, header ignored (deploy/nginx/)"),
)

DEFAULTS: dict[str, Any] = {setting.name: setting.default for setting in SETTINGS}
_BY_NAME = {setting.name: setting for setting in SETTINGS}


def from_environ(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The ``CHAT_*`` keys set in ``environ``.

    A setting whose default is a string takes the value as it is (a token of digits stays
    a string); any other is read as JSON (``4096``, ``2.5``, ``true``), or kept as the
    string when it does not parse, so :func:`validate` names the setting and its type.
    An unknown ``CHAT_`` name is refused, so a typo is not silently ignored.
    """
    config = {}
    for key, raw in environ.items():
        if not key.startswith("CHAT_"):
            continue
        setting = _BY_NAME.get(key)
        if setting is None:
            raise ConfigError(f"unknown setting {key} (known: {', '.join(DEFAULTS)})")
        if setting.type is str:
            config[key] = raw
            continue
        try:
            config[key] = json.loads(raw)
        except ValueError:
            config[key] = raw
    return config


def validate(config: Mapping[str, Any]) -> None:
    """Check every ``CHAT_`` key has the type of its default, and sizes are positive."""
    for setting in SETTINGS:
        key, default = setting.name, setting.default
        value = config.get(key, default)
        expected = (int, float) if setting.type is float else setting.type
        if type(value) is bool and setting.type is not bool or not isinstance(value, expected):
            raise ConfigError(f"{key} must be {setting.type.__name__}, got {value!r}")
        if setting.choices and value not in setting.choices:
            raise ConfigError(f"{key} must be one of {', '.join(setting.choices)}, got {value!r}")
        if setting.zero_allowed and value == 0:
            continue
        if isinstance(value, (int, float)) and type(value) is not bool and value <= 0:
            raise ConfigError(f"{key} must be positive, got {value!r}")
    url = config.get("CHAT_REDIS_URL", "")
    if url and not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"CHAT_REDIS_URL must be a redis://, rediss:// or unix:// URL, got {url!r}")
    for setting in SETTINGS:
        value = config.get(setting.name, setting.default)
        if setting.path and not value.startswith("/"):
            raise ConfigError(f"{setting.name} must start with '/', got {value!r}")
    _check_backlog_fits(config)


# The longest header of a server frame: 2 bytes, then a 64-bit length.
MAX_FRAME_HEADER = 10


def _check_backlog_fits(config: Mapping[str, Any]) -> None:
    """A reader is slow when it falls CHAT_MAX_BACKLOG bytes behind: one message of the
    largest size (and a joiner's history burst) must fit, or a fast reader whose kernel
    buffer is smaller than one message would be closed for it."""
    backlog = config.get("CHAT_MAX_BACKLOG", DEFAULTS["CHAT_MAX_BACKLOG"])
    need = config.get("CHAT_MAX_MESSAGE_SIZE", DEFAULTS["CHAT_MAX_MESSAGE_SIZE"]) + MAX_FRAME_HEADER
    parts = "CHAT_MAX_MESSAGE_SIZE + 10"
    if config.get("CHAT_HISTORY", DEFAULTS["CHAT_HISTORY"]):
        need += config.get("CHAT_HISTORY_BYTES", DEFAULTS["CHAT_HISTORY_BYTES"])
        parts += " + CHAT_HISTORY_BYTES"
    if backlog < need:
        raise ConfigError(f"CHAT_MAX_BACKLOG ({backlog}) must be at least {parts} ({need}), "
                          "or a reader would be closed as slow for a single message")


def settings_table() -> str:
    """README.md's settings table in Markdown, one row per setting in declaration order."""
    rows = ["| key | default | type | meaning |", "|---|---|---|---|"]
    for setting in SETTINGS:
        rows.append(f"| `{setting.name}` | {_shown(setting.default)} | "
                    f"{setting.type.__name__} | {setting.doc} |")
    return "\n".join(rows) + "\n"


def _shown(default: Any) -> str:
    if default == "":
        return "empty"
    return f"`{json.dumps(default) if isinstance(default, bool) else default}`"
