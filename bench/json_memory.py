"""What a client of the JSON endpoint costs in k rooms: RSS per connection for each k.

The issue's budget is today's 0.65 KB per idle connection + ~0.1 KB per room. For each
k (``--rooms``, default 1,10,100) and each run, a fresh ``greenchat serve`` (with a
``/_memory`` route, as in ``bench/conn_memory.py``) gets a warm-up of 200 JSON clients
that join k rooms, hear one message and leave; RSS is marked; then N clients connect to
``/ws`` and each joins the same k rooms ``r0``...``r<k-1>`` (k join requests in one
write, by batches of 200 clients whose ``joined`` events are awaited); after ``--idle`` s the RSS above the mark / N is
the figure. Then one message sent to ``r0`` must reach all N (else exit 1), so the
figure is of live members. The plain endpoint (``/``, one room) is measured the same
way in each run, as the reference. Prints each run as JSON and the median of the runs.

    flock /work/wt/bench.lock .venv/bin/python bench/json_memory.py -n 5000 --runs 3 \\
        --json bench/results/json-memory.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

from _harness import environment, memory_server, repeat_runs

from chat.bench.errors import BenchError
from chat.bench.loadclient import LoadClient

WARMUP = 200
# Clients whose joins are in flight at once. Each JSON client's first frame starts a
# greenlet (as a plain client's message does); 5,000 clients joining in the same loop
# iteration make 5,000 greenlets at once, whose memory RSS keeps after they end.
# Clients that arrive over time, as real ones do, are what this measures.
BATCH = 200
SOURCE = "127.0.0.2"


def get_json(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=60) as response:
        return json.loads(response.read())


def joins(k: int) -> list[bytes]:
    return [json.dumps({"op": "join", "room": f"r{i}"}).encode() for i in range(k)]


def clients_in_rooms(port: int, n: int, k: int) -> list[LoadClient]:
    """``n`` clients of /ws, each in rooms r0..r<k-1> (k = 0: plain clients of /), by
    batches of ``BATCH`` whose joins are all answered before the next batch connects."""
    loaders = []
    try:
        for first in range(0, n, BATCH):
            client = LoadClient("127.0.0.1", port, path="/ws" if k else "/")
            loaders.append(client)
            size = min(BATCH, n - first)
            result = client.connect(size, [SOURCE], timeout=120)
            if not result.ok:
                raise BenchError(f"connections failed: {result.failures}")
            if k:
                requests = joins(k)
                for index in range(size):
                    client.send_text(index, requests)
                joined = client.expect(k, timeout=120)
                if not joined.ok:
                    raise BenchError(f"not every client heard its {k} joined events: {joined}")
    except BaseException:
        close_all(loaders)
        raise
    return loaders


def close_all(loaders: list[LoadClient]) -> None:
    for client in loaders:
        client.close()


def one_message_to_all(loaders: list[LoadClient], k: int) -> None:
    """A message to r0 (or, plain, to the lobby) from one client reaches every client."""
    if k:
        loaders[0].send_text(0, [json.dumps({"op": "send", "room": "r0",
                                             "text": "x" * 100}).encode()])
    else:
        loaders[0].send_text(0, [b"x" * 100])
    for client in loaders:
        result = client.expect(k + 1, timeout=60)
        if not result.ok:
            raise BenchError(f"one message did not reach every client: {result}")


def measure(k: int, n: int, idle: float, logdir: Path, name: str) -> float:
    """KB of RSS per client of ``n`` in ``k`` rooms (0: plain) in a fresh server."""
    server, port = memory_server(name, "greenchat", logdir)
    loaders: list[LoadClient] = []
    try:
        warm = clients_in_rooms(port, WARMUP, k)
        one_message_to_all(warm, k)
        close_all(warm)
        time.sleep(idle)
        get_json(port, "/_memory?mark")
        loaders = clients_in_rooms(port, n, k)
        time.sleep(idle)
        memory = get_json(port, "/_memory")
        one_message_to_all(loaders, k)
        return memory["rss_kb"] / n
    finally:
        close_all(loaders)
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--connections", type=int, default=2000)
    parser.add_argument("--rooms", default="1,10,100", help="values of k, comma-separated")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--idle", type=float, default=2.0, help="seconds idle before measuring")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args(argv)
    ks = [int(k) for k in args.rooms.split(",")]
    if not 0 < args.connections <= 15000 or args.runs < 1 or any(not 0 < k <= 100 for k in ks):
        parser.error("--connections 1-15000, --runs >= 1, rooms 1-100 (the default per-client limit)")
    with tempfile.TemporaryDirectory(prefix="json-memory-") as folder:
        def one_run(stem: str) -> dict:
            return {"plain": measure(0, args.connections, args.idle, Path(folder), f"{stem}-plain"),
                    **{str(k): measure(k, args.connections, args.idle, Path(folder), f"{stem}-k{k}")
                       for k in ks}}

        runs = repeat_runs(args.runs, "json-memory", one_run,
                           lambda run: {key: round(kb, 3) for key, kb in run.items()}, "json_memory")
    if len(runs) < args.runs:
        return 1
    medians = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    print(f"\n{args.connections} idle clients, KB of RSS per client, median of {len(runs)} runs:")
    print(f"  plain (/, one room): {medians['plain']:.2f}")
    for k in ks:
        budget = 0.65 + 0.1 * k
        print(f"  /ws in {k:3d} rooms:   {medians[str(k)]:.2f} (budget {budget:.2f}: "
              f"{'within' if medians[str(k)] <= budget else 'OVER'})")
    if args.json:
        args.json.write_text(json.dumps({
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "connections": args.connections,
            "environment": environment(), "runs": runs, "medians": medians}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
