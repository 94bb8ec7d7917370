#!/usr/bin/env python3
"""What clients that stop reading cost the server: kernel memory, and one big message.

N clients connect and stop reading (each with a 4 KiB receive buffer, so the figure is
the server's side of the connection, not the client's); one more client talks. The
talker fills every stalled client's kernel buffer (64 KiB messages until each holds more
than tcp_wmem's maximum), then sends one message of ``--size`` bytes, which the server
queues; then each stalled client reads ``--read`` bytes (2 MiB) once, as a slow reader does,
so the server drains some of it. Reported, median of ``--runs``:

- kernel TCP memory of the N stalled clients (/proc/net/sockstat ``mem``, in pages,
  before they connected and once their buffers are full), per client;
- the server's RSS growth from the one message and the drain: a private copy of what is
  queued, per client, before greenchat queued shared frames by reference (its drain
  joined and sliced the queue); the message's size once after.

``--chat-root DIR`` runs the server of another checkout (for "before" figures, e.g. a
``git worktree`` of an older commit); ``--env KEY=VALUE`` sets a server setting.

    .venv/bin/python bench/stalled.py -n 1000 --size 1048576 --runs 3
    .venv/bin/python bench/stalled.py -n 1000 --env CHAT_SEND_BUFFER=0    # kernel autotuning
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _harness import ROOT, Child, environment, get_stats, wait_until

from chat.protocol import (ClientProtocol, accept_key, encode_client_frame, generate_key,
                           handshake_request)
from chat.system import PAGE_SIZE, process_rss_bytes

FILL_MESSAGE = 64 * 1024


def tcp_memory_pages() -> int:
    """Pages the kernel has allocated to TCP sockets, all of them (/proc/net/sockstat)."""
    text = Path("/proc/net/sockstat").read_text()
    return int(re.search(r"^TCP:.* mem (\d+)", text, re.M).group(1))


def open_websocket(port: int, source: str, rcvbuf: int = 0) -> socket.socket:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setsockopt(socket.SOL_IP, getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24), 1)
    sock.bind((source, 0))
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    key = generate_key()
    sock.sendall(handshake_request(f"127.0.0.1:{port}", "/", key))
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    if b" 101 " not in head.split(b"\r\n", 1)[0] or accept_key(key).encode() not in head:
        raise SystemExit(f"stalled.py: handshake refused: {head[:80]!r}")
    return sock


def read_messages(sock: socket.socket, codec: ClientProtocol, count: int) -> None:
    """Read until ``count`` messages arrived (the talker reads everything it is sent)."""
    got = 0
    while got < count:
        data = sock.recv(1 << 20)
        if not data:
            raise SystemExit("stalled.py: the server closed the talker")
        got += sum(1 for event in codec.receive_data(data) if hasattr(event, "text"))


def read_a_little(socks: list[socket.socket], amount: int, timeout: float = 60.0) -> None:
    """Each socket reads ``amount`` bytes, then stops again: enough for the server's
    send buffer to have room (the kernel says writable at half free) and drain."""
    left = {sock: amount for sock in socks}
    deadline = time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        for sock in list(left):
            try:
                left[sock] -= len(sock.recv(65536, socket.MSG_DONTWAIT))
            except BlockingIOError:
                continue
            if left[sock] <= 0:
                del left[sock]
        time.sleep(0.001)


def one_run(args, run_dir: Path) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", CHAT_MAX_MESSAGE_SIZE=str(2 * args.size),
               CHAT_MAX_BACKLOG=str(64 << 20), CHAT_PING_INTERVAL="0")
    env.update(dict(item.split("=", 1) for item in args.env))
    log = run_dir / "server.log"
    server = Child("server", [sys.executable, "-m", "chat", "serve", "--host", "127.0.0.1",
                              "--port", "0"], log, pipe=False, cwd=args.chat_root, env=env)
    stalled: list[socket.socket] = []
    try:
        port = int(wait_until(lambda: re.search(r"listening on http://[\d.]+:(\d+)",
                                                log.read_text()), 30, "the server").group(1))
        wait_until(lambda: get_stats(port), 30, "/stats")
        pages_before = tcp_memory_pages()
        for i in range(args.connections):
            stalled.append(open_websocket(port, f"127.0.0.{2 + i // 20000}", rcvbuf=4096))
        talker = open_websocket(port, "127.0.0.1")
        codec = ClientProtocol()
        # Fill every kernel buffer, for what stalled clients cost the kernel.
        fills = (4 << 20) // FILL_MESSAGE + 1  # more than tcp_wmem's maximum per client
        for _ in range(fills):
            talker.sendall(encode_client_frame(1, b"f" * FILL_MESSAGE))
            read_messages(talker, codec, 1)
        time.sleep(args.settle)
        pages_full = tcp_memory_pages()
        # Then the big message, queued by the server behind the fill; then each stalled
        # client reads a little once, as a slow reader does, so the server drains.
        rss_before = process_rss_bytes(server.pid)
        talker.sendall(encode_client_frame(1, b"m" * args.size))
        read_messages(talker, codec, 1)
        time.sleep(args.settle)
        read_a_little(stalled, args.read)
        time.sleep(args.settle)  # let the write watchers of the stalled clients run
        rss_after = process_rss_bytes(server.pid)
        stats = get_stats(port)
        return {
            "kernel_bytes_per_client": (pages_full - pages_before) * PAGE_SIZE / args.connections,
            "message_rss_growth_bytes": rss_after - rss_before,
            "message_rss_per_client": (rss_after - rss_before) / args.connections,
            "server_rss_bytes": rss_after,
            "connections": stats["connections"],
            "slow_consumers_closed": stats["slow_consumers_closed"],
        }
    finally:
        for sock in stalled:
            sock.close()
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--connections", type=int, default=1000)
    parser.add_argument("--size", type=int, default=1 << 20, help="bytes of the one message")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds to let the server drain what it can before measuring")
    parser.add_argument("--read", type=int, default=2 << 20,
                        help="bytes each stalled client reads once, after the big message")
    parser.add_argument("--chat-root", type=Path, default=ROOT,
                        help="checkout whose server runs (default: this one)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not 1 <= args.connections <= 19_000:
        parser.error("-n must be 1-19000 (one server process, one load process)")
    runs = []
    with tempfile.TemporaryDirectory(prefix="stalled-") as tmp:
        for index in range(args.runs):
            run = one_run(args, Path(tmp))
            runs.append(run)
            print(f"run {index + 1}: kernel {run['kernel_bytes_per_client'] / 1024:.1f} KB "
                  f"per stalled client; one {args.size:,}-byte message: RSS "
                  f"+{run['message_rss_growth_bytes'] / 2**20:.1f} MB "
                  f"({run['message_rss_per_client'] / 1024:.2f} KB per client); "
                  f"{run['slow_consumers_closed']} closed", flush=True)
    medians = {key: statistics.median(run[key] for run in runs)
               for key in ("kernel_bytes_per_client", "message_rss_growth_bytes",
                           "message_rss_per_client")}
    print(f"median of {args.runs}: kernel {medians['kernel_bytes_per_client'] / 1024:.1f} KB "
          f"per stalled client ({medians['kernel_bytes_per_client'] * args.connections / 2**20:.0f} MB "
          f"for {args.connections:,}); one message: RSS +"
          f"{medians['message_rss_growth_bytes'] / 2**20:.1f} MB")
    if args.json:
        args.json.write_text(json.dumps({"args": {**vars(args), "chat_root": str(args.chat_root),
                                                  "json": str(args.json)},
                                         "runs": runs, "medians": medians,
                                         "environment": environment()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
