"""The reconnect storm on one machine: N clients of gunicorn + Redis, a restart, their return.

    .venv/bin/python bench/storm.py 100000 --runs 3                  # graceful reload
    .venv/bin/python bench/storm.py 100000 --runs 3 --trigger kill   # workers killed

For each run: a redis-server and gunicorn (gunicorn.conf.py, the Redis backplane) with
ceil(N / --per-worker) workers (at least 2) started fresh, then ``greenchat bench -n N
--storm TRIGGER --master-pid PID``: N clients connect, the server is restarted (SIGHUP to
the master, or SIGKILL to every worker), and every client reconnects with the web page's
backoff (chat/static/index.html) until all are back. Each run's JSON and plot go to
bench/results/DATE-storm-TRIGGER-N[-runK].{json,png}; a summary with the median of the
runs to DATE-storm-TRIGGER-N.summary.json. Every process it started is stopped by PID.
Exit status: 0 when every run got every client back, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path

# _harness first: it puts this checkout on sys.path for the chat imports below.
from _harness import ROOT, Cluster, environment, repeat_runs
from chat.bench.errors import BenchError

RESULTS = ROOT / "bench" / "results"


def one_run(args: argparse.Namespace, stem: str) -> dict:
    workers = max(2, math.ceil(args.connections / args.per_worker))
    out = args.out
    log = out / f"{stem}.server.log"
    cluster = Cluster(workers, log=log)
    try:
        report_path = out / f"{stem}.json"
        command = [sys.executable, "-m", "chat", "bench", cluster.url, "-n",
                   str(args.connections), "--storm", args.trigger, "--master-pid",
                   str(cluster.master.pid), "--storm-timeout", str(args.storm_timeout),
                   "--inflight", str(args.inflight), "--per-worker", str(args.load_per_process),
                   "--handshake-timeout",
                   str(args.handshake_timeout), "--json", str(report_path), "--plot",
                   str(out / f"{stem}.png"), "--progress"]
        for pid in cluster.worker_pids():
            command += ["--server-pid", str(pid)]
        print("storm:", " ".join(command[3:12]), "...", flush=True)
        done = subprocess.run(command, cwd=ROOT, timeout=600 + args.connections / 100
                              + args.storm_timeout)
    finally:
        cluster.stop()
        if log.exists() and log.stat().st_size == 0:
            log.unlink()  # gunicorn logs warnings only: nothing to keep
    if not report_path.exists():
        raise BenchError(f"greenchat bench wrote no report (exit {done.returncode})")
    run = json.loads(report_path.read_text())["runs"][0]
    storm = run["storm"] or {}
    return {"json": str(report_path), "exit_status": done.returncode,
            "ok": run["ok"], "problems": run["problems"], "workers": workers,
            "established": run["connections"]["established"],
            "connect_per_s": run["connections"]["per_s"],
            **{f"time_to_{k}_s": v for k, v in storm.get("time_to_s", {}).items()},
            **{key: storm.get(key) for key in ("outcome", "drops", "first_drop_s",
                                               "last_drop_s", "attempts", "refused",
                                               "errors", "failures")},
            "broadcast_after": storm.get("broadcast_after")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("connections", type=int)
    parser.add_argument("--trigger", choices=("hup", "kill"), default="hup",
                        help="hup: graceful reload; kill: SIGKILL to every worker")
    parser.add_argument("--runs", type=int, default=1, help="fresh server each; median")
    parser.add_argument("--per-worker", type=int, default=16000,
                        help="target clients per gunicorn worker (limit ~19,900)")
    parser.add_argument("--load-per-process", type=int, default=9000,
                        help="connections per load process: at most half its open files, "
                        "since after a hup it keeps each old socket until the server "
                        "closes it while the new one connects (at 16,667 per process a "
                        "100,000 client storm ran out of files: EMFILE)")
    parser.add_argument("--inflight", type=int, default=40,
                        help="handshakes in flight per load process while connecting "
                        "(the reconnections are not limited: the page has no such limit)")
    parser.add_argument("--handshake-timeout", type=float, default=120.0)
    parser.add_argument("--storm-timeout", type=float, default=600.0)
    parser.add_argument("--tag", default="", help="added to the result file names")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the results go")
    args = parser.parse_args(argv)
    if min(args.connections, args.per_worker, args.runs, args.load_per_process) <= 0:
        parser.error("connections, --per-worker, --load-per-process and --runs must be "
                     "positive")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{date.today().isoformat()}-storm-{args.trigger}-{args.connections}{args.tag}"
    runs = repeat_runs(args.runs, stem, lambda name: one_run(args, name),
                       lambda run: {k: v for k, v in run.items() if k != "failures"}, "storm")
    if not runs:
        return 1
    median = {}
    for key in ("time_to_50_s", "time_to_99_s", "time_to_100_s", "attempts", "refused",
                "errors", "connect_per_s"):
        values = [run[key] for run in runs if run.get(key) is not None]
        median[key] = statistics.median(values) if len(values) == len(runs) else None
    summary = {"command": " ".join(sys.argv), "date": date.today().isoformat(),
               "connections": args.connections, "trigger": args.trigger,
               "environment": environment(), "median": median, "runs": runs}
    (args.out / f"{stem}.summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({"median": median}, indent=1))
    return 0 if len(runs) == args.runs and all(run["ok"] for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
