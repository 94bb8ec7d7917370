"""The one exception root of ``greenchat bench``."""

from __future__ import annotations

from ..errors import ChatError

__all__ = ["BenchError"]


class BenchError(ChatError):
    """The benchmark cannot go on; the message is one line for the user.

    ``status`` is the exit status ``greenchat bench`` returns: 1 for a run that failed
    (server unreachable, a worker died), 2 for a plan the machine cannot carry.
    """

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status
