"""What the bench scripts share: host checks, child processes, /stats, polling, the
environment they ran in.

``idle_broadcast.py``, ``rooms.py`` and ``one_box.py`` import this (run as scripts,
``bench/`` is first on their path); no script imports another. Machine facts come from
``chat.system``, the host checks from ``chat.bench.preflight`` (``chat.checks``), the
error from ``chat.bench.errors``: nothing here re-implements the library.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import select
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chat.bench.errors import BenchError  # noqa: E402
from chat.bench.preflight import run_checks  # noqa: E402
from chat.system import RESERVED_FDS, read_sysctl  # noqa: E402

__all__ = ["ROOT", "WARMUP", "Child", "check_host", "environment", "get_stats", "tail",
           "wait_until"]

# Connections opened and closed before the memory baseline is read, so what the first
# connections cost only once is not counted per connection. The memory they free is
# reused by the next ones: a run of not many more than this barely moves RSS.
WARMUP = 500


def check_host(connections: int, in_flight: int, per_source: int) -> None:
    """The library's host checks for a run with one server process holding every
    connection and its load clients on this machine. Problems go to stderr with their
    fix; one that stops the run exits with status 2."""
    checks = run_checks(connections=connections, per_process=connections,
                        reserved=RESERVED_FDS, in_flight=in_flight, per_source=per_source)
    for check in checks:
        if not check.ok:
            print(f"{'error' if check.fatal else 'warning'}: {check}", file=sys.stderr)
    if any(check.fatal and not check.ok for check in checks):
        raise SystemExit(2)


def wait_until(condition, timeout: float, what: str, interval: float = 0.05):
    """Poll ``condition`` until it returns something true; BenchError after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


class Child:
    """A process we started (own session), with an optional JSON-line pipe on stdin/stdout."""

    def __init__(self, name: str, argv: list[str], log: Path, pipe: bool, cwd: Path = ROOT,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = log
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env=env, start_new_session=True,
            stdin=subprocess.PIPE if pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipe else self._log_file,
            stderr=self._log_file)
        self.pid = self.proc.pid
        self._buffer = b""

    def write(self, line: str) -> None:
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError as error:
            raise BenchError(f"{self.name} (pid {self.pid}) exited early:\n{tail(self.log)}") \
                from error

    def readline(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.name} (pid {self.pid}) did not answer within "
                                 f"{timeout:.0f} s")
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise BenchError(f"{self.name} (pid {self.pid}) exited early (code "
                                     f"{self.proc.poll()}):\n{tail(self.log)}")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def readline_json(self, timeout: float) -> dict:
        return json.loads(self.readline(timeout))

    def request(self, command: dict | str, timeout: float) -> dict:
        self.write(command if isinstance(command, str) else json.dumps(command))
        return json.loads(self.readline(timeout))

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds: this process only, by PID."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            except ProcessLookupError:
                pass
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        self._log_file.close()


def get_stats(port: int, timeout: float = 5.0) -> dict:
    """The ``/stats`` JSON of a server on 127.0.0.1 (one request, connection closed)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/stats",
                                     headers={"Connection": "close"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def environment() -> dict:
    """Versions, kernel, CPUs, load and the network sysctls, for a result's JSON."""
    versions = {}
    for dist in ("greenchat", "gevent", "greenlet", "gevent-websocket", "Flask", "gunicorn",
                 "websockets"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "packages": versions,
        "sysctl": {name: read_sysctl(name) for name in (
            "net.core.somaxconn", "net.ipv4.tcp_max_syn_backlog",
            "net.ipv4.ip_local_port_range", "fs.file-max", "net.ipv4.tcp_tw_reuse")},
    }
