"""Idle connections and one broadcast: greenchat against peer servers and the physical floor.

For every run, and in this order within it, each chosen server variant is started fresh
and measured with the same two load-client processes (``chat/bench/loadclient.py``):

1. handshakes: N websockets opened together by the two clients (N/2 each, at most
   ``--inflight`` handshakes in flight per client); handshakes/s = N / wall time until
   the last 101 was read, and the server's CPU during that phase / N;
2. memory: the server's RSS once all N are connected and idle for ``--idle`` seconds,
   minus its RSS after a warm-up (500 connected, then closed, server back to 0), / N;
3. one broadcast, ``--broadcasts`` times (median): one client sends one small masked text
   frame, every client counts it; the server's CPU from just before the send until all
   N received it, / N, and the wall time to the last delivery;
4. a burst: one client sends ``--burst`` text frames in one write; server CPU until
   every client has all of them.

Server CPU is read from /proc/PID/task/*/schedstat (ns on CPU, every thread), for the
gunicorn variant from the worker process, not the master; every variant is measured the
same way, the floor too. Anything missing (a refused handshake, a lost or duplicated
message, a connection the server does not hold) stops the benchmark with a non-zero
exit and says what was missed.

Variants: ``ours`` (``python -m chat serve``), ``pywsgi`` (the same app with every
request through pywsgi, as ``greenchat serve`` was before ``chat.upgrade``), ``gunicorn``
(the card's command with gevent-websocket's worker), and the peers of ``greenchat bench
--compare`` (``chat/bench/peers.py``): ``websockets`` (its asyncio server,
``websockets.broadcast``), ``picows`` (on uvloop, a loop of ``transport.send``) and
``floor`` (a fixed 101 and a bare non-blocking ``send()`` loop: the floor every other
figure is read against).

    .venv/bin/python bench/idle_broadcast.py --connections 18000 --runs 3 --json out.json

``--deflate``: the load clients offer permessage-deflate. greenchat's own variants agree
(checked in /stats), so each broadcast leaves compressed, once per flush, when that makes
it smaller (``--message-size 125``: a probe padded with x, 125 bytes deflate to ~20);
the other variants decline. The clients still send their messages plain.

Everything runs on 127.0.0.0/8. The machine must allow N + 100 open files per server
process and N/2 per client process; the script checks the kernel first and says what to
change (it never changes a sysctl itself).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

# _harness first: it puts this checkout on sys.path for the chat imports below.
from _harness import (ROOT, WARMUP, Child, check_host, environment, get_stats, tail,
                      wait_until)
from chat.bench.errors import BenchError
from chat.bench.loadclient import source_addresses
from chat.bench.peers import PEERS
from chat.bench.processes import checkout_env
from chat.bench.plan import split
from chat.checks import port_range
from chat.system import (PROC, free_port, open_files_limit, process_cpu_ns, process_rss_bytes,
                         read_sysctl)

VARIANTS = ("ours", "pywsgi", "gunicorn", "websockets", "picows", "floor")  # a run's order

# greenchat's app served the way `greenchat serve` did before chat.upgrade: every request,
# websocket upgrades included, through pywsgi and ChatWebSocketHandler (the old path).
PYWSGI_SERVER = """
import sys
from gevent import monkey
monkey.patch_all()
from gevent.pywsgi import WSGIServer
from chat.app import create_app
from chat.handler import ChatWebSocketHandler
app = create_app()
server = WSGIServer((sys.argv[1], int(sys.argv[2])), app, handler_class=ChatWebSocketHandler,
                    backlog=4096, log=None)
server.start()
print(f"listening on http://{sys.argv[1]}:{server.server_port}", flush=True)
server.serve_forever()
"""
DEFAULT_VARIANTS = "ours,websockets,picows,floor"


# -- reading another process from /proc ---------------------------------------------------

def socket_fds(pid: int) -> int:
    """How many sockets ``pid`` holds open."""
    count = 0
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(f"{fd_dir}/{fd}").startswith("socket:"):
                count += 1
        except FileNotFoundError:
            pass
    return count


# Kernel TCP counters that explain a slow connect phase (dropped SYNs, retried handshakes).
# They count for the whole network namespace: other processes' traffic shows up too.
TCP_TROUBLE = ("ListenOverflows", "ListenDrops", "TCPReqQFullDrop", "TCPReqQFullDoCookies",
               "SyncookiesSent", "TCPTimeouts", "TCPSynRetrans", "TCPAbortOnData")


def tcp_counters() -> dict[str, int]:
    counters: dict[str, int] = {}
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return counters
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            for name, value in zip(names.split()[1:], values.split()[1:]):
                if name in TCP_TROUBLE:
                    counters[name] = int(value)
    return counters


# -- child processes -------------------------------------------------------------------------

class Server:
    """One server variant under test. ``pid`` is the process whose CPU and RSS are measured."""

    def __init__(self, variant: str, args: argparse.Namespace, logdir: Path, tag: str) -> None:
        self.variant = variant
        self.port = free_port()
        self.has_stats = variant in ("ours", "pywsgi", "gunicorn")
        py = sys.executable
        host = "127.0.0.1"
        if variant == "ours":
            argv = [py, "-m", "chat", "serve", "--host", host, "--port", str(self.port)]
        elif variant == "pywsgi":
            argv = [py, "-c", PYWSGI_SERVER, host, str(self.port)]
        elif variant == "gunicorn":
            argv = [py, "-m", "gunicorn", "-k",
                    "geventwebsocket.gunicorn.workers.GeventWebSocketWorker", "-w", "1",
                    "--worker-connections", "20000", "--no-control-socket",
                    "--bind", f"{host}:{self.port}", "--backlog", "4096", "chat.wsgi:app"]
        elif variant in PEERS:
            argv = PEERS[variant].argv(host, self.port)
        else:
            raise ValueError(variant)
        self.child = Child(f"{variant} server", argv, logdir / f"{tag}-{variant}.log",
                           pipe=False, env=checkout_env())
        self.pid = self.child.pid
        self.worker_pid: int | None = None

    def wait_ready(self, timeout: float = 30.0) -> None:
        child = self.child

        def exited():
            if child.proc.poll() is not None:
                raise BenchError(f"{child.name} exited with code {child.proc.returncode}:\n"
                                 f"{tail(child.log)}")

        if not self.has_stats:
            pattern = re.compile(rf"listening on http://127\.0\.0\.1:{self.port}\b")
            wait_until(lambda: exited() or pattern.search(child.log.read_text(errors="replace")),
                       timeout, f"{child.name} to print 'listening on ...:{self.port}'",
                       interval=0.1)
        else:
            def stats_pid():
                exited()
                try:
                    return get_stats(self.port, timeout=2.0)["pid"]
                except OSError:
                    return None
            pid = wait_until(stats_pid, timeout, f"{child.name} to answer GET /stats",
                             interval=0.1)
            if self.variant == "gunicorn":
                parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                if parent != self.child.pid:
                    raise BenchError(f"/stats pid {pid} is not a child of gunicorn {self.pid}")
                self.worker_pid = self.pid = pid
            elif pid != self.pid:
                raise BenchError(f"/stats says pid {pid}, we started {self.pid}")

    def stats(self) -> dict | None:
        return get_stats(self.port) if self.has_stats else None

    def stop(self) -> None:
        self.child.stop()
        worker = self.worker_pid
        if worker is not None:
            # the master normally takes its worker with it; if not, end it by its PID
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and Path(f"/proc/{worker}").exists():
                time.sleep(0.1)
            try:
                if b"gunicorn" in Path(f"/proc/{worker}/cmdline").read_bytes():
                    os.kill(worker, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass


class Sources:
    """Hands out fresh loopback source addresses (127.0.0.2, .3, ...) to each connect."""

    def __init__(self, per_source: int) -> None:
        self.per_source = per_source
        self.next = 0

    def take(self, connections: int) -> list[str]:
        count = max(1, math.ceil(connections / self.per_source))
        addresses = source_addresses(self.next, count)
        self.next += count
        return addresses


# -- one variant, one run ---------------------------------------------------------------

def ask_all(clients: list[Child], commands: list[dict], timeout: float) -> list[dict]:
    """Send one command to each client first (so they run together), then read every reply."""
    for client, command in zip(clients, commands):
        client.write(json.dumps(command))
    return [client.readline_json(timeout) for client in clients]


def check_connected(replies: list[dict], what: str) -> None:
    for i, reply in enumerate(replies):
        if not reply.get("ok"):
            detail = reply.get("error") or (
                f"{reply['connected']}/{reply['requested']} connected; failures: "
                f"{reply['failures']}")
            raise BenchError(f"{what}: load client {i} missed: {detail}")


def check_expect(replies: list[dict], what: str) -> None:
    for i, reply in enumerate(replies):
        if not reply.get("ok"):
            detail = reply.get("error") or (
                f"{reply['reached']}/{reply['connections']} connections received all "
                f"{reply['target']} messages; {reply['extra']} got more than that, "
                f"{reply['lost']} connections lost, {reply['close_frames']} close frames")
            raise BenchError(f"{what}: load client {i} missed: {detail}")


def payload(seq: int, size: int) -> str:
    return f"p{seq} ".ljust(size, "x")[:size]


def deliver(server: Server, clients: list[Child], frames: int, target: int, seq: int,
            args: argparse.Namespace, what: str) -> dict:
    """One client sends ``frames`` text frames in one write; all N count them."""
    timeout = args.expect_timeout
    pid = server.pid
    for client in clients[1:]:
        client.write(json.dumps({"cmd": "expect", "target": target, "timeout": timeout}))
    time.sleep(0.05)  # let the other clients enter their loop before the send
    cpu0 = process_cpu_ns(pid)
    clients[0].write(json.dumps({
        "cmd": "send_expect", "index": 0, "target": target, "timeout": timeout,
        "payloads": [payload(seq + i, args.message_size) for i in range(frames)]}))
    replies = [client.readline_json(timeout + 10) for client in clients]
    cpu1 = process_cpu_ns(pid)
    started = replies[0].get("sent", 0.0)
    check_expect(replies, what)
    return {"cpu_ns": cpu1 - cpu0, "wall_s": max(r["last"] for r in replies) - started,
            "first_s": min(r["first"] for r in replies if r["first"]) - started}


def measure_pings(server: Server, pid: int, n: int, args: argparse.Namespace, say) -> dict | None:
    """5. with ``--ping-interval``: the server's CPU per ping+pong round while idle.

    The server's idle sweep pings a client silent for a whole interval and the load
    clients answer every ping with a pong; the server CPU from one /stats reading to the
    one after ``--ping-rounds`` * N more pings, / the pings sent in between. That
    includes everything idle clients cost then: the sweeps (each client is checked every
    interval, pinged every other one), the pings' sends, the pongs' reads and parses.
    """
    if not server.has_stats:
        return None
    first = server.stats()
    cpu0 = process_cpu_ns(pid)
    target = first["pings_sent"] + args.ping_rounds * n
    def done() -> dict | None:
        stats = server.stats()
        return stats if stats["pings_sent"] >= target else None

    # Polled twice a second: each /stats request costs the server CPU too.
    last = wait_until(done, args.ping_rounds * args.ping_interval * 3 + 30,
                      f"{args.ping_rounds * n} pings", interval=0.5)
    cpu1 = process_cpu_ns(pid)
    pings = last["pings_sent"] - first["pings_sent"]
    result = {"pings": pings, "cpu_ns": cpu1 - cpu0,
              "cpu_us_per_ping": (cpu1 - cpu0) / pings / 1000,
              "idle_dropped": last["idle_dropped"] - first["idle_dropped"],
              "interval_s": args.ping_interval}
    say(f"{pings} pings answered, {result['cpu_us_per_ping']:.2f} us server CPU per "
        f"ping+pong round (sweeps included)")
    return result


def measure(variant: str, args: argparse.Namespace, sources: Sources, logdir: Path,
            tag: str) -> dict:
    n = args.connections
    per_client = split(n, args.clients)
    warm = split(min(WARMUP, n), args.clients)
    connect_timeout = args.connect_timeout or 60 + n / 100

    def say(text: str) -> None:
        print(f"  {variant:8s} {text}", flush=True)

    server = Server(variant, args, logdir, tag)
    clients: list[Child] = []
    try:
        server.wait_ready()
        pid = server.pid
        for i in range(args.clients):
            clients.append(Child(f"load client {i}", [
                sys.executable, "-m", "chat.bench.loadclient", "--host", "127.0.0.1",
                "--port", str(server.port), "--inflight", str(args.inflight),
                "--per-source", str(sources.per_source),
                "--handshake-timeout", str(connect_timeout),
                *(["--deflate"] if args.deflate else [])],
                logdir / f"{tag}-{variant}-client{i}.log", pipe=True))
        time.sleep(0.3)  # let the server settle after its start
        base_sockets = socket_fds(pid)

        # warm-up: connect, close, wait until the server holds none of them
        replies = ask_all(clients, [{"cmd": "connect", "n": k, "sources": sources.take(k),
                                     "timeout": connect_timeout} for k in warm],
                          connect_timeout + 10)
        check_connected(replies, "warm-up")
        ask_all(clients, [{"cmd": "close"}] * len(clients), 30)

        def drained():
            if socket_fds(pid) > base_sockets:
                return False
            return not server.has_stats or server.stats()["connections"] == 0
        wait_until(drained, 30, "the server to drop the warm-up connections (back to 0)")
        time.sleep(0.5)
        rss_base = process_rss_bytes(pid) // 1024

        # 1. handshakes, both clients together
        tcp0 = tcp_counters()
        client_cpu0 = [process_cpu_ns(c.pid) for c in clients]
        cpu0 = process_cpu_ns(pid)
        replies = ask_all(clients, [{"cmd": "connect", "n": k, "sources": sources.take(k),
                                     "timeout": connect_timeout} for k in per_client],
                          connect_timeout + 10)
        cpu1 = process_cpu_ns(pid)
        client_cpu = [process_cpu_ns(c.pid) - c0 for c, c0 in zip(clients, client_cpu0)]
        tcp1 = tcp_counters()
        tcp_trouble = {k: tcp1[k] - tcp0.get(k, 0) for k in tcp1 if tcp1[k] != tcp0.get(k, 0)}
        check_connected(replies, f"connect {n}")
        wall = max(r["finished"] for r in replies) - min(r["started"] for r in replies)

        def holds_all():
            held = socket_fds(pid) - base_sockets
            if held < n:
                return False
            return not server.has_stats or server.stats()["connections"] == n
        try:
            wait_until(holds_all, 30, f"the server to hold all {n} connections")
        except BenchError as error:
            held = socket_fds(pid) - base_sockets
            stats = server.stats() if server.has_stats else {}
            raise BenchError(f"{error}: it holds {held} sockets beyond its own"
                             + (f", /stats says {stats.get('connections')}" if stats else "")
                             ) from None
        handshake = {"wall_s": wall, "per_s": n / wall, "cpu_ns": cpu1 - cpu0,
                     "cpu_us_per_handshake": (cpu1 - cpu0) / n / 1000,
                     "tcp_counters": tcp_trouble, "client_cpu_ns": client_cpu,
                     "clients": [{k: r[k] for k in ("started", "finished")} for r in replies]}
        say(f"{n} connected in {wall:.2f} s ({n / wall:,.0f}/s, "
            f"{handshake['cpu_us_per_handshake']:.0f} us CPU each)"
            + (f"; kernel TCP counters moved: {tcp_trouble}" if tcp_trouble else ""))

        # 2. memory once idle
        time.sleep(args.idle)
        rss_full = process_rss_bytes(pid) // 1024
        memory = {"rss_base_kb": rss_base, "rss_full_kb": rss_full,
                  "kb_per_connection": (rss_full - rss_base) / n}
        stats0 = server.stats()
        if args.deflate and variant in ("ours", "pywsgi"):
            agreed = stats0["deflate_connections"]
            if agreed != n:
                raise BenchError(f"--deflate: the server agreed to compress with {agreed} "
                                 f"of {n} clients")

        # 3. one broadcast, several times; 4. one burst
        target = 0
        seq = 0
        samples = []
        for k in range(args.broadcasts):
            target += 1
            sample = deliver(server, clients, 1, target, seq, args,
                             f"broadcast {k + 1}/{args.broadcasts}")
            seq += 1
            samples.append(sample)
        target += args.burst
        burst = deliver(server, clients, args.burst, target, seq, args,
                        f"burst of {args.burst}")
        seq += args.burst

        pings = measure_pings(server, pid, n, args, say) if args.ping_interval else None

        bytes_per_delivery = None
        if stats0 is not None:
            stats1 = server.stats()
            messages = args.broadcasts + args.burst
            got = {key: stats1[key] - stats0[key] for key in
                   ("messages_received", "deliveries", "slow_consumers_closed",
                    "protocol_errors")}
            want = {"messages_received": messages, "deliveries": messages * n,
                    "slow_consumers_closed": 0, "protocol_errors": 0}
            if stats1["idle_dropped"] != stats0["idle_dropped"]:
                raise BenchError(f"the server dropped {stats1['idle_dropped']} clients as "
                                 "silent: a pong went missing")
            if got != want:
                raise BenchError(f"server counters disagree with the clients: /stats "
                                 f"changes {got}, expected {want}")
            # Frame bytes handed to sockets per delivery: shows whether they were compressed.
            bytes_per_delivery = (stats1["bytes_out"] - stats0["bytes_out"]) / got["deliveries"]

        per_delivery = [s["cpu_ns"] / n / 1000 for s in samples]
        result = {
            "connections": n,
            "pid": pid,
            "handshake": handshake,
            "memory": memory,
            "broadcasts": samples,
            "cpu_us_per_delivery_samples": per_delivery,
            "cpu_us_per_delivery": statistics.median(per_delivery),
            "wall_ms_last_delivery": statistics.median(s["wall_s"] * 1000 for s in samples),
            "burst": {**burst, "frames": args.burst},
            "burst_cpu_ms": burst["cpu_ns"] / 1e6,
            "burst_wall_ms": burst["wall_s"] * 1000,
            "pings": pings,
            "bytes_per_delivery": bytes_per_delivery,
        }
        say(f"RSS {memory['kb_per_connection']:.2f} KB/conn; one broadcast "
            f"{result['cpu_us_per_delivery']:.2f} us CPU/delivery, last delivery after "
            f"{result['wall_ms_last_delivery']:.0f} ms; burst of {args.burst}: "
            f"{result['burst_cpu_ms']:.0f} ms CPU"
            + (f"; {bytes_per_delivery:.0f} bytes/delivery" if bytes_per_delivery else ""))
        return result
    finally:
        for client in clients:
            try:
                client.request({"cmd": "quit"}, 10)
            except (BenchError, ValueError, OSError):
                pass
            client.stop(grace=5)
        server.stop()


# -- the machine -------------------------------------------------------------------------

def preflight(args: argparse.Namespace) -> int:
    """The host checks for this run (exit status 2 with the fix when the machine cannot
    carry it), and one line on the machine. Returns the connections per source address."""
    low, high = port_range(PROC) or (32768, 60999)
    per_source = max(1, min(args.per_source, high - low + 1 - 100))
    check_host(args.connections, args.inflight * args.clients, per_source)
    print(f"# open files {open_files_limit()}/process, somaxconn "
          f"{read_sysctl('net.core.somaxconn')}, syn backlog "
          f"{read_sysctl('net.ipv4.tcp_max_syn_backlog')}, ports {low}-{high} ({per_source} "
          f"connections per source address), load average {os.getloadavg()[0]:.2f}",
          flush=True)
    return per_source


# -- report ------------------------------------------------------------------------------

# (key, title, format, a cost also given as a multiple of the floor's)
COLUMNS = [
    ("variant", "variant", "{}", False),
    ("kb_per_connection", "KB RSS/conn", "{:.2f}", True),
    ("handshakes_per_s", "handshakes/s", "{:,.0f}", False),
    ("cpu_us_per_handshake", "CPU us/handshake", "{:.0f}", True),
    ("cpu_us_per_delivery", "CPU us/delivery", "{:.2f}", True),
    ("burst_cpu_ms", "burst CPU ms", "{:.0f}", True),
    ("wall_ms_last_delivery", "wall ms to last delivery", "{:.0f}", False),
    ("cpu_us_per_ping", "CPU us/ping+pong", "{:.2f}", True),
]
FIGURES = {
    "kb_per_connection": lambda r: r["memory"]["kb_per_connection"],
    "handshakes_per_s": lambda r: r["handshake"]["per_s"],
    "cpu_us_per_handshake": lambda r: r["handshake"]["cpu_us_per_handshake"],
    "cpu_us_per_delivery": lambda r: r["cpu_us_per_delivery"],
    "burst_cpu_ms": lambda r: r["burst_cpu_ms"],
    "burst_wall_ms": lambda r: r["burst_wall_ms"],
    "wall_ms_last_delivery": lambda r: r["wall_ms_last_delivery"],
    "cpu_us_per_ping": lambda r: r["pings"]["cpu_us_per_ping"] if r.get("pings") else None,
}


def summarize(runs: list[dict], variants: list[str]) -> dict:
    """Per variant, the median of each figure over the runs, and for the costs the median
    of the per-run ratios to the floor measured in the same run (the machine's noise moves
    every variant of one run together, so ratios hold better than absolute figures)."""
    summary = {}
    for variant in variants:
        results = [run["results"][variant] for run in runs if variant in run["results"]]
        if not results:
            continue
        row: dict = {"runs": len(results)}
        for key, get in FIGURES.items():
            values = [value for value in map(get, results) if value is not None]
            if values:
                row[key] = statistics.median(values)
        ratios: dict = {}
        for key, _title, _fmt, cost in COLUMNS:
            per_run = []
            for run in runs if cost else ():
                if variant in run["results"] and "floor" in run["results"]:
                    mine = FIGURES[key](run["results"][variant])
                    floor = FIGURES[key](run["results"]["floor"])
                    if mine is not None and floor is not None and floor > 0:
                        per_run.append(mine / floor)
            if per_run:
                ratios[key] = statistics.median(per_run)
        row["ratio_to_floor"] = ratios or None
        summary[variant] = row
    return summary


def print_table(summary: dict, n: int, runs: int) -> None:
    rows = [[title for _key, title, _fmt, _cost in COLUMNS]]
    for variant, row in summary.items():
        cells = []
        for key, _title, fmt, _cost in COLUMNS:
            value = variant if key == "variant" else row.get(key)
            cell = "-" if value is None else fmt.format(value)
            ratio = (row["ratio_to_floor"] or {}).get(key)
            if ratio is not None and variant != "floor":
                cell += f" ({ratio:.2f}x)"
            cells.append(cell)
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    print(f"\n{n} connections, median of {runs} run(s); (Nx): median of the per-run ratios "
          "to the floor; the floor relays a burst as one joined send() per socket")
    for i, cells in enumerate(rows):
        print("  ".join(c.rjust(w) if j else c.ljust(w)
                        for j, (c, w) in enumerate(zip(cells, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    ours = summary.get("ours")
    ratio = ((ours or {}).get("ratio_to_floor") or {}).get("cpu_us_per_delivery")
    if ratio is not None:
        verdict = "within" if ratio <= 1.15 else "NOT within"
        print(f"\nours: {ours['cpu_us_per_delivery']:.2f} us/delivery, {ratio:.2f} x the "
              f"floor's in the same runs ({verdict} the 15% goal)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--connections", "-n", type=int, default=2000,
                        help="websockets per server variant")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help=f"comma-separated, from {','.join(VARIANTS)}; run in that order")
    parser.add_argument("--json", type=Path, help="write every run's raw values here")
    parser.add_argument("--clients", type=int, default=2, help="load-client processes")
    parser.add_argument("--inflight", type=int, default=200,
                        help="handshakes in flight per load client")
    parser.add_argument("--per-source", type=int, default=30000,
                        help="connections per source address (capped by the port range)")
    parser.add_argument("--broadcasts", type=int, default=5,
                        help="single-message broadcasts per run (the median is reported)")
    parser.add_argument("--burst", type=int, default=10, help="frames in the burst")
    parser.add_argument("--message-size", type=int, default=16,
                        help="bytes of text in each probe message")
    parser.add_argument("--idle", type=float, default=1.0,
                        help="seconds idle before reading RSS")
    parser.add_argument("--connect-timeout", type=float, default=0,
                        help="seconds for the connect phase (0: 60 + N/100)")
    parser.add_argument("--expect-timeout", type=float, default=30,
                        help="seconds for all clients to receive a broadcast")
    parser.add_argument("--ping-interval", type=float, default=0,
                        help="CHAT_PING_INTERVAL of greenchat's variants, and a phase that "
                        "measures the CPU of a ping+pong round (0: no such phase; the other "
                        "phases then run with the default interval)")
    parser.add_argument("--ping-rounds", type=int, default=3,
                        help="pings per connection measured in the ping phase")
    parser.add_argument("--deflate", action="store_true",
                        help="load clients offer permessage-deflate (greenchat's own "
                        "variants agree and broadcast compressed frames; the others decline)")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the server and client logs even on success")
    args = parser.parse_args(argv)
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(chosen) - set(VARIANTS)
    if unknown or not chosen:
        parser.error(f"unknown variant(s) {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    variants = [v for v in VARIANTS if v in chosen]
    if args.connections < 1 or args.runs < 1 or args.broadcasts < 1 or args.clients < 1:
        parser.error("--connections, --runs, --broadcasts and --clients must be positive")
    if args.connections < args.clients:
        parser.error("--connections must be at least --clients")
    if not 1 <= args.message_size <= 125:
        parser.error("--message-size must be 1-125 (one small frame)")

    if args.ping_interval:
        os.environ["CHAT_PING_INTERVAL"] = str(args.ping_interval)  # the servers inherit it
    per_source = preflight(args)
    sources = Sources(per_source)
    logdir = Path(tempfile.mkdtemp(prefix="greenchat-bench-"))
    report = {"argv": sys.argv, "config": {k: (str(v) if isinstance(v, Path) else v)
                                           for k, v in vars(args).items()},
              "variants": variants, "environment": environment(), "runs": []}
    failed = None
    try:
        for run in range(1, args.runs + 1):
            print(f"run {run}/{args.runs}", flush=True)
            entry = {"run": run, "results": {}}
            report["runs"].append(entry)
            for variant in variants:
                entry["results"][variant] = measure(variant, args, sources, logdir,
                                                    f"run{run}")
    except (BenchError, OSError) as error:  # OSError: a process or /proc file gone
        failed = str(error)
    except KeyboardInterrupt:
        failed = "interrupted"
    report["summary"] = summarize(report["runs"], variants)
    if failed:
        report["error"] = failed
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if failed:
        print(f"\nFAILED: {failed}\n(logs kept in {logdir})", file=sys.stderr)
        return 1
    print_table(report["summary"], args.connections, args.runs)
    if args.keep_logs:
        print(f"logs in {logdir}")
    else:
        shutil.rmtree(logdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
