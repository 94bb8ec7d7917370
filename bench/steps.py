"""Step mode on one machine: how many clients each server keeps within a p95 delivery
latency of 250 ms, greenchat on two gunicorn workers with Redis against the peers.

    .venv/bin/python bench/steps.py --runs 3
    .venv/bin/python bench/steps.py -n 40000 --step-clients 2000 --peers websockets,picows

For each run: a redis-server and gunicorn (gunicorn.conf.py, ``--workers`` workers on the
Redis backplane) started fresh, then one ``greenchat bench --step-clients S --compare
PEERS`` against it: clients are added S at a time, each step followed by
``--step-broadcasts`` probes, until a step's p95 delivery latency passes ``--max-p95-ms``;
then the same against each peer (``chat/bench/peers.py``), each one process, as their
libraries run. The figure per server is the clients of its last step within the limit;
the summary gives each run's and their median. Results go to
bench/results/DATE-steps[-runK].{json,png} and DATE-steps.summary.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path

# _harness first: it puts this checkout on sys.path for the chat imports below.
from _harness import ROOT, Cluster, environment, repeat_runs
from chat.bench.errors import BenchError
from chat.bench.peers import parse_peers

RESULTS = ROOT / "bench" / "results"


def most_within(run: dict, limit_ms: float) -> int:
    """Clients of the last step whose p95 was within ``limit_ms`` (0: not even the first)."""
    within = 0
    for step in run["steps"]:
        if step["p95_ms"] > limit_ms or step["missing"]:
            break
        within = step["clients"]
    return within


def one_run(args: argparse.Namespace, stem: str) -> dict:
    cluster = Cluster(args.workers, log=args.out / f"{stem}.server.log")
    report_path = args.out / f"{stem}.json"
    try:
        command = [sys.executable, "-m", "chat", "bench", cluster.url, "-n",
                   str(args.connections), "--step-clients", str(args.step_clients),
                   "--step-broadcasts", str(args.step_broadcasts), "--probe-rate",
                   str(args.probe_rate), "--max-p95-ms", str(args.max_p95_ms), "--hold", "0",
                   "--drain-timeout", str(args.drain_timeout), "--inflight",
                   str(args.inflight), "--compare", ",".join(args.peers), "--json",
                   str(report_path), "--plot", str(args.out / f"{stem}.png"), "--progress"]
        for pid in cluster.worker_pids():
            command += ["--server-pid", str(pid)]
        print("steps:", " ".join(command[3:18]), "...", flush=True)
        done = subprocess.run(command, cwd=ROOT, timeout=3600)
    finally:
        cluster.stop()
        log = args.out / f"{stem}.server.log"
        if log.exists() and log.stat().st_size == 0:
            log.unlink()  # gunicorn logs warnings only: nothing to keep
    if not report_path.exists():
        raise BenchError(f"greenchat bench wrote no report (exit {done.returncode})")
    report = json.loads(report_path.read_text())
    return {"json": str(report_path), "exit_status": done.returncode,
            "servers": {("greenchat" if run["label"] == "target" else run["label"]): {
                "most_clients_within": most_within(run, args.max_p95_ms),
                "stopped_by": run["stopped_by"],
                "steps": [{k: step[k] for k in ("clients", "p50_ms", "p95_ms", "missing")}
                          for step in run["steps"]],
                "server_kb_per_connection": run["server"]["kb_per_connection"]}
                for run in report["runs"]}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-n", "--connections", type=int, default=36000,
                        help="the most clients a step may reach")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (Redis)")
    # a string default goes through parse_peers too, and --help shows it as typed
    parser.add_argument("--peers", type=parse_peers, default="websockets,picows,floor",
                        help="comma-separated: websockets, picows, floor")
    parser.add_argument("--step-clients", type=int, default=3000)
    parser.add_argument("--step-broadcasts", type=int, default=5)
    parser.add_argument("--probe-rate", type=float, default=2.0)
    parser.add_argument("--max-p95-ms", type=float, default=250.0)
    parser.add_argument("--drain-timeout", type=float, default=30.0)
    parser.add_argument("--inflight", type=int, default=200,
                        help="handshakes in flight per load process")
    parser.add_argument("--runs", type=int, default=1, help="fresh servers each; median")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the results go")
    args = parser.parse_args(argv)
    if min(args.connections, args.workers, args.step_clients, args.runs) < 1:
        parser.error("counts must be positive")
    if args.workers < 2:
        parser.error("--workers: at least 2 (one process is greenchat bench --step-clients "
                     "against greenchat serve)")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{date.today().isoformat()}-steps"
    runs = repeat_runs(args.runs, stem, lambda name: one_run(args, name),
                       lambda run: {name: server["most_clients_within"]
                                    for name, server in run["servers"].items()}, "steps")
    if not runs:
        return 1
    names = list(runs[0]["servers"])
    median = {name: statistics.median(run["servers"][name]["most_clients_within"]
                                      for run in runs if name in run["servers"])
              for name in names}
    summary = {"command": " ".join(sys.argv), "date": date.today().isoformat(),
               "workers": args.workers, "limit_ms": args.max_p95_ms,
               "environment": environment(), "median_most_clients_within": median,
               "runs": runs}
    (args.out / f"{stem}.summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\nmost clients within a p95 of {args.max_p95_ms:g} ms, median of {len(runs)} "
          f"run(s); greenchat on {args.workers} gunicorn workers with Redis, each peer one "
          "process:")
    for name, value in median.items():
        print(f"  {name:<12}{value:>10,.0f}   runs: " + ", ".join(
            f"{run['servers'][name]['most_clients_within']:,}" for run in runs))
    return 0 if len(runs) == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
