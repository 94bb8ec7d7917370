"""The load generator's own CPU per connection and per received message, against the server's.

A one-box figure measures the server only while the load generator spends less than the
server on each connection and on each message: both share the machine's cores. This
runs ``greenchat bench`` against a fresh server for each run and reads, from its JSON,
both sides' CPU in the connect phase (per connection) and in the hold phase (per
delivery; the generator's per message received), with what the idle phase costs per
second taken off the hold phase (polling, and nothing else, since nobody talks).

    .venv/bin/python bench/generator_cost.py --runs 3
    .venv/bin/python bench/generator_cost.py -n 2000 --probe-rate 20 --hold 10 --servers ours,floor

Servers: ``ours`` (``greenchat serve``) and the peers of ``greenchat bench --compare``
(``floor``, ``websockets``, ``picows``). Prints the median of the runs, and the raw values
with ``--json``. Exit status 1 when a run failed (lost connections or deliveries).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# _harness first: it puts this checkout on sys.path for the chat imports below.
from _harness import ROOT, Child, environment, get_stats, tail, wait_until
from chat.bench.errors import BenchError
from chat.bench.peers import PEERS, start_peer
from chat.system import free_port

FIGURES = [
    # (key in the report, where it is)
    ("server_us_per_connection", ("server", "cpu_us_per_connection")),
    ("generator_us_per_connection", ("generator", "cpu_us_per_connection")),
    ("server_us_per_delivery", ("server", "cpu_us_per_delivery")),
    ("generator_us_per_message", ("generator", "cpu_us_per_message")),
    ("server_idle_cores", ("server", "idle_cpu_cores")),
    ("generator_idle_cores", ("generator", "idle_cpu_cores")),
    ("server_hold_kernel_share", ("server", "hold_kernel_share")),
    ("generator_hold_kernel_share", ("generator", "hold_kernel_share")),
]


def one_run(server: str, args: argparse.Namespace, logdir: Path, tag: str) -> dict:
    """A fresh ``server``, one ``greenchat bench`` against it; the figures of its JSON."""
    report_path = logdir / f"{tag}-{server}.json"
    if server == "ours":
        port = free_port()
        child = Child("greenchat serve", [sys.executable, "-m", "chat", "serve", "--host",
                                          "127.0.0.1", "--port", str(port)],
                      logdir / f"{tag}-ours.log", pipe=False)
        stop = child.stop
        pid = child.pid

        def ready() -> bool:
            if child.proc.poll() is not None:
                raise BenchError(f"greenchat serve exited: {tail(child.log)}")
            return _answers(port)
        wait_until(ready, 30, "greenchat serve to answer /stats")
    else:
        peer = start_peer(server)
        port, pid, stop = peer.port, peer.pid, peer.stop
    try:
        command = [sys.executable, "-m", "chat", "bench", f"ws://127.0.0.1:{port}/", "-n",
                   str(args.connections), "--hold", str(args.hold), "--probe-rate",
                   str(args.probe_rate), "--idle", str(args.idle), "--server-pid", str(pid),
                   "--json", str(report_path)]
        if server != "ours":
            command.append("--no-stats")
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                              timeout=120 + args.connections / 50 + args.idle + args.hold)
    finally:
        stop()
    if not report_path.exists():
        raise BenchError(f"greenchat bench against {server} wrote no report (exit "
                         f"{done.returncode}): {done.stderr.strip()[-500:]}")
    run = json.loads(report_path.read_text())["runs"][0]
    figures = {key: run[side][name] for key, (side, name) in FIGURES}
    figures.update(ok=run["ok"], connections=run["connections"]["established"],
                   messages=run["phases"]["hold"]["deliveries"], exit_status=done.returncode)
    return figures


def _answers(port: int) -> bool:
    try:
        return get_stats(port, timeout=2.0)["connections"] == 0
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-n", "--connections", type=int, default=2000)
    parser.add_argument("--hold", type=float, default=10.0, help="seconds of probes")
    parser.add_argument("--probe-rate", type=float, default=20.0, help="probes per second")
    parser.add_argument("--idle", type=float, default=5.0,
                        help="seconds idle before the probes (what polling costs)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--servers", default="ours",
                        help=f"comma-separated: ours, {', '.join(PEERS)}")
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    args = parser.parse_args(argv)
    servers = [name.strip() for name in args.servers.split(",") if name.strip()]
    unknown = [name for name in servers if name != "ours" and name not in PEERS]
    if unknown or not servers or args.runs < 1 or args.connections < 1:
        parser.error(f"bad --servers {unknown} or a count below 1")
    logdir = Path(tempfile.mkdtemp(prefix="greenchat-generator-cost-"))
    results: dict[str, list[dict]] = {name: [] for name in servers}
    failed = None
    try:
        for number in range(1, args.runs + 1):
            for server in servers:
                figures = one_run(server, args, logdir, f"run{number}")
                results[server].append(figures)
                print(f"run {number} {server}: " + ", ".join(
                    f"{key} {figures[key]}" for key, _where in FIGURES), flush=True)
                if not figures["ok"]:
                    failed = f"run {number} against {server} lost connections or deliveries"
                time.sleep(1.0)  # let the sockets of the last run go (TIME_WAIT is free)
    except (BenchError, subprocess.TimeoutExpired, OSError) as error:
        failed = str(error)
    summary = {}
    for server, runs in results.items():
        if runs:
            summary[server] = {key: statistics.median(r[key] for r in runs
                                                      if r[key] is not None)
                               for key, _where in FIGURES
                               if any(r[key] is not None for r in runs)}
    report = {"argv": sys.argv, "config": {k: (str(v) if isinstance(v, Path) else v)
                                           for k, v in vars(args).items()},
              "environment": environment(), "runs": results, "median": summary}
    if failed:
        report["error"] = failed
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n{args.connections} connections, {args.probe_rate:g} probes/s for {args.hold:g} s, "
          f"median of {args.runs} run(s) (idle CPU per second taken off the hold phase)")
    print(f"{'server':<12}{'CPU us/connection':>28}{'CPU us/message':>28}"
          f"{'kernel share of that':>28}")
    print(f"{'':<12}" + f"{'server':>14}{'generator':>14}" * 3)
    for server, row in summary.items():
        print(f"{server:<12}" + "".join(f"{row.get(key, float('nan')):>14.2f}" for key in (
            "server_us_per_connection", "generator_us_per_connection",
            "server_us_per_delivery", "generator_us_per_message",
            "server_hold_kernel_share", "generator_hold_kernel_share")))
    if failed:
        print(f"FAILED: {failed} (logs in {logdir})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
