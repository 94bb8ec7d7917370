"""The load generator's processes of one run, and the JSON-line pipe to each.

Processes, not threads: each holds up to ~19,000 sockets (its own open-files limit) and
runs its epoll loop on its own core. Every wait on a process is bounded; one that dies or
stops answering ends the run with one line naming it and its last words.

Not to be confused with a server's (gunicorn) workers. The command line and the report
still call these processes workers (``--per-worker``, "2 worker(s)"), as they always did.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .errors import BenchError
from .plan import Plan
from .endpoint import Endpoint

__all__ = ["LoadProcess", "LoadProcesses", "checkout_env", "terminate"]


def terminate(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds: this process only, by PID."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace)
    except ProcessLookupError:  # gone between poll() and the signal
        pass


def checkout_env() -> dict[str, str]:
    """The environment for a child process that imports ``chat``: the checkout this
    module came from first on its path, so a checkout measures with its own code."""
    root = str(Path(__file__).resolve().parents[2])
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [root, os.environ.get("PYTHONPATH")])))


class LoadProcess:
    """One ``python -m chat.bench.loadclient`` child, with its stderr in a temporary file."""

    def __init__(self, number: int, argv: list[str], env: dict[str, str]) -> None:
        self.number = number
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, env=env, start_new_session=True)
        self.pid = self.proc.pid
        self._buffer = b""

    @property
    def name(self) -> str:
        return f"worker {self.number} (pid {self.pid})"

    def _last_words(self) -> str:
        self._log.seek(0)
        lines = self._log.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else "no output"

    def _gone(self) -> BenchError:
        code = self.proc.poll()
        return BenchError(f"{self.name} exited (code {code}): {self._last_words()}")

    def send(self, command: dict) -> None:
        try:
            self.proc.stdin.write(json.dumps(command).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            raise self._gone() from None

    def receive(self, timeout: float) -> dict:
        """The next reply; BenchError if the process fails, exits or stays silent."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.name} did not answer within {timeout:.0f} s")
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise self._gone()
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        reply = json.loads(line)
        if not reply.get("ok"):
            raise BenchError(f"{self.name}: {reply.get('error', reply)}")
        return reply

    def request(self, command: dict, timeout: float = 30.0) -> dict:
        self.send(command)
        return self.receive(timeout)

    def stop(self, grace: float = 5.0) -> None:
        """Ask it to quit; SIGTERM, then SIGKILL, this process only, by PID."""
        if self.proc.poll() is None:
            try:
                self.send({"cmd": "quit"})
                self.proc.wait(grace)
            except (BenchError, subprocess.TimeoutExpired):
                terminate(self.proc, grace)
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        self._log.close()


class LoadProcesses:
    """All load processes of a run. ``ask`` sends every command first, so they work together."""

    def __init__(self, endpoint: Endpoint, plan: Plan, *, inflight: int,
                 handshake_timeout: float, sched: str = "batch",
                 read_nap_ms: float = 0.0) -> None:
        argv = [sys.executable, "-m", "chat.bench.loadclient", "--host", endpoint.address,
                "--port", str(endpoint.port), "--path", endpoint.path,
                "--host-header", endpoint.host_header, "--inflight", str(inflight),
                "--handshake-timeout", str(handshake_timeout), "--sched", sched,
                "--read-nap", str(read_nap_ms / 1000)]
        self.plan = plan
        self.processes: list[LoadProcess] = []
        env = checkout_env()
        try:
            for number in range(plan.processes):
                self.processes.append(LoadProcess(number, argv, env))
            self.ask({"cmd": "status"}, timeout=60)  # all imported and in their loop
        except BaseException:
            self.stop()
            raise

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def ask(self, commands: dict | list[dict], timeout: float = 30.0) -> list[dict]:
        """One command per process (the same to all when given one), then every reply."""
        if isinstance(commands, dict):
            commands = [commands] * len(self.processes)
        for process, command in zip(self.processes, commands):
            process.send(command)
        return [process.receive(timeout) for process in self.processes]

    def stop(self) -> None:
        for process in self.processes:
            process.stop()
