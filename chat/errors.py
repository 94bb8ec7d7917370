"""The one root of greenchat's exceptions, so a caller can catch ours and nothing else.

A leaf module: it imports nothing, so every layer (the codec included) can derive its
errors from :class:`ChatError` without depending on anything above it.
"""

from __future__ import annotations

__all__ = ["ChatError", "ConfigError"]


class ChatError(Exception):
    """Root of all greenchat errors."""


class ConfigError(ChatError, ValueError):
    """A setting has the wrong type or value; the message is one line, fit for a CLI."""
