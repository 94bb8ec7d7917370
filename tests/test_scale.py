"""Scale tests, CI-sized: 20,000 connections over two gunicorn workers with the Redis
backplane (measured by greenchat bench; every broadcast reaches every one of them); a
thousand clients that never read among ten thousand that do; 100,000 connect/disconnect
cycles that must leave the server as they found it."""

from __future__ import annotations

import base64
import json
import os
import select
import socket
import subprocess
import sys
import time

import pytest

from churn_clients import churn
from helpers import ROOT, free_port, greenchat_argv
from raw_clients import (HANDSHAKE, IP_BIND_ADDRESS_NO_PORT, connect_many, masked_frame,
                         read_frame, read_response_head)

pytestmark = pytest.mark.slow  # 20,000 and 100,000 clients: minutes; not in `make quick`

CONNECTIONS = 20_000


def test_twenty_thousand_clients_over_two_workers_all_get_every_broadcast(start_server,
                                                                         redis_server, tmp_path):
    port = free_port()  # a fixed port: each worker gets its own SO_REUSEPORT socket
    server = start_server([sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py")],
                          env={"CHAT_REDIS_URL": redis_server.url, "GUNICORN_WORKERS": "2",
                               "GUNICORN_BIND": f"127.0.0.1:{port}"}, ready=False)
    server.port = port
    server.wait_stats(lambda s: s.get("cluster", {}).get("workers") == 2, timeout=60)
    report = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "chat", "bench", f"ws://127.0.0.1:{port}/", "-n", str(CONNECTIONS),
         "--hold", "3", "--probe-rate", "1", "--json", str(report)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    run = json.loads(report.read_text())["runs"][0]
    assert run["connections"]["established"] == CONNECTIONS
    assert run["connections"]["failed"] == run["connections"]["lost"] == 0
    probes = run["probes"]
    assert probes["sent"] >= 1
    assert probes["deliveries_received"] == probes["deliveries_expected"] == probes["sent"] * CONNECTIONS
    assert probes["missing"] == probes["duplicated"] == 0
    # The server side agrees: the two workers together handed out every delivery.
    # (the cluster's figures are the workers' last reports, a few seconds old)
    server.wait_stats(lambda s: s["cluster"]["deliveries"] == probes["deliveries_expected"],
                      timeout=30)


# -- slow consumers among fast ones ----------------------------------------------------

FAST = 10_000
SLOW = 1_000
MAX_BACKLOG = 64 * 1024
MESSAGE_SIZE = 16 * 1024
# Messages sent after the last slow consumer was closed: the fast ones still get them.
AFTER_THE_DROPS = 2
# Bound on messages: a server that never closes slow consumers fails here, not forever.
# Each slow socket takes ~30-40 KB into the kernel (see connect_slow) before MAX_BACKLOG
# starts to fill on the server: ~6 messages of MESSAGE_SIZE are enough.
MAX_MESSAGES = 40


def message(index: int) -> bytes:
    """Broadcast number ``index``: its number first, MESSAGE_SIZE bytes in all."""
    head = f"{index:06d} ".encode()
    return head + b"m" * (MESSAGE_SIZE - len(head))


MESSAGES = [message(index) for index in range(MAX_MESSAGES)]


def connect_slow(port: int, source: str) -> socket.socket:
    """A websocket that will never read, with kernel buffers about as small as Linux allows,
    so the server's backlog for it starts growing after ~30-40 KB instead of 2-4 MB.

    SO_RCVBUF (2 KiB, doubled by the kernel) keeps the advertised window tiny; TCP_MAXSEG
    536, advertised in the SYN, keeps the *server's* send buffer small too (Linux sizes a
    new socket's send buffer from the peer's MSS: with loopback's 64 KiB MSS a non-reader
    took 2-4 MB here before send() refused). Both must be set before connect().
    """
    sock = socket.socket()
    sock.settimeout(10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
    sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    sock.sendall(HANDSHAKE.format(path="/", port=port,
                                  key=base64.b64encode(os.urandom(16)).decode()).encode())
    assert b" 101 " in read_response_head(sock).split(b"\r\n", 1)[0]
    return sock


def take_frames(buffer: bytearray) -> list[tuple[int, bytes]]:
    """Remove every complete (unmasked, server) frame from the front of ``buffer``."""
    frames = []
    start = 0
    while len(buffer) - start >= 2:
        length = buffer[start + 1] & 0x7F
        header = 2
        if length == 126:
            header = 4
            length = int.from_bytes(buffer[start + 2:start + 4], "big")
        elif length == 127:
            header = 10
            length = int.from_bytes(buffer[start + 2:start + 10], "big")
        end = start + header + length
        if len(buffer) < end:
            break
        frames.append((buffer[start] & 0x0F, bytes(buffer[start + header:end])))
        start = end
    del buffer[:start]
    return frames


class FastReaders:
    """Reads every fast client from one epoll loop over non-blocking sockets and checks,
    frame by frame, that each gets message 0, 1, 2, ... in order, each exactly once."""

    def __init__(self, sockets: list[socket.socket]) -> None:
        self.epoll = select.epoll()
        self.by_fd: dict[int, int] = {}
        self.buffers = [bytearray() for _ in sockets]
        self.received = [0] * len(sockets)
        self.errors: dict[int, str] = {}
        for index, sock in enumerate(sockets):
            sock.setblocking(False)
            self.by_fd[sock.fileno()] = index
            self.epoll.register(sock.fileno(), select.EPOLLIN)
        self.sockets = sockets

    def pump_until(self, count: int, timeout: float) -> None:
        """Read until every client has ``count`` messages (or failed), within ``timeout``."""
        deadline = time.monotonic() + timeout
        behind = sum(1 for i, n in enumerate(self.received) if n < count and i not in self.errors)
        while behind and time.monotonic() < deadline:
            for fd, _ in self.epoll.poll(0.2):
                index = self.by_fd[fd]
                was_behind = self.received[index] < count and index not in self.errors
                self.read(index)
                if was_behind and (self.received[index] >= count or index in self.errors):
                    behind -= 1

    def read(self, index: int) -> None:
        try:
            data = self.sockets[index].recv(1 << 18)
        except BlockingIOError:
            return
        except OSError as error:
            data, self.errors[index] = b"", f"recv failed: {error}"
        if not data:
            self.errors.setdefault(index, f"closed after {self.received[index]} messages")
            self.epoll.unregister(self.sockets[index].fileno())
            return
        buffer = self.buffers[index]
        buffer += data
        for opcode, payload in take_frames(buffer):
            expected = self.received[index]
            if opcode != 0x1 or expected >= MAX_MESSAGES or payload != MESSAGES[expected]:
                self.errors.setdefault(index, f"message {expected}: got opcode {opcode} "
                                              f"{payload[:12]!r}")
            self.received[index] += 1


def read_to_close(sock: socket.socket) -> tuple[list[int], int | None]:
    """What a slow socket finally gets when read: message numbers in arrival order, and
    the close code of the close frame that ends them (None if none came). Answers the
    close so the server can drop the socket at once."""
    numbers: list[int] = []
    for _ in range(MAX_MESSAGES + 1):
        opcode, payload = read_frame(sock)
        if opcode == 0x8:
            sock.sendall(masked_frame(payload[:2], opcode=0x8))
            return numbers, int.from_bytes(payload[:2], "big")
        numbers.append(int(payload[:6]) if payload in MESSAGES else -1)
    return numbers, None


def test_a_thousand_clients_that_never_read_are_closed_while_ten_thousand_get_every_message(
        start_server):
    # CHAT_CLOSE_TIMEOUT: the slow sockets keep their close frame queued until we read them.
    server = start_server(greenchat_argv(), env={"CHAT_MAX_BACKLOG": str(MAX_BACKLOG),
                                                 "CHAT_MAX_MESSAGE_SIZE": str(MESSAGE_SIZE),
                                                 "CHAT_CLOSE_TIMEOUT": "60"})
    started = time.monotonic()
    fast = connect_many(server.port, FAST)
    slow: list[socket.socket] = []
    try:
        slow = [connect_slow(server.port, f"127.0.0.{10 + i // 5000}") for i in range(SLOW)]
        server.wait_stats(lambda s: s["connections"] == FAST + SLOW)
        connected = time.monotonic()
        readers = FastReaders(fast)
        sender = fast[0]
        before = server.stats()
        sent = 0
        closed_at = None
        while sent < MAX_MESSAGES and (closed_at is None or sent < closed_at + AFTER_THE_DROPS):
            sender.setblocking(True)
            sender.sendall(masked_frame(MESSAGES[sent]))
            sender.setblocking(False)
            sent += 1
            # Paced: the next message waits until every fast client has this one, so the
            # fast clients' kernel buffers never hold more than a message.
            readers.pump_until(sent, timeout=60)
            if closed_at is None and server.stats()["slow_consumers_closed"] >= SLOW:
                closed_at = sent
        after = server.stats()
        broadcast = time.monotonic()

        growth = after["rss_bytes"] - before["rss_bytes"]
        figures = (f"{sent} messages of {MESSAGE_SIZE} B, all {SLOW} slow consumers closed "
                   f"after message {closed_at}; slow_consumers_closed "
                   f"{after['slow_consumers_closed']}; server RSS {before['rss_bytes']} -> "
                   f"{after['rss_bytes']} B (+{growth}); connect {connected - started:.1f} s, "
                   f"broadcast {broadcast - connected:.1f} s")
        print("\nslow consumers:", figures)
        assert after["slow_consumers_closed"] == SLOW, figures
        assert closed_at is not None, figures
        assert after["connections"] == FAST, figures
        # Fast clients: every message, in order, once each (checked frame by frame), no
        # more, and none of them was taken for a slow consumer.
        assert readers.errors == {}, list(readers.errors.items())[:5]
        assert set(readers.received) == {sent}, figures
        # Memory: the frames queued for slow clients are shared bytes, but the server may
        # make each slow client's backlog a private copy (the write watcher joins it), so
        # the worst it may hold is MAX_BACKLOG plus the message that crossed it, per slow
        # client; 32 MiB more for the allocator's slack and the run's transient state.
        # (Measured: a few MB.) The slow_consumers_closed count and the close frames below
        # are what shows the bound is enforced; this shows nothing else grew with it.
        bound = SLOW * (MAX_BACKLOG + MESSAGE_SIZE) + 32 * 1024 * 1024
        assert growth < bound, f"{figures}; bound {bound}"

        # Each slow socket, read at last: a prefix of the stream (what the kernel held and
        # the frame the server had begun), then close 1008.
        endings = [read_to_close(sock) for sock in slow]
        for numbers, code in endings:
            assert numbers == list(range(len(numbers))) and code == 1008, (numbers, code)
        drained = server.wait_stats(lambda s: s["active_watchers"] <= before["active_watchers"]
                                    - SLOW)
        print(f"slow sockets held {min(len(n) for n, _ in endings)}-"
              f"{max(len(n) for n, _ in endings)} messages each; after draining them: "
              f"RSS {drained['rss_bytes']} B, active_watchers {drained['active_watchers']}; "
              f"total {time.monotonic() - started:.1f} s")
    finally:
        for sock in fast + slow:
            sock.close()


# -- connect/disconnect churn ----------------------------------------------------------

CHURN_CYCLES = 100_000
WARM_UP_CYCLES = 4_000
CHURN_IN_FLIGHT = 400
WATCHED = ("connections", "active_watchers", "greenlets", "open_fds")


def test_a_hundred_thousand_connect_disconnect_cycles_leave_the_server_as_they_found_it(
        start_server):
    # gevent's resolver thread (used once, for the server's name at startup) exits after
    # 5 idle seconds, taking two greenlets with it: keep it for an hour, so the count is
    # stable.
    server = start_server(greenchat_argv(), env={"GEVENT_THREADPOOL_IDLE_TASK_TIMEOUT": "3600",
                                                 "CHAT_STATS_GREENLETS": "true"})

    def figures() -> dict:
        stats = server.get_json("/stats?greenlets=1")
        # Open file descriptors, from /proc: a socket the server forgot to close shows
        # here even when every counter and watcher was released.
        stats["open_fds"] = len(os.listdir(f"/proc/{server.pid}/fd"))
        return {key: stats[key] for key in (*WATCHED, "rss_bytes", "handshakes")}

    # Warm-up at the same concurrency, so the allocator's pools have reached their size.
    warm_up = churn(server.port, WARM_UP_CYCLES, CHURN_IN_FLIGHT)
    assert not warm_up.failures, dict(warm_up.failures)
    server.wait_stats(lambda s: s["connections"] == 0)
    baseline = figures()
    print(f"\nchurn baseline after {WARM_UP_CYCLES} cycles: {baseline}")

    result = churn(server.port, CHURN_CYCLES, CHURN_IN_FLIGHT)
    rate = result.cycles / result.seconds
    summary = (f"{result.cycles} cycles in {result.seconds:.1f} s ({rate:.0f}/s), "
               f"{dict(result.completed)}, failures {dict(result.failures)}")
    print("churn:", summary)

    # Closing handshakes and aborts finish within moments; wait for them (bounded),
    # then compare with the baseline.
    deadline = time.monotonic() + 30
    after = figures()
    while any(after[key] != baseline[key] for key in WATCHED) and time.monotonic() < deadline:
        time.sleep(0.5)
        after = figures()
    report = f"baseline {baseline}; after {after}; {summary}"
    print("churn after:", after)
    assert not result.failures and result.cycles == CHURN_CYCLES, report
    assert after["handshakes"] - baseline["handshakes"] == CHURN_CYCLES, report
    for key in WATCHED:
        assert after[key] == baseline[key], f"{key} did not return to baseline: {report}"
    assert abs(after["rss_bytes"] - baseline["rss_bytes"]) <= baseline["rss_bytes"] / 10, report
