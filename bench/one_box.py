"""The one-box experiment: N connections to gunicorn + Redis backplane, all on this machine.

    .venv/bin/python bench/one_box.py 250000
    .venv/bin/python bench/one_box.py 1000000 --hold 20

Starts a redis-server of its own, gunicorn from gunicorn.conf.py with enough workers for
N clients (one SO_REUSEPORT socket each), then ``greenchat bench`` against it; records
the kernel's memory (Slab, MemAvailable) before and at the peak, the server's memory as
RSS and as PSS (workers forked from one master share pages: their RSS summed counts the
shared ones once per worker, PSS once), every worker's share of the connections, and the
server's CPU while all N sit idle for ``--idle`` seconds (default two keepalive
intervals, CHAT_PING_INTERVAL: the pings to silent clients are what idle costs, and the
server runs with them on). Writes a summary JSON plus the bench's own JSON and PNG into
bench/results/. Every process it started is stopped by PID at the end, also on failure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

# _harness first: it puts this checkout on sys.path for the chat imports below.
from _harness import IN_NETNS, ROOT, Cluster, get_stats, gunicorn_env, rerun_in_netns
from chat.bench.errors import BenchError
from chat.bench.observe import process_pss_bytes
from chat.config import DEFAULTS, from_environ
from chat.system import process_rss_bytes, read_meminfo, read_sysctl

RESULTS = ROOT / "bench" / "results"
PY = sys.executable


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes, the unit of the summary."""
    return {name: kb * 1024 for name, kb in read_meminfo().items()}


def server_memory(pids: list[int]) -> dict[str, int]:
    """RSS and PSS summed over ``pids`` (the master and its workers), in bytes."""
    rss = pss = 0
    for pid in pids:
        try:
            rss += process_rss_bytes(pid)
            pss += process_pss_bytes(pid)
        except (OSError, ValueError):
            pass  # a worker gone meanwhile
    return {"rss_bytes": rss, "pss_bytes": pss}


def ping_interval() -> float:
    """CHAT_PING_INTERVAL as the servers will read it (the environment, else the default)."""
    return float({**DEFAULTS, **from_environ()}["CHAT_PING_INTERVAL"])


class PeakWatcher(threading.Thread):
    """Polls /stats every 2 s and keeps the sample with the most connections, with the
    machine's memory and the server's RSS and PSS at that moment."""

    def __init__(self, cluster: Cluster) -> None:
        super().__init__(daemon=True)
        self.cluster = cluster
        self.peak: dict = {}
        self.peak_meminfo: dict = {}
        self.peak_memory: dict = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(2.0):
            try:
                cluster = get_stats(self.cluster.port, timeout=10).get("cluster", {})
            except (OSError, ValueError):
                continue
            if cluster.get("connections", 0) > self.peak.get("connections", -1):
                self.peak = cluster
                self.peak_meminfo = meminfo()
                self.peak_memory = server_memory([self.cluster.master.pid,
                                                  *self.cluster.worker_pids()])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("connections", type=int)
    parser.add_argument("--per-worker", type=int, default=16000,
                        help="target clients per gunicorn worker (limit ~19,900)")
    parser.add_argument("--idle", type=float, default=None,
                        help="seconds all connected and silent, to measure what idle "
                        "costs (default: two CHAT_PING_INTERVALs)")
    parser.add_argument("--hold", type=float, default=10.0)
    parser.add_argument("--probe-rate", type=float, default=0.2,
                        help="broadcasts per second while holding (0.2 with --hold 10: two)")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds the bench waits for late deliveries after holding")
    parser.add_argument("--inflight", type=int, default=200,
                        help="handshakes in flight per load worker (lower it when the "
                        "machine saturates, or handshakes queue past their timeout)")
    parser.add_argument("--handshake-timeout", type=float, default=30.0)
    parser.add_argument("--load-per-process", type=int, default=None,
                        help="connections per load process (greenchat bench --per-worker; "
                        "default: the open-files limit less 5%%)")
    parser.add_argument("--generator-sched", choices=("batch", "normal"), default="batch",
                        help="the load processes' scheduling policy (greenchat bench "
                        "--generator-sched)")
    parser.add_argument("--read-nap-ms", type=float, default=50.0,
                        help="greenchat bench --read-nap-ms (default 50: a broadcast to this "
                        "many takes seconds, and the load processes' wake-ups are the wall; "
                        "at the million 50 gave twice the connect rate of 10, BENCHMARKS.md)")
    parser.add_argument("--netns", action="store_true",
                        help="run in a new network namespace with a TCP hash table of a "
                        "bucket per socket (root, Linux 6.1+): the host's, sized at boot, "
                        "held ~8 sockets a bucket at the million")
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    parser.add_argument("--tag", default="", help="added to the result file names")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the results go")
    args = parser.parse_args()
    if args.connections <= 0 or args.per_worker <= 0:
        parser.error("connections and --per-worker must be positive")
    if args.netns and IN_NETNS not in os.environ:
        try:
            return rerun_in_netns(2 * args.connections)  # both ends of each on loopback
        except BenchError as error:
            parser.exit(2, f"one_box: {error}\n")
    interval = ping_interval()
    idle = args.idle if args.idle is not None else 2 * interval

    workers = max(2, math.ceil(args.connections / args.per_worker))
    stem = f"{date.today().isoformat()}-one-box-{args.connections}{args.tag}"
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    logs = out / f"{stem}.server.log"
    cluster = Cluster(workers, port=args.port, log=logs, timeout=60.0)
    try:
        worker_pids = cluster.worker_pids()
        before = meminfo()
        before_stats = get_stats(cluster.port, timeout=10)["cluster"]
        before_memory = server_memory([cluster.master.pid, *worker_pids])
        watcher = PeakWatcher(cluster)
        watcher.start()
        bench_json = out / f"{stem}.json"
        command = [PY, "-m", "chat", "bench", cluster.url, "-n",
                   str(args.connections), "--idle", str(idle), "--hold", str(args.hold),
                   "--probe-rate", str(args.probe_rate), "--drain-timeout",
                   str(args.drain_timeout), "--inflight", str(args.inflight),
                   "--handshake-timeout", str(args.handshake_timeout), "--json",
                   str(bench_json), "--plot", str(out / f"{stem}.png"), "--progress",
                   "--generator-sched", args.generator_sched,
                   "--read-nap-ms", str(args.read_nap_ms)]
        if args.load_per_process:
            command += ["--per-worker", str(args.load_per_process)]
        for pid in worker_pids:
            command += ["--server-pid", str(pid)]
        print("one_box:", " ".join(command[1:6]), "...", flush=True)
        bench = subprocess.run(command, cwd=ROOT)
        watcher.stopping.set()
        watcher.join(5)
        peak = watcher.peak
        per_worker = [w["connections"] for w in peak.get("per_worker", [])]
        run = {}
        if bench_json.exists():
            run = json.loads(bench_json.read_text())["runs"][0]
        idle_phase = run.get("phases", {}).get("idle", {})
        summary = {
            "command": " ".join(sys.argv),
            "date": date.today().isoformat(),
            "gunicorn_env": gunicorn_env(),  # GUNICORN_PRELOAD and such
            "connections": args.connections,
            "server_workers": workers,
            # buckets of the kernel's table of established TCP sockets (--netns)
            "tcp_ehash_entries": read_sysctl("net.ipv4.tcp_ehash_entries"),
            "bench_exit_status": bench.returncode,
            "peak_connections": peak.get("connections"),
            "per_worker_connections": {"min": min(per_worker, default=0),
                                       "max": max(per_worker, default=0),
                                       "all": per_worker},
            "server_rss_bytes_at_peak": peak.get("rss_bytes"),
            "server_rss_bytes_before": before_stats.get("rss_bytes"),
            # master and workers from /proc: RSS counts shared pages once per worker
            "server_memory_before": before_memory,
            "server_memory_at_peak": watcher.peak_memory,
            "slab_bytes_before": before["Slab"], "slab_bytes_at_peak":
                watcher.peak_meminfo.get("Slab"),
            "mem_available_before": before["MemAvailable"],
            "mem_available_at_peak": watcher.peak_meminfo.get("MemAvailable"),
            "idle": {"ping_interval_s": interval, "seconds": idle_phase.get("seconds"),
                     "server_cpu_cores": run.get("server", {}).get("idle_cpu_cores"),
                     "generator_cpu_cores": run.get("generator", {}).get("idle_cpu_cores")},
            "bench_json": str(bench_json),
        }
        (out / f"{stem}.summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(json.dumps({k: v for k, v in summary.items() if k != "per_worker_connections"},
                         indent=1))
        print("per worker: min", summary["per_worker_connections"]["min"], "max",
              summary["per_worker_connections"]["max"])
        return bench.returncode
    finally:
        cluster.stop()
        if logs.exists() and logs.stat().st_size == 0:
            logs.unlink()  # gunicorn logs warnings only: nothing to keep


if __name__ == "__main__":
    sys.exit(main())
