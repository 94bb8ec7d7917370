"""What TLS costs greenchat: server CPU per handshake and RSS per idle connection, wss against ws.

For each mode, ``ws`` (plain TCP) then ``wss`` (``--certfile/--keyfile``, a self-signed
certificate made here with ``openssl``, ``--key-type`` rsa:2048 or ec), a fresh
``greenchat serve`` is started and measured with the same client, in this order:

1. warm-up: 200 connections opened and closed, the server back to 0;
2. handshakes: N websockets opened by ``--threads`` client threads, each connecting one
   at a time (a blocking ``ssl`` socket for wss); server CPU during the phase / N
   (``/proc/PID/task/*/schedstat``: every thread, kernel time included);
3. memory: the server's RSS with the N idle for ``--idle`` s, minus after the warm-up, / N;
4. one message to all: one client sends, every client must get it (else exit 1).

The client is this process, so the figures are comparable between the two modes and
not to ``bench/idle_broadcast.py``'s (two epoll load clients, 200 handshakes in flight
each): the client here offers fewer handshakes at once.

    .venv/bin/python bench/tls_cost.py -n 2000 --runs 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _harness import ROOT, Child, environment, get_stats, tail, wait_until
from chat.bench.errors import BenchError
from chat.protocol import (ClientProtocol, TextMessage, accept_key, encode_client_frame,
                           generate_key, handshake_request)
from chat.system import free_port, process_cpu_ns, process_rss_bytes

WARMUP = 200
TIMEOUT = 30.0


def make_certificate(folder: Path, key_type: str) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        raise BenchError("openssl is not installed (apt-get install openssl)")
    cert, key = folder / "cert.pem", folder / "key.pem"
    new_key = ["-newkey", "rsa:2048"] if key_type == "rsa" else [
        "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    subprocess.run(["openssl", "req", "-x509", *new_key, "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


class Clients:
    """N websocket clients of this process, plain or TLS, opened by a few threads."""

    def __init__(self, port: int, context: ssl.SSLContext | None) -> None:
        self.port = port
        self.context = context
        self.socks: list = []
        self.lock = threading.Lock()
        self.errors: list[str] = []

    def open_one(self, source: str):
        raw = socket.socket()
        raw.settimeout(TIMEOUT)
        raw.bind((source, 0))
        raw.connect(("127.0.0.1", self.port))
        sock = raw if self.context is None else self.context.wrap_socket(
            raw, server_hostname="127.0.0.1")
        key = generate_key()
        sock.sendall(handshake_request(f"127.0.0.1:{self.port}", "/", key))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                raise BenchError(f"closed during the handshake: {head!r}")
            head += chunk
        if not head.startswith(b"HTTP/1.1 101") or accept_key(key).encode() not in head:
            raise BenchError(f"handshake refused: {head[:80]!r}")
        return sock

    def open(self, n: int, threads: int, first_source: int) -> None:
        def work(count: int, source: str) -> None:
            try:
                opened = [self.open_one(source) for _ in range(count)]
            except (OSError, BenchError) as error:
                with self.lock:
                    self.errors.append(str(error))
                return
            with self.lock:
                self.socks += opened

        per = [n // threads + (1 if i < n % threads else 0) for i in range(threads)]
        workers = [threading.Thread(target=work, args=(k, f"127.0.0.{first_source + i}"))
                   for i, k in enumerate(per)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(TIMEOUT + n)
        if self.errors or len(self.socks) != n:
            raise BenchError(f"{len(self.socks)} of {n} connected: {self.errors[:3]}")

    def message_to_all(self) -> None:
        self.socks[0].sendall(encode_client_frame(0x1, b"to everyone"))
        for sock in self.socks:
            codec, events = ClientProtocol(), []
            while not events:
                data = sock.recv(4096)
                if not data:
                    raise BenchError("a client was closed before the message")
                events += codec.receive_data(data)
            if events[0] != TextMessage("to everyone"):
                raise BenchError(f"a client got {events[0]!r}")

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        self.socks = []


def measure(mode: str, args: argparse.Namespace, cert: Path, key: Path, logdir: Path,
            tag: str) -> dict:
    port = free_port()
    argv = [sys.executable, "-m", "chat", "serve", "--host", "127.0.0.1", "--port", str(port)]
    context = None
    if mode == "wss":
        argv += ["--certfile", str(cert), "--keyfile", str(key)]
        context = ssl.create_default_context(cafile=str(cert))
    server = Child(f"{mode} server", argv, logdir / f"{tag}-{mode}.log", pipe=False)
    scheme = "https" if mode == "wss" else "http"
    try:
        line = re.compile(rf"listening on {scheme}://127\.0\.0\.1:{port}\b")
        wait_until(lambda: server.proc.poll() is None and line.search(
            server.log.read_text(errors="replace")), 30, f"the {mode} server to start")
        pid = server.pid

        def connections() -> int:
            stats = get_stats(port, timeout=5.0) if mode == "ws" else _https_stats(port, context)
            return stats["connections"]

        warm = Clients(port, context)
        warm.open(WARMUP, args.threads, 2)
        warm.close()
        wait_until(lambda: connections() == 0, 30, "the server to drop the warm-up")
        time.sleep(0.5)
        rss0 = process_rss_bytes(pid)
        clients = Clients(port, context)
        cpu0 = process_cpu_ns(pid)
        started = time.monotonic()
        clients.open(args.connections, args.threads, 2)
        wall = time.monotonic() - started
        cpu1 = process_cpu_ns(pid)
        wait_until(lambda: connections() == args.connections, 30, "the server to hold all")
        time.sleep(args.idle)
        rss1 = process_rss_bytes(pid)
        clients.message_to_all()
        clients.close()
        result = {"cpu_us_per_handshake": (cpu1 - cpu0) / args.connections / 1000,
                  "handshakes_per_s": args.connections / wall,
                  "kb_per_connection": (rss1 - rss0) / args.connections / 1024}
        print(f"  {mode:4s} {result['cpu_us_per_handshake']:.0f} us server CPU per handshake, "
              f"{result['kb_per_connection']:.2f} KB RSS per idle connection", flush=True)
        return result
    except BenchError as error:
        raise BenchError(f"{error}\n{tail(server.log)}") from None
    finally:
        server.stop()


def _https_stats(port: int, context: ssl.SSLContext) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"https://127.0.0.1:{port}/stats", timeout=5.0,
                                context=context) as response:
        return json.loads(response.read())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", "-n", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=8, help="client threads")
    parser.add_argument("--key-type", choices=["rsa", "ec"], default="rsa",
                        help="the certificate's key: RSA 2048 or ECDSA P-256")
    parser.add_argument("--idle", type=float, default=1.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="greenchat-tls-"))
    report = {"argv": sys.argv, "environment": environment(), "runs": []}
    try:
        cert, key = make_certificate(folder, args.key_type)
        for run in range(1, args.runs + 1):
            print(f"run {run}/{args.runs}", flush=True)
            report["runs"].append({mode: measure(mode, args, cert, key, folder, f"run{run}")
                                   for mode in ("ws", "wss")})
    except (BenchError, OSError, subprocess.CalledProcessError) as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    summary = {mode: {key: statistics.median(run[mode][key] for run in report["runs"])
                      for key in report["runs"][0][mode]} for mode in ("ws", "wss")}
    report["summary"] = summary
    ws, wss = summary["ws"], summary["wss"]
    print(f"\nmedian of {args.runs}: ws {ws['cpu_us_per_handshake']:.0f} us and "
          f"{ws['kb_per_connection']:.2f} KB; wss ({args.key_type}) "
          f"{wss['cpu_us_per_handshake']:.0f} us and {wss['kb_per_connection']:.2f} KB; "
          f"TLS adds {wss['cpu_us_per_handshake'] - ws['cpu_us_per_handshake']:.0f} us per "
          f"handshake and {wss['kb_per_connection'] - ws['kb_per_connection']:.2f} KB per "
          "idle connection")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
