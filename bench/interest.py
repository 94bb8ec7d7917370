"""Backplane traffic per process: what each server reads from Redis when every room's
members are on one process.

Per run, on a fresh redis-server: ``--servers`` ``python -m chat serve`` processes (8),
``--rooms`` rooms (800) with one member each, the rooms of process p being
``r<p * rooms/servers>`` onwards (100 each), and one more server with no member anywhere
that publishes: ``--messages`` (5) rounds of one message to every room through its
publish API (``POST /rooms/<name>/messages``), then one marker to a room of each member
process, in that order. Redis hands a subscriber its messages in publish order, so once
a process has delivered its marker it has read everything published before it.

Before that, the join cost: ``--joins`` (20) times, a client joins a room nobody holds
(one message in its stored history, ``CHAT_HISTORY`` is 10 on every server) on the first
member process, timed from its connect() to the history's message read; then it leaves.
A channel per room adds Redis's confirmation of the room's SUBSCRIBE before the history
read: one round trip.

Per member process: ``backplane_received`` (messages read from Redis and delivered to the
hub; none is its own echo, since it publishes nothing), its CPU over the publishing
phase (every thread's schedstat), and its ``deliveries`` (must be ``messages`` x its rooms
+ 1: anything else stops the run). Redis's ``total_net_output_bytes`` over the phase too.

``--checkout PATH`` runs the servers from another checkout of greenchat (``python -m
chat`` there: its own ``chat`` package first on the path), e.g. a ``git worktree`` of
main before the channel per room, with this checkout's interpreter and packages::

    git worktree add --detach /tmp/greenchat-before 5e404bc
    flock /work/wt/bench.lock .venv/bin/python bench/interest.py --runs 3 \\
        --checkout /tmp/greenchat-before --json before.json
    flock /work/wt/bench.lock .venv/bin/python bench/interest.py --runs 3 --json after.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

# _harness first: it puts this checkout on sys.path for the chat imports below.
from _harness import ROOT, Child, environment, get_stats, tail, wait_until
from chat.bench.errors import BenchError
from chat.bench.loadclient import LoadClient
from chat.protocol import generate_key, handshake_request
from chat.system import free_port, open_files_limit, process_cpu_ns

SOURCE = "127.0.0.2"
TOKEN = "interest-bench"


class Redis:
    """A redis-server of our own (no persistence), stopped by PID."""

    def __init__(self, logdir: Path) -> None:
        self.port = free_port()
        self.child = Child("redis", [shutil.which("redis-server") or "redis-server",
                                     "--port", str(self.port), "--bind", "127.0.0.1",
                                     "--save", "", "--appendonly", "no"],
                           logdir / "redis.log", pipe=False)
        wait_until(lambda: self.info("server") is not None, 10, "redis-server")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def info(self, section: str) -> dict | None:
        import redis
        try:
            with redis.Redis(port=self.port, socket_timeout=5) as client:
                return client.info(section)
        except redis.ConnectionError:
            return None

    def stop(self) -> None:
        self.child.stop()


def start_server(checkout: Path, redis_url: str, logdir: Path, name: str) -> tuple[Child, int]:
    port = free_port()
    env = {**os.environ, "CHAT_REDIS_URL": redis_url, "CHAT_PUBLISH_TOKEN": TOKEN,
           "CHAT_PING_INTERVAL": "0", "CHAT_HISTORY": "10"}
    server = Child(name, [sys.executable, "-m", "chat", "serve", "--host", "127.0.0.1",
                          "--port", str(port)], logdir / f"{name}.log", pipe=False,
                   cwd=checkout, env=env)
    return server, port


def wait_answering(server: Child, port: int) -> None:
    def ready():
        if server.proc.poll() is not None:
            raise BenchError(f"{server.name} exited with {server.proc.returncode}:\n"
                             f"{tail(server.log)}")
        try:
            return get_stats(port)
        except OSError:
            return None
    wait_until(ready, 30, f"{server.name} to answer /stats")


class Publisher:
    """POSTs to one server's publish API over one keep-alive connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.sent = 0

    def post(self, room: str, text: str) -> None:
        self.connection.request("POST", f"/rooms/{room}/messages", body=text.encode(),
                                headers={"Authorization": f"Bearer {TOKEN}"})
        response = self.connection.getresponse()
        response.read()
        if response.status != 204:
            raise BenchError(f"publishing to {room}: HTTP {response.status}")
        self.sent += 1

    def close(self) -> None:
        self.connection.close()


def timed_join(port: int, room: str, expected: bytes) -> float:
    """Seconds from connect() to the first message (``expected``: the room's stored
    one) read by a fresh client of ``/rooms/<room>``; the client then leaves."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(handshake_request(f"127.0.0.1:{port}", f"/rooms/{room}", generate_key()))
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                raise BenchError(f"joining {room}: connection closed after {data[:200]!r}")
            data += chunk
            head, separator, rest = data.partition(b"\r\n\r\n")
            # an unmasked text frame under 126 bytes: 0x81, its length, the payload
            if separator and len(rest) >= 2 and len(rest) >= 2 + rest[1]:
                took = time.perf_counter() - started
                if not head.startswith(b"HTTP/1.1 101") or rest[2:2 + rest[1]] != expected:
                    raise BenchError(f"joining {room}: got {data[:300]!r}")
                return took


def one_run(args: argparse.Namespace, logdir: Path, run: int) -> dict:
    per_server = args.rooms // args.servers
    redis = Redis(logdir)
    servers: list[tuple[Child, int]] = []
    clients: list[LoadClient] = []
    publisher = None
    try:
        for number in range(args.servers + 1):  # the last one publishes
            servers.append(start_server(args.checkout, redis.url, logdir,
                                        f"run{run}-server{number}"))
        for server, port in servers:
            wait_answering(server, port)
        members, (publishing, publish_port) = servers[:-1], servers[-1]
        for index, (_, port) in enumerate(members):
            for room in range(index * per_server, (index + 1) * per_server):
                client = LoadClient("127.0.0.1", port, path=f"/rooms/r{room}")
                result = client.connect(1, [SOURCE], timeout=60)
                if not result.ok:
                    raise BenchError(f"room r{room}: {result.failures}")
                clients.append(client)
        for _, port in members:
            wait_until(lambda port=port: _settled(get_stats(port), per_server), 30,
                       f"the server on {port} to hold and subscribe its rooms")
        get_stats(publish_port)  # its backplane runs (started by the first request)

        publisher = Publisher(publish_port)
        for number in range(args.joins):
            publisher.post(f"join{number}", "stored")
        wait_until(lambda: get_stats(publish_port)["backplane_published"] >= args.joins, 30,
                   "the stored messages to reach Redis")
        joins = [timed_join(members[0][1], f"join{number}", b"stored")
                 for number in range(args.joins)]
        wait_until(lambda: get_stats(members[0][1])["rooms"] == per_server, 30,
                   "the joiners to leave")

        before = {port: (get_stats(port), process_cpu_ns(server.pid)) for server, port in members}
        redis_before = redis.info("stats")["total_net_output_bytes"]
        sent_before = publisher.sent
        for message in range(args.messages):
            for room in range(args.rooms):
                publisher.post(f"r{room}", f"message {message} to r{room}")
        for index in range(args.servers):
            publisher.post(f"r{index * per_server}", "marker")
        expected = args.messages * per_server + 1
        for _, port in members:
            wait_until(lambda port=port: get_stats(port)["deliveries"]
                       - before[port][0]["deliveries"] >= expected, 120,
                       f"the server on {port} to deliver {expected} messages")
        processes = []
        for server, port in members:
            stats, cpu = get_stats(port), process_cpu_ns(server.pid)
            stats_before, cpu_before = before[port]
            delivered = stats["deliveries"] - stats_before["deliveries"]
            if delivered != expected:
                raise BenchError(f"server {port}: {delivered} deliveries, {expected} expected")
            processes.append({
                "pid": server.pid,
                "received": stats["backplane_received"] - stats_before["backplane_received"],
                "cpu_ms": (cpu - cpu_before) / 1e6, "deliveries": delivered,
                "channel_per_room": "backplane_rooms" in stats})
        received = [p["received"] for p in processes]
        return {"run": run, "published": publisher.sent - sent_before, "processes": processes,
                "join_ms_median": statistics.median(joins) * 1000,
                "join_ms_max": max(joins) * 1000,
                "received_per_process_median": statistics.median(received),
                "received_per_process_max": max(received),
                "cpu_ms_per_process_median": statistics.median(p["cpu_ms"] for p in processes),
                "redis_output_bytes": redis.info("stats")["total_net_output_bytes"]
                - redis_before}
    finally:
        if publisher is not None:
            publisher.close()
        for client in clients:
            client.close()
        for server, _ in servers:
            server.stop()
        redis.stop()


def _settled(stats: dict, rooms: int) -> bool:
    """The server holds its rooms, is subscribed, and (when it has channels per room)
    Redis has confirmed every room's subscription."""
    return (stats["rooms"] >= rooms and stats.get("backplane_connected")
            and stats.get("backplane_rooms", rooms) >= rooms)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", type=int, default=8, help="processes holding rooms")
    parser.add_argument("--rooms", type=int, default=800)
    parser.add_argument("--messages", type=int, default=5, help="messages to every room")
    parser.add_argument("--joins", type=int, default=20, help="timed joins of a new room")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--checkout", type=Path, default=ROOT,
                        help="the greenchat checkout whose code the servers run")
    parser.add_argument("--json", type=Path, help="write every run and the medians here")
    args = parser.parse_args(argv)
    if args.servers < 1 or args.rooms % args.servers or args.messages < 1 or args.runs < 1:
        parser.error("need --rooms a multiple of --servers, --messages and --runs >= 1")
    args.checkout = args.checkout.resolve()
    open_files_limit()
    logdir = Path(tempfile.mkdtemp(prefix="greenchat-interest-"))
    runs = []
    try:
        for run in range(1, args.runs + 1):
            runs.append(one_run(args, logdir, run))
            r = runs[-1]
            print(f"run {run}: {r['published']} published; read from Redis per process: "
                  f"median {r['received_per_process_median']}, max "
                  f"{r['received_per_process_max']}; CPU per process median "
                  f"{r['cpu_ms_per_process_median']:.0f} ms; Redis sent "
                  f"{r['redis_output_bytes']:,} bytes; a join of a new room "
                  f"{r['join_ms_median']:.2f} ms (max {r['join_ms_max']:.2f})", flush=True)
    except (BenchError, OSError) as error:
        print(f"interest benchmark failed: {error}\n(logs in {logdir})", file=sys.stderr)
        return 1
    summary = {key: statistics.median(r[key] for r in runs) for key in (
        "received_per_process_median", "cpu_ms_per_process_median", "redis_output_bytes",
        "join_ms_median")}
    print(f"median of {len(runs)} runs ({args.checkout}): {summary}")
    if args.json:
        args.json.write_text(json.dumps({
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
            "checkout": str(args.checkout), "environment": environment(),
            "runs": runs, "median": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
