"""What the operating system allows this process: open files, listen backlog.

gunicorn.conf.py and ``greenchat serve`` size themselves from these instead of trusting
defaults that silently cap a websocket server (gunicorn's 1000 worker connections,
gevent's listen backlog of 128).
"""

from __future__ import annotations

import resource
from pathlib import Path

__all__ = ["open_files_limit", "listen_backlog", "max_clients_per_process", "read_sysctl"]

# File descriptors a server process keeps for itself: listening socket, epoll, logs,
# the event loop's pipes, imported modules being read.
RESERVED_FDS = 100


def read_sysctl(name: str, proc: Path = Path("/proc/sys")) -> str | None:
    """The value of a sysctl such as ``net.core.somaxconn``, or None when unreadable."""
    try:
        return (proc / name.replace(".", "/")).read_text().strip()
    except OSError:
        return None


def open_files_limit() -> int:
    """The soft RLIMIT_NOFILE, raised to the hard limit first when allowed (no root needed)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def max_clients_per_process() -> int:
    """Websocket clients one process can hold: one file descriptor each, minus our own."""
    return max(1, open_files_limit() - RESERVED_FDS)


def listen_backlog(default: int = 4096) -> int:
    """The largest accept backlog the kernel will grant (``net.core.somaxconn``)."""
    value = read_sysctl("net.core.somaxconn")
    return int(value) if value and value.isdigit() else default
