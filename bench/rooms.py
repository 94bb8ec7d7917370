"""Rooms cost nothing extra: N connections in one room against the same N over R rooms.

For every run, and in this order within it, each layout is measured on a fresh
``python -m chat serve`` (one process, in-memory backplane):

1. memory: the server's RSS with N connections idle for ``--idle`` seconds, minus its RSS
   after a warm-up (500 connected to the same rooms, then closed, server back to 0), / N.
   A growth under ``MEMORY_RESOLUTION_KB`` is reported as unmeasurable (``null`` in the
   JSON), and a memory ratio only from runs where both layouts were measured: at a few
   hundred connections RSS barely moves, as they reuse what the warm-up freed;
2. CPU per delivery: ``--rounds`` rounds (after ``--warm-rounds`` unmeasured ones); in
   each, one member of every room sends one message, so every connection receives one
   message per round in both layouts (one message to N, or R messages to N/R each). The
   server's CPU over the measured rounds (every thread's schedstat) / the deliveries its
   ``/stats`` counted in them.

Every connection must receive every message exactly once; anything lost, duplicated or
refused stops the run with exit code 1. The load client is ``chat/bench/loadclient.py``
in this process, one per room (each its own path); it holds N sockets, so N + 100 must
fit the open-files limit here and in the server.

    .venv/bin/python bench/rooms.py --connections 10000 --rooms 100 --runs 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

# _harness first: it puts this checkout on sys.path for the chat imports below.
from _harness import WARMUP, Child, check_host, environment, get_stats, tail, wait_until
from chat.bench.errors import BenchError
from chat.bench.loadclient import LoadClient
from chat.system import free_port, open_files_limit, process_cpu_ns, process_rss_bytes

SOURCE = "127.0.0.2"
IN_FLIGHT = 200  # LoadClient's handshakes in flight; one room connects at a time
# The smallest RSS growth read as a cost per connection. Below it RSS moves by what the
# allocator happens to touch or reuse, not with N. Measured here (2026-11-30, one room
# against 4): at -n 40 neither layout grew in 4 runs each; at -n 200 one room grew
# 108-772 KB and 4 rooms 0-28 KB (6 runs each); at -n 1000 both 312-1376 KB; at -n 5000
# (4 or 50 rooms) 2.6-4.5 MB, 0.5-0.9 KB/conn (BENCHMARKS.md: 0.55-0.59 at 10,000).
MEMORY_RESOLUTION_KB = 1024


def start_server(logdir: Path, name: str) -> tuple[Child, int]:
    port = free_port()
    server = Child(name, [sys.executable, "-m", "chat", "serve", "--host", "127.0.0.1",
                          "--port", str(port)], logdir / f"{name}.log", pipe=False)

    def ready():
        if server.proc.poll() is not None:
            raise BenchError(f"server exited with {server.proc.returncode}:\n{tail(server.log)}")
        try:
            return get_stats(port)
        except OSError:
            return None

    wait_until(ready, 30, "the server to answer /stats")
    return server, port


def clients_for(port: int, rooms: int) -> list[LoadClient]:
    return [LoadClient("127.0.0.1", port, path=f"/rooms/r{i}") for i in range(rooms)]


def connect(clients: list[LoadClient], total: int) -> None:
    share = total // len(clients)
    for client in clients:
        result = client.connect(share, [SOURCE], timeout=120)
        if not result.ok:
            raise BenchError(f"connections failed: {result.failures}")


def broadcast_round(clients: list[LoadClient], round_number: int) -> None:
    """One message from one member of every room; every connection must get it."""
    for client in clients:
        if client.send_probe(round_number) is None:
            raise BenchError("a room has no connection left")
    for client in clients:
        result = client.expect(round_number, timeout=60)
        if not result.ok:
            raise BenchError(f"round {round_number}: {result}")


def kb_per_connection(growth_kb: int, n: int) -> float | None:
    """RSS growth per connection; None when the growth is below the resolution."""
    return growth_kb / n if growth_kb >= MEMORY_RESOLUTION_KB else None


def median_or_none(values: list[float | None]) -> float | None:
    """The median of the measured values; None when none was measured."""
    measured = [value for value in values if value is not None]
    return statistics.median(measured) if measured else None


def figures(row: dict) -> str:
    """A layout's memory and CPU figures, for one run or the median of all."""
    memory = ("memory unmeasurable" if row["kb_per_connection"] is None
              else f"{row['kb_per_connection']:.2f} KB/conn")
    return f"{memory}, {row['cpu_us_per_delivery']:.3f} us CPU/delivery"


def measure(args: argparse.Namespace, rooms: int, logdir: Path, run: int) -> dict:
    server, port = start_server(logdir, f"server-{rooms}-rooms-run{run}")
    clients: list[LoadClient] = []
    try:
        warm = clients_for(port, rooms)
        connect(warm, max(WARMUP, rooms))
        for client in warm:
            client.close()
        wait_until(lambda: get_stats(port)["connections"] == 0, 30, "warm-up clients to leave")
        time.sleep(0.5)
        rss_before = process_rss_bytes(server.pid) // 1024

        clients = clients_for(port, rooms)
        connect(clients, args.connections)
        n = sum(client.connections for client in clients)
        wait_until(lambda: get_stats(port)["connections"] == n, 30, f"{n} connections")
        time.sleep(args.idle)
        rss_after = process_rss_bytes(server.pid) // 1024

        for r in range(1, args.warm_rounds + 1):
            broadcast_round(clients, r)
        deliveries_before = get_stats(port)["deliveries"]
        cpu_before = process_cpu_ns(server.pid)
        for r in range(args.warm_rounds + 1, args.warm_rounds + args.rounds + 1):
            broadcast_round(clients, r)
        cpu = process_cpu_ns(server.pid) - cpu_before
        deliveries = get_stats(port)["deliveries"] - deliveries_before
        # The /stats requests themselves are a few hundred us of the CPU above: < 0.1%.
        if deliveries != n * args.rounds:
            raise BenchError(f"{deliveries} deliveries counted, {n * args.rounds} expected")
        for client in clients:
            tally = client.tally(args.warm_rounds + args.rounds)
            if tally["missing"] or tally["duplicated"]:
                raise BenchError(f"messages missing or duplicated: {tally}")
        growth = rss_after - rss_before
        return {"rooms": rooms, "connections": n,
                "kb_per_connection": kb_per_connection(growth, n),
                "cpu_us_per_delivery": cpu / 1000 / deliveries,
                "deliveries": deliveries, "rss_kb_before": rss_before, "rss_kb_after": rss_after,
                "rss_growth_kb": growth}
    finally:
        for client in clients:
            client.close()
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--connections", type=int, default=10_000)
    parser.add_argument("--rooms", type=int, default=100, help="rooms of the spread layout")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=20, help="measured broadcast rounds")
    parser.add_argument("--warm-rounds", type=int, default=3)
    parser.add_argument("--idle", type=float, default=2.0, help="seconds idle before RSS")
    parser.add_argument("--json", type=Path, help="write every run and the summary here")
    args = parser.parse_args(argv)
    if args.connections < args.rooms or args.rooms < 2 or args.runs < 1 or args.rounds < 1:
        parser.error("need --rooms >= 2, --connections >= --rooms, --runs and --rounds >= 1")
    if args.connections % args.rooms:
        parser.error(f"--connections must be a multiple of --rooms ({args.rooms})")
    open_files_limit()  # this process holds every client socket: soft limit up to hard
    check_host(args.connections, IN_FLIGHT, args.connections + max(WARMUP, args.rooms))

    logdir = Path(tempfile.mkdtemp(prefix="greenchat-rooms-"))
    runs = []
    try:
        for run in range(1, args.runs + 1):
            for rooms in (1, args.rooms):
                result = measure(args, rooms, logdir, run)
                result["run"] = run
                runs.append(result)
                print(f"run {run}: {rooms:>4} room(s) {figures(result)} (RSS "
                      f"+{result['rss_growth_kb']} KB)", flush=True)
    except (BenchError, OSError) as error:  # OSError: the server or its /proc files gone
        print(f"rooms benchmark failed: {error}\n(logs in {logdir})", file=sys.stderr)
        return 1

    summary = {}
    for rooms in (1, args.rooms):
        mine = [r for r in runs if r["rooms"] == rooms]
        summary[str(rooms)] = {key: median_or_none([r[key] for r in mine])
                               for key in ("kb_per_connection", "cpu_us_per_delivery")}
    # Ratios per run (both layouts measured back to back), then their median; a memory
    # ratio only from runs where both layouts grew measurably.
    pairs = list(zip(runs[0::2], runs[1::2]))
    ratios = {key: median_or_none([b[key] / a[key] if None not in (a[key], b[key]) else None
                                   for a, b in pairs])
              for key in ("kb_per_connection", "cpu_us_per_delivery")}
    memory_ratio = (f"unmeasurable (in every run a layout's RSS grew less than "
                    f"{MEMORY_RESOLUTION_KB} KB)" if ratios["kb_per_connection"] is None
                    else f"{ratios['kb_per_connection']:.3f}")
    print(f"\nmedian of {args.runs} runs, {args.connections} connections:")
    print(f"  1 room:     {figures(summary['1'])}")
    print(f"  {args.rooms} rooms: {figures(summary[str(args.rooms)])}")
    print(f"  {args.rooms} rooms / 1 room (median of per-run ratios): memory {memory_ratio}, "
          f"CPU/delivery {ratios['cpu_us_per_delivery']:.3f}")
    if args.json:
        args.json.write_text(json.dumps({
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
            "environment": environment(), "memory_resolution_kb": MEMORY_RESOLUTION_KB,
            "runs": runs, "median": summary,
            "ratio_spread_to_one_room": ratios}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
