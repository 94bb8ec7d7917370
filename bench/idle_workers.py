"""What many gunicorn workers on Redis cost with no client at all: the reports loop, and
the memory of the workers themselves.

    .venv/bin/python bench/idle_workers.py 63 --runs 3
    GUNICORN_PRELOAD=1 .venv/bin/python bench/idle_workers.py 63 --runs 3 --tag=-preload

Every worker writes its /stats figures to Redis each second and reads everyone's, so that
any worker answers /stats and /metrics for all of them. Reading grows with the square of
the workers; at a million clients (63 workers) it was the largest cost of an idle server.
This starts ``Cluster`` (redis-server and gunicorn with W workers), waits ``--settle``
seconds after every worker reported (the waiting asks /stats, which makes a worker read
every second for a while), then measures the CPU time of gunicorn (master and workers)
and of redis-server over ``--seconds``: once with nobody asking, once with one /stats
request a second (what ``one_box.py`` and a dashboard do). Each run starts afresh.
At the end of a run it reads the memory of gunicorn (master and workers), RSS and PSS:
at a million clients the 63 workers' own memory is most of the server's.

Run it from two checkouts to compare code (each runs its own ``gunicorn.conf.py``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

# _harness first: it puts this checkout on sys.path for the chat imports below.
from _harness import ROOT, Cluster, get_stats, repeat_runs
from chat.bench.observe import process_pss_bytes
from chat.system import process_cpu_seconds, process_rss_bytes

RESULTS = ROOT / "bench" / "results"


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += process_cpu_seconds(pid)
        except (OSError, ValueError):
            pass  # gone meanwhile
    return total


def measure(cluster: Cluster, seconds: float, poll: bool) -> dict:
    """Cores used by gunicorn and by redis-server over ``seconds`` (``poll``: GET /stats
    once a second meanwhile)."""
    server = [cluster.master.pid, *cluster.worker_pids()]
    redis = [cluster.redis.pid]
    started = time.monotonic()
    server_before, redis_before = cpu_seconds(server), cpu_seconds(redis)
    requests = 0
    while time.monotonic() - started < seconds:
        if poll:
            get_stats(cluster.port, timeout=10)
            requests += 1
        time.sleep(1.0)
    elapsed = time.monotonic() - started
    return {"seconds": round(elapsed, 2), "stats_requests": requests,
            "server_cores": (cpu_seconds(server) - server_before) / elapsed,
            "redis_cores": (cpu_seconds(redis) - redis_before) / elapsed}


def memory(cluster: Cluster) -> dict:
    """RSS and PSS of gunicorn's master and workers, in bytes: their sum over all, and
    per worker (the master apart). RSS counts a page shared by fork once per process,
    PSS once in all."""
    workers = cluster.worker_pids()
    master = cluster.master.pid
    rss = {pid: process_rss_bytes(pid) for pid in [master, *workers]}
    pss = {pid: process_pss_bytes(pid) for pid in [master, *workers]}
    return {"server_rss_bytes": sum(rss.values()), "server_pss_bytes": sum(pss.values()),
            "worker_rss_bytes": statistics.median(rss[pid] for pid in workers),
            "worker_pss_bytes": statistics.median(pss[pid] for pid in workers),
            "master_pss_bytes": pss[master]}


def one_run(args: argparse.Namespace, name: str) -> dict:
    cluster = Cluster(args.workers, timeout=args.boot_timeout,
                      log=RESULTS / f"{name}.server.log")
    try:
        time.sleep(args.settle)
        quiet = measure(cluster, args.seconds, poll=False)
        asked = measure(cluster, args.seconds, poll=True)
        return {"name": name, "workers": args.workers, "quiet": quiet, "asked": asked,
                "memory": memory(cluster)}
    finally:
        cluster.stop()
        log = RESULTS / f"{name}.server.log"
        if log.exists() and log.stat().st_size == 0:
            log.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workers", type=int, help="gunicorn workers on the Redis backplane")
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="each measurement's length (default 30)")
    parser.add_argument("--settle", type=float, default=35.0,
                        help="seconds between every worker reporting and the first "
                             "measurement (default 35: longer than a worker reads for "
                             "after being asked)")
    parser.add_argument("--boot-timeout", type=float, default=120.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tag", default="", help="appended to the result files' names")
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    args = parser.parse_args(argv)
    if not 1 <= args.workers <= 500 or args.seconds <= 0 or args.settle < 0 or args.runs < 1:
        parser.error("workers 1-500, --seconds > 0, --settle >= 0, --runs >= 1")
    stem = f"{date.today().isoformat()}-idle-workers-{args.workers}{args.tag}"
    runs = repeat_runs(args.runs, stem, lambda name: one_run(args, name),
                       lambda run: run, "idle_workers")
    if not runs:
        return 1
    summary = {"command": " ".join(sys.argv), "date": date.today().isoformat(),
               "runs": runs,
               "median": {phase: {key: statistics.median(run[phase][key] for run in runs)
                                  for key in ("server_cores", "redis_cores")}
                          for phase in ("quiet", "asked")}}
    summary["median"]["memory"] = {key: statistics.median(run["memory"][key] for run in runs)
                                   for key in runs[0]["memory"]}
    print(json.dumps(summary["median"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0 if len(runs) == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
