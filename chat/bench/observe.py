"""Watching the server and the machine once a second while the load runs.

The server is read over HTTP (``GET /stats``: connections, counters, RSS), so this works
against a remote or multi-worker server too; ``--server-pid`` adds RSS and CPU from
/proc for server processes on this machine. The machine's MemAvailable and Slab show the
kernel's share, which is in no process's RSS (~8 KB per loopback connection).

A thread, because an HTTP request to a server busy with thousands of handshakes can take
a second, and the driver must keep sending probes on time meanwhile.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import os

from ..system import PROC, process_cpu_ns, process_cpu_seconds, process_rss_bytes, read_meminfo

__all__ = ["Observer", "Sample", "covers", "fetch_stats", "process_pss_bytes"]

_TICKS = os.sysconf("SC_CLK_TCK")


def fetch_stats(url: str, timeout: float = 2.0) -> dict:
    """The JSON of a greenchat ``/stats``; OSError or ValueError when there is none."""
    request = urllib.request.Request(url, headers={"Connection": "close"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        stats = json.load(response)
    if not isinstance(stats, dict) or "connections" not in stats:
        raise ValueError("not a greenchat /stats answer (no 'connections')")
    cluster = stats.get("cluster")
    if isinstance(cluster, dict) and "connections" in cluster:
        # Several workers behind a Redis backplane: this answer came from one of them,
        # its "cluster" holds the totals over all of them.
        stats = {**stats, **{k: v for k, v in cluster.items() if k != "per_worker"},
                 "this_worker": {k: stats[k] for k in ("pid", "connections", "rss_bytes")},
                 "per_worker": cluster.get("per_worker", [])}
    return stats


def process_pss_bytes(pid: int | str, root: Path = PROC) -> int:
    """Proportional set size of ``pid``: its private pages plus its share of pages it
    shares. gunicorn workers forked from one master share their interpreter's pages, so
    their RSS summed counts those pages once per worker; their PSS summed (with the
    master's) counts them once. Reads /proc/PID/smaps_rollup (which walks the process's
    page tables: a few ms for a worker, so read it at a run's key moments, not every
    second). OSError when the process is gone."""
    with open(root / str(pid) / "smaps_rollup", "rb") as rollup:
        for line in rollup:
            if line.startswith(b"Pss:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no Pss line in /proc/{pid}/smaps_rollup")


def _sum_over(pids: list[int], read, root: Path) -> float | None:
    """Sum of ``read(pid)`` over the processes still alive; None when none is."""
    values = []
    for pid in pids:
        try:
            values.append(read(pid, root))
        except (OSError, ValueError, IndexError):
            pass
    return sum(values) if values else None


@dataclass
class Sample:
    """One look at the server and the machine, ``t`` seconds after the run began."""

    t: float
    stats: dict | None  # the server's /stats, None when not read or not answered
    server_rss: int | None  # bytes: the --server-pid processes, else /stats rss_bytes
    server_pss: int | None  # bytes, the --server-pid processes; only when asked (poll)
    server_cpu_s: float | None  # the --server-pid processes only
    generator_rss: int | None  # bytes, every load process
    generator_cpu_s: float | None
    mem_available_kb: int | None
    slab_kb: int | None


class Observer:
    """Samples every ``interval`` seconds in a thread; ``poll`` takes one more at once."""

    def __init__(self, *, stats_url: str | None, server_pids: list[int],
                 generator_pids: list[int], began: float, interval: float = 1.0,
                 root: Path = PROC) -> None:
        self.stats_url = stats_url
        self.stats_error: str | None = None if stats_url else "not asked for"
        self.server_pids = list(server_pids)
        self.generator_pids = list(generator_pids)
        self.began = began
        self.interval = interval
        self.root = root
        self.samples: list[Sample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="greenchat-bench-observer",
                                        daemon=True)

    def start(self) -> "Observer":
        """Take a first sample (which decides whether /stats is there), then start polling."""
        first = self.poll()
        if self.stats_url and first.stats is None:
            self.stats_url = None  # a server without /stats: do not ask again every second
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self, pss: bool = False) -> Sample:
        """One sample now; ``pss``: with the server processes' PSS too (costly, see
        ``process_pss_bytes``)."""
        stats = None
        if self.stats_url:
            try:
                stats = fetch_stats(self.stats_url)
                self.stats_error = None
            except (OSError, ValueError) as error:
                reason = getattr(error, "reason", None) or error
                self.stats_error = f"{self.stats_url}: {reason}"
        meminfo = read_meminfo(self.root)
        server_rss = _sum_over(self.server_pids, process_rss_bytes, self.root)
        if server_rss is None and stats is not None:
            server_rss = stats.get("rss_bytes")
        sample = Sample(
            t=time.monotonic() - self.began,
            stats=stats,
            server_rss=None if server_rss is None else int(server_rss),
            server_pss=self._server_pss() if pss else None,
            server_cpu_s=_sum_over(self.server_pids, process_cpu_seconds, self.root),
            generator_rss=_int_or_none(_sum_over(self.generator_pids, process_rss_bytes,
                                                 self.root)),
            generator_cpu_s=_sum_over(self.generator_pids, process_cpu_seconds, self.root),
            mem_available_kb=meminfo.get("MemAvailable"),
            slab_kb=meminfo.get("Slab"),
        )
        with self._lock:
            self.samples.append(sample)
        return sample

    def _server_pss(self) -> int | None:
        return _int_or_none(_sum_over(self.server_pids, process_pss_bytes, self.root))

    def poll_settled(self, since: float, timeout: float, pss: bool = False,
                     workers: int = 0) -> Sample:
        """A sample whose /stats counts everything up to ``since`` (a ``time.time()``)
        over ``workers`` workers at least (``covers``), or the last one tried after
        ``timeout`` seconds (polled twice a second; ``pss`` read only in the one returned).

        Behind a Redis backplane a worker answers for all of them from their reports,
        each written once a second and read a second or two later: taken the moment the
        load stopped, the counters summed from them missed the last second or two (4,998
        of 6,000 deliveries counted, at 4 workers).
        """
        deadline = time.monotonic() + timeout
        while True:
            sample = self.poll()
            if covers(sample.stats, since, workers) or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        # this very answer: the next may come from a worker that has read less
        return replace(sample, server_pss=self._server_pss()) if pss else sample

    def cpu_ns(self) -> tuple[int | None, int | None]:
        """CPU so far of the server processes and of the load processes, in ns (exact,
        from each thread's schedstat; the samples' CPU moves in 10 ms ticks): the
        phases of a run are timed with two of these. None where no process is known."""
        def total(pids: list[int]) -> int | None:
            value = _sum_over(pids, process_cpu_ns, self.root)
            return None if value is None else int(value)
        return total(self.server_pids), total(self.generator_pids)

    def kernel_share(self) -> tuple[float | None, float | None]:
        """System CPU so far (s, 10 ms ticks) of the server and of the load processes: on
        loopback most of a send's or a recv's cost is the kernel's, this says how much."""
        def total(pids: list[int]) -> float | None:
            return _sum_over(pids, _system_seconds, self.root)
        return total(self.server_pids), total(self.generator_pids)

    @property
    def latest(self) -> Sample | None:
        with self._lock:
            return self.samples[-1] if self.samples else None

    def snapshot(self) -> list[Sample]:
        with self._lock:
            return list(self.samples)


def covers(stats: dict | None, since: float, workers: int = 0) -> bool:
    """Whether a /stats answer counts everything up to ``since`` (a ``time.time()``): a
    lone process answers live; an answer for several workers (``per_worker``), only once
    it has ``workers`` of them at least (those of an earlier answer: a worker whose
    report the answering one has not read is missing, not zero) and every worker's
    report in it was written after ``since``."""
    if stats is None:
        return False
    reports = stats.get("per_worker")
    if reports is None:
        return True
    return (len(reports) >= max(1, workers)
            and all(w.get("reported", 0) >= since for w in reports))


def _system_seconds(pid: int, root: Path = PROC) -> float:
    """System (kernel) CPU time of ``pid`` so far, in seconds (stime, 10 ms ticks)."""
    fields = (root / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[12]) / _TICKS


def _int_or_none(value: float | None) -> int | None:
    return None if value is None else int(value)
