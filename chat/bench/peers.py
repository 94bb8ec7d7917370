"""The servers ``greenchat bench --compare`` measures beside the target, and how to start one.

Each is the same broadcast chat (every text message to every client, the sender
included) in a process of its own on a free loopback port:

- ``websockets``: the ``websockets`` library's asyncio server (``peer_websockets``);
- ``picows``: ``picows`` on uvloop (``peer_picows``);
- ``floor``: no library at all, a fixed 101 and a bare ``send`` loop (``floor``): what
  the others are read against, measured in the same run.

The peers need optional packages (``pip install 'greenchat[bench]'``); the library never
imports them. They run as ``python -m chat.bench.<module>`` with this checkout first on
``PYTHONPATH``, so a checkout measures its own copy. Their output goes to a temporary
file (a pipe nobody reads would fill up and stall a peer that logs).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import IO

from .errors import BenchError
from .processes import checkout_env, terminate

__all__ = ["PEERS", "Peer", "PeerProcess", "parse_peers", "start_peer"]

_LISTENING = re.compile(rb" listening on http://([0-9.]+):(\d+)")


@dataclass(frozen=True)
class Peer:
    name: str
    module: str
    packages: tuple[str, ...]  # import names it needs beyond greenchat's own
    what: str  # one line for the report

    def missing(self) -> list[str]:
        return [name for name in self.packages if importlib.util.find_spec(name) is None]

    def argv(self, host: str, port: int) -> list[str]:
        return [sys.executable, "-m", self.module, "--host", host, "--port", str(port)]


PEERS: dict[str, Peer] = {peer.name: peer for peer in (
    Peer("websockets", "chat.bench.peer_websockets", ("websockets",),
         "websockets asyncio server, websockets.broadcast"),
    Peer("picows", "chat.bench.peer_picows", ("picows", "uvloop"),
         "picows on uvloop, a transport.send loop"),
    Peer("floor", "chat.bench.floor", (), "bare epoll loop, fixed 101, a send() loop"),
)}


def parse_peers(text: str) -> list[str]:
    """``"websockets,picows,floor"`` -> the names, in order; ValueError naming a bad one."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError("no peer named")
    for name in names:
        if name not in PEERS:
            raise ValueError(f"unknown peer {name!r} (choose from {', '.join(PEERS)})")
    if len(set(names)) != len(names):
        raise ValueError(f"a peer named twice in {text!r}")
    return names


class PeerProcess:
    """A running peer: ``proc``, the ``port`` it listens on, its output so far (``log``)."""

    def __init__(self, proc: subprocess.Popen, port: int, log: IO[bytes]) -> None:
        self.proc = proc
        self.port = port
        self._log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL: this process only, by PID."""
        terminate(self.proc, grace)
        self._log.close()


def start_peer(name: str, host: str = "127.0.0.1", port: int = 0,
               timeout: float = 30.0) -> PeerProcess:
    """Start peer ``name`` and wait (bounded) for its "listening on" line."""
    peer = PEERS[name]
    missing = peer.missing()
    if missing:
        raise BenchError(f"the {name} peer needs {', '.join(missing)}: pip install "
                         "'greenchat[bench]'", status=2)
    log = tempfile.TemporaryFile(prefix=f"greenchat-peer-{name}-")
    proc = subprocess.Popen(peer.argv(host, port), stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, env=checkout_env(),
                            start_new_session=True)
    running = PeerProcess(proc, 0, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log.seek(0)
        found = _LISTENING.search(log.read())
        if found:
            running.port = int(found.group(2))
            return running
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    said = running.output().strip().splitlines()
    running.stop()
    raise BenchError(f"the {name} peer did not start: {said[-1] if said else 'no output'}")
