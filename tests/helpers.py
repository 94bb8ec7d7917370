"""Test helpers: real servers (greenchat, gunicorn, Redis) in subprocesses, stopped by PID.

Imported by test modules and by conftest.py's fixtures; a module of its own so that tests
import it by name instead of importing conftest (which pytest loads itself).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from pathlib import Path

import pytest

from chat.system import free_port

__all__ = ["BIN", "PORT_LINE", "ROOT", "RedisCluster", "RedisServer", "Server", "free_port",
           "greenchat_argv", "inflate_through_window"]

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# "greenchat listening on http://127.0.0.1:PORT" (ours) or "Listening at: http://...:PORT" (gunicorn)
PORT_LINE = re.compile(r"[Ll]istening (?:on|at:) http://[^\s:]+:(\d+)")


class Server:
    """A server process we started; knows its port and reads its own output."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT):
        full_env = dict(os.environ, PYTHONUNBUFFERED="1")
        full_env.update(env or {})
        self.argv = argv
        # Sent with every request of get(): the operator's routes want it when it is set.
        token = full_env.get("CHAT_ADMIN_TOKEN")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self._port_seen = threading.Event()
        self.port = 0
        threading.Thread(target=self._read_output, daemon=True).start()

    def _read_output(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            match = PORT_LINE.search(line)
            if match and not self.port:
                self.port = int(match.group(1))
                self._port_seen.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def wait_ready(self, timeout: float = 30.0) -> "Server":
        """Wait for the port line, then for /stats to answer (bounded)."""
        if not self._port_seen.wait(timeout):
            self.stop()
            raise RuntimeError(f"server printed no port within {timeout}s:\n{self.output}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output}")
            try:
                self.stats()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"/stats did not answer within {timeout}s:\n{self.output}")

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, str]:
        request = urllib.request.Request(self.url + path, headers=self.headers)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()

    def get_json(self, path: str) -> dict:
        return json.loads(self.get(path)[1])

    def stats(self) -> dict:
        return self.get_json("/stats")

    def wait_stats(self, predicate, timeout: float = 20.0) -> dict:
        """Poll /stats until predicate(stats) holds; fail with the last value seen."""
        deadline = time.monotonic() + timeout
        stats: dict | str = "no answer yet"
        while True:
            try:
                stats = self.stats()
                if predicate(stats):
                    return stats
            except OSError as error:  # not listening yet, or restarting
                stats = f"no answer: {error}"
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout}s; last /stats: {stats}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """End the process group we started (gunicorn's workers included), by PID."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        return self.proc.returncode


def greenchat_argv(*args: str) -> list[str]:
    """`greenchat serve` on an ephemeral loopback port, through this interpreter."""
    return [sys.executable, "-m", "chat", "serve", "--host", "127.0.0.1", "--port", "0", *args]


class RedisServer:
    """A redis-server of our own on a free loopback port, no persistence; stopped by PID."""

    def __init__(self, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("CI"):
                raise RuntimeError("redis-server is missing in CI: .ci/install-system-deps installs it")
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        self.wait_ready()

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not answer within {timeout}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def restart(self) -> None:
        self.stop()
        self.__init__(self.port)


def inflate_through_window(data: bytes, window_bits: int) -> bytes:
    """Inflate one output byte at a time, so every back-reference must come from zlib's
    window of 2 ** window_bits bytes (within one call's output zlib lets them reach
    further), as it does for a receiver whose window is that small."""
    inflater = zlib.decompressobj(-window_bits)
    out = bytearray()
    pending = data + b"\x00\x00\xff\xff"
    for _ in range(len(data) * 300):  # 258 bytes of output per input byte at the most
        out += inflater.decompress(pending, 1)
        pending = inflater.unconsumed_tail
        if not pending:
            return bytes(out) + inflater.flush()
    raise AssertionError("did not end")


def _free_cluster_port(tries: int = 200) -> int:
    """A free port P below 55536 whose cluster bus port, P + 10000, is free too."""
    import random
    for _ in range(tries):
        port = random.randint(20_000, 29_999)
        ok = True
        for candidate in (port, port + 10_000):
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", candidate))
                except OSError:
                    ok = False
        if ok:
            return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisCluster:
    """A Redis Cluster of ``masters`` redis-server processes of our own (no replicas, no
    persistence but each node's nodes.conf), on free loopback ports in ``folder``;
    every node is stopped by PID."""

    def __init__(self, folder: Path, masters: int = 3, node_timeout_ms: int = 1000) -> None:
        binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if binary is None or cli is None:
            if os.environ.get("CI"):
                raise RuntimeError("redis-server is missing in CI: .ci/install-system-deps installs it")
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.folder = folder
        self.node_timeout_ms = node_timeout_ms
        self.ports = [_free_cluster_port() for _ in range(masters)]
        self.procs: dict[int, subprocess.Popen] = {}
        try:
            for port in self.ports:
                self.start(port)
            for port in self.ports:
                self.wait_answering(port)
            subprocess.run([cli, "--cluster", "create",
                            *(f"127.0.0.1:{port}" for port in self.ports),
                            "--cluster-replicas", "0", "--cluster-yes"],
                           check=True, capture_output=True, timeout=30)
            self.wait_ok()
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self, port: int) -> None:
        """Start (or start again, with its nodes.conf) the node on ``port``."""
        folder = self.folder / str(port)
        folder.mkdir(exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled",
             "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout",
             str(self.node_timeout_ms), "--appendonly", "no", "--save", ""],
            cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)

    def state(self, port: int) -> str:
        """The node's ``cluster_state`` (``ok`` or ``fail``); redis.ConnectionError when
        it does not answer."""
        import redis  # the tests' dependency, not the helpers'
        with redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1) as client:
            return client.execute_command("CLUSTER INFO")["cluster_state"]

    def wait_answering(self, port: int, timeout: float = 10.0) -> None:
        import redis
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.state(port)
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on {port} did not answer within {timeout}s")
                time.sleep(0.05)

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every node says ``cluster_state:ok`` (bounded)."""
        import redis
        deadline = time.monotonic() + timeout
        while True:
            try:
                if all(self.state(port) == "ok" for port in self.ports):
                    return
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster on {self.ports} was not ok within {timeout}s")
            time.sleep(0.1)

    def port_of_slot(self, slot: int) -> int:
        """The port of the node serving ``slot``, from the cluster's own answer."""
        import redis  # the tests' dependency, not the helpers'
        with redis.Redis(port=self.ports[0], socket_timeout=5) as client:
            for start, end, primary, *_ in client.execute_command("CLUSTER SLOTS"):
                if start <= slot <= end:
                    return int(primary[1])
        raise LookupError(slot)

    def kill(self, port: int) -> None:
        """SIGKILL the node on ``port`` (by PID) and wait for it to be gone."""
        proc = self.procs[port]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
