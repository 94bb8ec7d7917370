"""What the bench scripts share: host checks, child processes, /stats, polling, the
environment they ran in.

The scripts import this (run as scripts, ``bench/`` is first on their path); no script
imports another. ``Cluster`` is the server side of ``one_box.py``, ``storm.py`` and
``steps.py``: a redis-server and gunicorn with several workers on the Redis backplane. Machine facts come from
``chat.system``, the host checks from ``chat.bench.preflight`` (``chat.checks``), the
error from ``chat.bench.errors``: nothing here re-implements the library.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chat.bench.errors import BenchError  # noqa: E402
from chat.bench.preflight import run_checks  # noqa: E402
from chat.bench.processes import terminate  # noqa: E402
from chat.checks import tcp_ehash_buckets  # noqa: E402
from chat.system import RESERVED_FDS, free_port, free_ports, read_sysctl, sysctl_path  # noqa: E402

__all__ = ["ROOT", "WARMUP", "Child", "Cluster", "check_host", "environment", "get_stats",
           "gunicorn_env",
           "memory_server", "rerun_in_netns", "IN_NETNS",
           "repeat_runs", "tail", "wait_until"]

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


# Set in the environment of a script rerun by rerun_in_netns: the size of its TCP table.
IN_NETNS = "GREENCHAT_BENCH_NETNS"
# Per-namespace sysctls a run relies on, copied from the host into the namespace it gets.
NETNS_SYSCTLS = ("net.core.somaxconn", "net.ipv4.tcp_max_syn_backlog",
                 "net.ipv4.ip_local_port_range")


def rerun_in_netns(sockets: int) -> int:
    """Run this script again, same arguments, in a new network namespace whose table of
    established TCP sockets has a bucket for each of ``sockets``; its exit status.

    Why: the host's table is sized at boot (262,144 buckets here) and every packet looks
    its socket up in one bucket's chain; at a million loopback connections (2M sockets)
    that walk was 7% of the machine during a broadcast (chat.checks.check_tcp_ehash). A
    namespace made while ``net.ipv4.tcp_child_ehash_entries`` is set gets a table of its
    own of that size (Linux 6.1+). The host's value is put back as soon as the namespace
    exists; loopback is brought up and ``NETNS_SYSCTLS`` copied from the host. Needs root,
    unshare(1) and ip(8); traffic stays on the namespace's own loopback.
    """
    buckets = tcp_ehash_buckets(sockets)
    knob = sysctl_path("net.ipv4.tcp_child_ehash_entries")
    if not knob.exists():
        raise BenchError("--netns: this kernel has no net.ipv4.tcp_child_ehash_entries "
                         "(Linux 6.1 or later)")
    for tool in ("unshare", "ip", "sysctl"):
        if shutil.which(tool) is None:
            raise BenchError(f"--netns: {tool} not found")
    copies = " ".join(shlex.quote(f"{name}={value}") for name in NETNS_SYSCTLS
                      if (value := read_sysctl(name)) is not None)
    setup = f'ip link set lo up && sysctl -q -w {copies} && exec "$@"'
    host_ns = os.readlink("/proc/self/ns/net")
    old = knob.read_text().strip()
    try:
        knob.write_text(str(buckets))
    except OSError as error:
        raise BenchError(f"--netns: cannot set net.ipv4.tcp_child_ehash_entries: "
                         f"{error.strerror} (needs root)") from None
    try:
        child = subprocess.Popen(["unshare", "--net", "sh", "-c", setup, "sh",
                                  sys.executable, *sys.argv],
                                 env={**os.environ, IN_NETNS: str(buckets)})
        deadline = time.monotonic() + 10.0
        while child.poll() is None and time.monotonic() < deadline:
            try:
                if os.readlink(f"/proc/{child.pid}/ns/net") != host_ns:
                    break  # made, with its table: the host's setting can go back
            except OSError:
                pass
            time.sleep(0.01)
    finally:
        knob.write_text(old)
    return child.wait()


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


def repeat_runs(count: int, stem: str, one_run: Callable[[str], dict],
                line: Callable[[dict], object], prog: str) -> list[dict]:
    """``one_run(name)`` ``count`` times (fresh servers each), printing ``line(run)`` as
    JSON after each; the name is ``stem``, or ``stem-runN`` when there are several.

    A run that fails (BenchError, a timeout, an OSError) ends the series with one line on
    stderr: the runs done so far are returned, so their figures are still written."""
    runs: list[dict] = []
    try:
        for number in range(1, count + 1):
            runs.append(one_run(stem if count == 1 else f"{stem}-run{number}"))
            print(json.dumps(line(runs[-1])), flush=True)
    except (BenchError, subprocess.TimeoutExpired, OSError) as error:
        print(f"{prog}: {error}", file=sys.stderr)
    return runs


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
        terminate(self.proc, grace)
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


def memory_server(name: str, variant: str, logdir: Path, trace: bool = False) -> tuple[Child, int]:
    """``bench/conn_memory.py --serve variant`` (a server with its ``/_memory`` route) in
    a process of its own, once it answers ``/_memory?mark``: (the process, its port)."""
    port = free_port()
    argv = [sys.executable, str(ROOT / "bench" / "conn_memory.py"), "--serve", variant,
            "--port", str(port)]
    server = Child(name, argv + (["--trace"] if trace else []), logdir / f"{name}.log",
                   pipe=False)

    def ready():
        if server.proc.poll() is not None:
            raise BenchError(f"{name} exited with {server.proc.returncode}:\n{tail(server.log)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_memory?mark",
                                        timeout=60) as response:
                return json.load(response)
        except OSError:
            return None

    try:
        wait_until(ready, 30, f"{name} to answer")
    except BaseException:
        server.stop()
        raise
    return server, port


def gunicorn_env() -> dict[str, str]:
    """How gunicorn.conf.py was set here (GUNICORN_PRELOAD, GUNICORN_WORKERS...)."""
    return {name: value for name, value in os.environ.items() if name.startswith("GUNICORN_")}


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
        "gunicorn_env": gunicorn_env(),
        "sysctl": {name: read_sysctl(name) for name in (
            "net.core.somaxconn", "net.ipv4.tcp_max_syn_backlog",
            "net.ipv4.ip_local_port_range", "fs.file-max", "net.ipv4.tcp_tw_reuse")},
    }


class Cluster:
    """redis-server and ``gunicorn -c gunicorn.conf.py`` with ``workers`` workers on the Redis
    backplane (``CHAT_REDIS_URL``), one SO_REUSEPORT socket each on ``port`` (free if 0).

    Each is started in a session of its own and stopped by its process group's id, which
    is its PID: gunicorn's workers go with their master. ``env`` adds settings (``CHAT_``).
    """

    def __init__(self, workers: int, *, port: int = 0, log: Path | None = None,
                 env: dict[str, str] | None = None, timeout: float = 60.0) -> None:
        self.workers = workers
        self.port, self.redis_port = (port, free_port()) if port else free_ports(2)
        self.started: list[subprocess.Popen] = []
        self.log = log
        try:
            self.redis = self._start([shutil.which("redis-server") or "redis-server",
                                      "--port", str(self.redis_port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no"], None)
            self.env = dict(os.environ, CHAT_REDIS_URL=f"redis://127.0.0.1:{self.redis_port}/0",
                            GUNICORN_WORKERS=str(workers),
                            GUNICORN_BIND=f"127.0.0.1:{self.port}", GUNICORN_TIMEOUT="300",
                            GUNICORN_LOGLEVEL="warning",
                            # Said outright, not left to gunicorn.conf.py's on_starting: a
                            # graceful reload (SIGHUP) reads the file again without calling
                            # on_starting, so reuse_port would fall back to off and the new
                            # workers would listen on nothing (every reconnection refused).
                            GUNICORN_REUSE_PORT="1" if workers > 1 else "0", **(env or {}))
            self.master = self._start([sys.executable, "-m", "gunicorn", "-c",
                                       "gunicorn.conf.py"], log, self.env)
            self.wait_workers(timeout + workers)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def _start(self, argv: list[str], log: Path | None,
               env: dict[str, str] | None = None) -> subprocess.Popen:
        out = open(log, "ab") if log is not None else subprocess.DEVNULL
        try:
            process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            if log is not None:
                out.close()
        self.started.append(process)
        return process

    def wait_workers(self, timeout: float) -> None:
        """Until /stats counts every worker on the backplane (BenchError after ``timeout``)."""
        def ready():
            if self.master.poll() is not None:
                raise BenchError(f"gunicorn exited with code {self.master.returncode}"
                                 + (f":\n{tail(self.log)}" if self.log else ""))
            try:
                return get_stats(self.port, timeout=10).get("cluster", {}).get(
                    "workers") == self.workers
            except (OSError, ValueError):
                return False
        wait_until(ready, timeout, f"{self.workers} gunicorn workers", interval=0.5)

    def worker_pids(self) -> list[int]:
        found = []
        for task in Path(f"/proc/{self.master.pid}/task").iterdir():
            found += [int(pid) for pid in (task / "children").read_text().split()]
        return found

    def stop(self) -> None:
        """SIGTERM to each process group we started (newest first), SIGKILL if it stays."""
        for process in reversed(self.started):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(10)
        self.started.clear()
