"""Machine facts: what the kernel and the limits allow, and what a process uses.

One module for everything read from /proc or the rlimits, so the server
(``greenchat serve``, gunicorn.conf.py), the doctor, the load generator and the bench
scripts read each fact the same way. Functions that read /proc take its root as an
argument (``/proc`` by default): the doctor and its tests run them on a fake tree.

Sizing from these instead of trusting defaults matters for a websocket server: gunicorn's
1000 worker connections and gevent's listen backlog of 128 silently cap it, and one
process holds one file descriptor per client.

A library leaf: it imports nothing from greenchat.
"""

from __future__ import annotations

import os
import resource
import socket
from pathlib import Path

__all__ = ["PROC", "PAGE_SIZE", "RESERVED_FDS", "sysctl_path", "read_sysctl", "read_meminfo",
           "read_open_files_limit", "open_files_limit", "max_clients_per_process",
           "listen_backlog", "process_rss_bytes", "read_rss_bytes", "process_cpu_seconds",
           "process_cpu_ns", "free_port", "free_ports"]

PROC = Path("/proc")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_TICKS = os.sysconf("SC_CLK_TCK")
# File descriptors a server process keeps for itself: listening socket, epoll, logs,
# the event loop's pipes, imported modules being read.
RESERVED_FDS = 100


# -- the kernel's settings -------------------------------------------------------------

def sysctl_path(name: str, root: Path = PROC) -> Path:
    """The file of a sysctl such as ``net.core.somaxconn`` under ``root/sys``."""
    return root / "sys" / name.replace(".", "/")


def read_sysctl(name: str, root: Path = PROC) -> str | None:
    """The value of a sysctl such as ``net.core.somaxconn``; None when unreadable."""
    try:
        return sysctl_path(name, root).read_text().strip()
    except OSError:
        return None


def read_meminfo(root: Path = PROC) -> dict[str, int]:
    """``/proc/meminfo`` as name -> kB (empty when unreadable)."""
    values: dict[str, int] = {}
    try:
        text = (root / "meminfo").read_text()
    except OSError:
        return values
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            values[name.strip()] = int(fields[0])
    return values


def listen_backlog(default: int = 4096, root: Path = PROC) -> int:
    """The largest accept backlog the kernel will grant (``net.core.somaxconn``)."""
    value = read_sysctl("net.core.somaxconn", root)
    return int(value) if value and value.isdigit() else default


# -- open files: one per client -----------------------------------------------------------

def read_open_files_limit(root: Path = PROC, pid: int | str = "self") -> tuple[int, int]:
    """(soft, hard) open-files limit of ``pid`` from its ``limits`` file; -1 for unlimited."""
    for line in (root / str(pid) / "limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line[len("Max open files"):].split()[:2]
            return (-1 if soft == "unlimited" else int(soft),
                    -1 if hard == "unlimited" else int(hard))
    raise ValueError(f"no 'Max open files' line in {root / str(pid) / 'limits'}")


def open_files_limit() -> int:
    """This process's soft RLIMIT_NOFILE, raised to the hard limit first when allowed
    (no root needed)."""
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


# -- what a process uses -------------------------------------------------------------------

def process_rss_bytes(pid: int | str = "self", root: Path = PROC) -> int:
    """Resident set size of ``pid``; OSError when the process is gone."""
    with open(root / str(pid) / "statm", "rb") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE


def read_rss_bytes() -> int:
    """This process's resident set size; 0 where there is no /proc, so ``/stats``
    still answers there."""
    try:
        return process_rss_bytes()
    except OSError:  # pragma: no cover - Linux always has it
        return 0


def process_cpu_seconds(pid: int | str, root: Path = PROC) -> float:
    """User + system CPU time of ``pid`` so far, in seconds counted in clock ticks (10 ms
    here); OSError when the process is gone."""
    stat = (root / str(pid) / "stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime (fields 14, 15)


def process_cpu_ns(pid: int | str, root: Path = PROC) -> int:
    """Nanoseconds on CPU of every thread of ``pid`` (the first field of each task's
    ``schedstat``): exact, where ``process_cpu_seconds`` moves in 10 ms ticks, which
    is too coarse to time one broadcast. OSError when the process is gone; a thread that
    ends meanwhile is skipped."""
    total = 0
    tasks = root / str(pid) / "task"
    for tid in os.listdir(tasks):
        try:
            total += int((tasks / tid / "schedstat").read_bytes().split()[0])
        except FileNotFoundError:
            pass
    return total


# -- the network ---------------------------------------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago, for a server that cannot be
    given port 0 (tests, bench scripts). Another process may take it meanwhile."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` different free ports, held together while chosen: in a new, empty
    network namespace two ``free_port`` calls in a row gave the same port (redis-server
    and gunicorn then fought over it)."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind((host, 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()
