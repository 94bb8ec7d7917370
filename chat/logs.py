"""Log lines for ``greenchat serve`` and gunicorn: text for people, JSON lines for log
collectors (CHAT_LOG_FORMAT=json).

A JSON line is one object: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
plus every ``extra=`` field of the call, so a start line carries ``bind``, ``backplane``
and the limits as fields a collector can query rather than words to parse. Only the
programs' entry points call ``configure`` or ``gunicorn_config``: the library itself
(``Chat``, the hub) only logs, so an embedding application keeps its own logging setup.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime, timezone
from typing import Any, Mapping

__all__ = ["FORMATS", "JsonFormatter", "TextFormatter", "configure", "gunicorn_config",
           "format_from_environ"]

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# gunicorn's own line format, kept for its lines and ours under gunicorn in text mode.
GUNICORN_TEXT_FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(message)s"
GUNICORN_DATE_FORMAT = "[%Y-%m-%d %H:%M:%S %z]"

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """The plain format greenchat has always printed (extras are not shown)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)


def format_from_environ(environ: Mapping[str, str] = os.environ) -> str:
    """CHAT_LOG_FORMAT when it is a known format, else "text" (create_app then refuses a
    bad value with its one-line error)."""
    value = environ.get("CHAT_LOG_FORMAT", "text")
    return value if value in FORMATS else "text"


def _formatter(fmt: str) -> logging.Formatter:
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return JsonFormatter() if fmt == "json" else TextFormatter()


def configure(fmt: str = "text", level: str | int = "info") -> None:
    """Send every log record to stderr in ``fmt``, from ``level`` up (for ``greenchat``
    commands; replaces handlers a previous call installed)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_formatter(fmt))
    logging.basicConfig(level=level.upper() if isinstance(level, str) else level,
                        handlers=[handler], force=True)


def gunicorn_config(fmt: str = "text", level: str = "info") -> dict[str, Any]:
    """gunicorn's ``logconfig_dict``: gunicorn's lines and greenchat's (the root logger)
    through one stderr handler, in gunicorn's own text format or as JSON lines.

    gunicorn merges this over its defaults key by key, so every key it defines is given
    here: its default sends gunicorn.error both to its own handler and, propagated, to
    the root's, which would print each line twice.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    formatter = ({"()": "chat.logs.JsonFormatter"} if fmt == "json" else
                 {"format": GUNICORN_TEXT_FORMAT, "datefmt": GUNICORN_DATE_FORMAT})
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "root": {"level": level.upper(), "handlers": ["error_console"]},
        "loggers": {
            "gunicorn.error": {"level": level.upper(), "handlers": [], "propagate": True},
            "gunicorn.access": {"level": "INFO", "handlers": [], "propagate": True},
        },
        "handlers": {
            "error_console": {"class": "logging.StreamHandler", "formatter": "generic",
                              "stream": "ext://sys.stderr"},
        },
        "formatters": {"generic": formatter},
    }
