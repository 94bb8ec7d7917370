"""The one-box experiment: N connections to gunicorn + Redis backplane, all on this machine.

    .venv/bin/python bench/one_box.py 250000
    .venv/bin/python bench/one_box.py 1000000 --hold 20

Starts a redis-server of its own, gunicorn from gunicorn.conf.py with enough workers for
N clients (one SO_REUSEPORT socket each), then ``greenchat bench`` against it; records
the kernel's memory (Slab, MemAvailable) before and at the peak, every worker's share of
the connections, and writes a summary JSON plus the bench's own JSON and PNG into
bench/results/. Every process it started is stopped by PID at the end, also on failure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

# _harness first: it puts this checkout on sys.path for the chat imports below.
from _harness import ROOT, get_stats
from chat.system import free_port, read_meminfo

RESULTS = ROOT / "bench" / "results"
PY = sys.executable


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes, the unit of the summary."""
    return {name: kb * 1024 for name, kb in read_meminfo().items()}


def wait_for(predicate, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"one_box: {what} not ready within {timeout:.0f} s")


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(p) for p in (task / "children").read_text().split()]
    return found


class PeakWatcher(threading.Thread):
    """Polls /stats every 2 s and keeps the sample with the most connections."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.peak: dict = {}
        self.peak_meminfo: dict = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(2.0):
            try:
                cluster = get_stats(self.port, timeout=10).get("cluster", {})
            except (OSError, ValueError):
                continue
            if cluster.get("connections", 0) >= self.peak.get("connections", -1):
                self.peak = cluster
                self.peak_meminfo = meminfo()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("connections", type=int)
    parser.add_argument("--per-worker", type=int, default=16000,
                        help="target clients per gunicorn worker (limit ~19,900)")
    parser.add_argument("--hold", type=float, default=10.0)
    parser.add_argument("--probe-rate", type=float, default=0.2,
                        help="broadcasts per second while holding (0.2 with --hold 10: two)")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds the bench waits for late deliveries after holding")
    parser.add_argument("--inflight", type=int, default=200,
                        help="handshakes in flight per load worker (lower it when the "
                        "machine saturates, or handshakes queue past their timeout)")
    parser.add_argument("--handshake-timeout", type=float, default=30.0)
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    parser.add_argument("--tag", default="", help="added to the result file names")
    args = parser.parse_args()
    if args.connections <= 0 or args.per_worker <= 0:
        parser.error("connections and --per-worker must be positive")

    workers = max(2, math.ceil(args.connections / args.per_worker))
    port = args.port or free_port()
    stem = f"{date.today().isoformat()}-one-box-{args.connections}{args.tag}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    started: list[subprocess.Popen] = []
    logs = RESULTS / f"{stem}.server.log"
    try:
        redis_port = free_port()
        redis = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port",
                                  str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no"], stdout=subprocess.DEVNULL,
                                 start_new_session=True)
        started.append(redis)
        env = dict(os.environ, CHAT_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
                   GUNICORN_WORKERS=str(workers), GUNICORN_BIND=f"127.0.0.1:{port}",
                   GUNICORN_TIMEOUT="300", GUNICORN_LOGLEVEL="warning")
        with open(logs, "w") as log:
            server = subprocess.Popen([PY, "-m", "gunicorn", "-c", "gunicorn.conf.py"], cwd=ROOT,
                                      env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        started.append(server)
        wait_for(lambda: get_stats(port, timeout=10).get("cluster", {}).get("workers") == workers,
                 f"{workers} gunicorn workers", 60 + workers)
        worker_pids = children(server.pid)
        before = meminfo()
        before_stats = get_stats(port, timeout=10)["cluster"]
        watcher = PeakWatcher(port)
        watcher.start()
        bench_json = RESULTS / f"{stem}.json"
        command = [PY, "-m", "chat", "bench", f"ws://127.0.0.1:{port}/", "-n",
                   str(args.connections), "--hold", str(args.hold), "--probe-rate",
                   str(args.probe_rate), "--drain-timeout", str(args.drain_timeout), "--inflight", str(args.inflight),
                   "--handshake-timeout", str(args.handshake_timeout), "--json", str(bench_json), "--plot",
                   str(RESULTS / f"{stem}.png"), "--progress"]
        for pid in worker_pids:
            command += ["--server-pid", str(pid)]
        print("one_box:", " ".join(command[1:6]), "...", flush=True)
        bench = subprocess.run(command, cwd=ROOT)
        watcher.stopping.set()
        watcher.join(5)
        peak = watcher.peak
        per_worker = [w["connections"] for w in peak.get("per_worker", [])]
        summary = {
            "command": " ".join(sys.argv),
            "date": date.today().isoformat(),
            "connections": args.connections,
            "server_workers": workers,
            "bench_exit_status": bench.returncode,
            "peak_connections": peak.get("connections"),
            "per_worker_connections": {"min": min(per_worker, default=0),
                                       "max": max(per_worker, default=0),
                                       "all": per_worker},
            "server_rss_bytes_at_peak": peak.get("rss_bytes"),
            "server_rss_bytes_before": before_stats.get("rss_bytes"),
            "slab_bytes_before": before["Slab"], "slab_bytes_at_peak":
                watcher.peak_meminfo.get("Slab"),
            "mem_available_before": before["MemAvailable"],
            "mem_available_at_peak": watcher.peak_meminfo.get("MemAvailable"),
            "bench_json": str(bench_json.relative_to(ROOT)),
        }
        (RESULTS / f"{stem}.summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(json.dumps({k: v for k, v in summary.items() if k != "per_worker_connections"},
                         indent=1))
        print("per worker: min", summary["per_worker_connections"]["min"], "max",
              summary["per_worker_connections"]["max"])
        return bench.returncode
    finally:
        if logs.exists() and logs.stat().st_size == 0:
            logs.unlink()  # gunicorn logs warnings only: nothing to keep
        for process in reversed(started):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(10)


if __name__ == "__main__":
    sys.exit(main())
