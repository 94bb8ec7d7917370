"""Reading Linux's /proc under a root path (a fake tree in tests, ``/proc`` otherwise).

Every function takes the root as an argument, so checks built on them (``preflight``,
a future ``greenchat doctor``) are pure functions of a directory tree.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..limits import read_sysctl as _read_sysctl

__all__ = ["PROC", "read_sysctl", "read_meminfo", "read_open_files_limit",
           "process_rss_bytes", "process_cpu_seconds"]

PROC = Path("/proc")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_TICKS = os.sysconf("SC_CLK_TCK")


def read_sysctl(name: str, root: Path = PROC) -> str | None:
    """A sysctl such as ``net.core.somaxconn`` from ``root/sys``; None when unreadable."""
    return _read_sysctl(name, root / "sys")


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


def read_open_files_limit(root: Path = PROC, pid: int | str = "self") -> tuple[int, int]:
    """(soft, hard) open-files limit of ``pid`` from its ``limits`` file; -1 for unlimited."""
    for line in (root / str(pid) / "limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line[len("Max open files"):].split()[:2]
            return (-1 if soft == "unlimited" else int(soft),
                    -1 if hard == "unlimited" else int(hard))
    raise ValueError(f"no 'Max open files' line in {root / str(pid) / 'limits'}")


def process_rss_bytes(pid: int, root: Path = PROC) -> int:
    """Resident set size of ``pid``; OSError when the process is gone."""
    with open(root / str(pid) / "statm", "rb") as statm:
        return int(statm.read().split()[1]) * _PAGE_SIZE


def process_cpu_seconds(pid: int, root: Path = PROC) -> float:
    """User + system CPU time of ``pid`` so far; OSError when the process is gone."""
    stat = (root / str(pid) / "stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime (fields 14, 15)
