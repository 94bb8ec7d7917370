"""A TCP proxy for tests, between a client and a real server, that can stop forwarding
without closing anything: what a frozen Redis (SIGSTOP), a vanished host or a NAT that
forgets a flow look like from the client's side.

The connections stay open and the kernel keeps accepting new ones, but no byte moves
(the proxy stops reading, so what was sent waits in kernel buffers and nothing piles up
in the test process). One thread runs it; ``stop()`` (or leaving the ``with`` block)
ends it and closes every socket. Traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import select
import socket
import threading

__all__ = ["TcpProxy"]

# How long one select() waits, so that a change of mode or stop() takes effect soon.
TICK = 0.02
# A write to either side that takes longer than this closes the pair (the test is broken).
SEND_TIMEOUT = 5.0


class _Pair:
    """One client connection and its connection to the server, with what flows between them."""

    __slots__ = ("client", "server", "up", "down")

    def __init__(self, client: socket.socket, server: socket.socket, up: bool, down: bool):
        self.client = client
        self.server = server
        self.up = up  # client -> server bytes are forwarded
        self.down = down  # server -> client bytes are forwarded

    def close(self) -> None:
        for sock in (self.client, self.server):
            sock.close()


class TcpProxy:
    """Listens on 127.0.0.1 on a free port and forwards to ``127.0.0.1:upstream_port``.

    ``freeze()`` stops every byte both ways on open and new connections, ``thaw()``
    forwards again (what waited included). ``hold_replies()`` / ``release_replies()``
    do the same for the server -> client direction only (a reply delayed past the
    client's timeout). ``switch(port)`` sends new connections to another server and
    leaves the open ones as they are (a frozen server replaced by a new one).
    """

    def __init__(self, upstream_port: int) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._upstream = upstream_port
        self._lock = threading.Lock()
        self._pairs: list[_Pair] = []
        self._up = True  # the modes of new connections
        self._down = True
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)
        self._thread.start()

    def url(self, db: int = 0) -> str:
        """A redis:// URL through this proxy."""
        return f"redis://127.0.0.1:{self.port}/{db}"

    @property
    def connections(self) -> int:
        """Open client connections (frozen ones included)."""
        with self._lock:
            return len(self._pairs)

    def _set(self, up: bool | None = None, down: bool | None = None) -> None:
        with self._lock:
            for pair in self._pairs:
                pair.up = pair.up if up is None else up
                pair.down = pair.down if down is None else down
            self._up = self._up if up is None else up
            self._down = self._down if down is None else down

    def freeze(self) -> None:
        self._set(up=False, down=False)

    def thaw(self) -> None:
        self._set(up=True, down=True)

    def hold_replies(self) -> None:
        self._set(down=False)

    def release_replies(self) -> None:
        self._set(down=True)

    def switch(self, upstream_port: int) -> None:
        """New connections go to ``upstream_port`` and flow; open ones keep their mode."""
        with self._lock:
            self._upstream = upstream_port
            self._up = self._down = True

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(SEND_TIMEOUT + 5)
        with self._lock:
            for pair in self._pairs:
                pair.close()
            self._pairs.clear()
        self._listener.close()

    def __enter__(self) -> "TcpProxy":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- the thread ----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                routes = {self._listener: None}
                for pair in self._pairs:
                    if pair.up:
                        routes[pair.client] = (pair, pair.server)
                    if pair.down:
                        routes[pair.server] = (pair, pair.client)
            readable, _, _ = select.select(list(routes), [], [], TICK)
            for sock in readable:
                if sock is self._listener:
                    self._accept()
                else:
                    pair, destination = routes[sock]
                    self._forward(pair, sock, destination)

    def _accept(self) -> None:
        client, _ = self._listener.accept()
        with self._lock:
            upstream, up, down = self._upstream, self._up, self._down
        try:
            server = socket.create_connection(("127.0.0.1", upstream), timeout=SEND_TIMEOUT)
        except OSError:
            client.close()  # nothing listens there: the client sees its connection end
            return
        for sock in (client, server):
            sock.settimeout(SEND_TIMEOUT)
        with self._lock:
            self._pairs.append(_Pair(client, server, up, down))

    def _forward(self, pair: _Pair, source: socket.socket, destination: socket.socket) -> None:
        try:
            data = source.recv(65536)
            if data:
                destination.sendall(data)
                return
        except OSError:
            pass
        with self._lock:  # one side closed (or failed): close both, as a server would
            if pair in self._pairs:
                self._pairs.remove(pair)
        pair.close()


def measure_detection(runs: int, settings: dict[str, str]) -> list[float]:
    """Seconds from a freeze of Redis (behind the proxy) to ``backplane_connected: false``
    in a `greenchat serve` with ``settings``, once per run (each on fresh processes)."""
    import time

    from helpers import RedisServer, Server, greenchat_argv

    found = []
    for _ in range(runs):
        redis_server = RedisServer()
        proxy = TcpProxy(redis_server.port)
        server = Server(greenchat_argv(), env={"CHAT_REDIS_URL": proxy.url(), **settings})
        try:
            server.wait_ready()
            server.wait_stats(lambda s: s["backplane_connected"])
            time.sleep(2)  # past start-up: the loops in their steady state
            frozen = time.monotonic()
            proxy.freeze()
            server.wait_stats(lambda s: not s["backplane_connected"], timeout=60)
            found.append(time.monotonic() - frozen)
        finally:
            server.stop()
            proxy.stop()
            redis_server.stop()
    return found


if __name__ == "__main__":
    # How long greenchat takes to notice a Redis that stops answering, e.g.
    #   .venv/bin/python tests/tcp_proxy.py 3 CHAT_REDIS_TIMEOUT=5
    import statistics
    import sys

    times = measure_detection(int(sys.argv[1]), dict(a.split("=", 1) for a in sys.argv[2:]))
    print("detected after", ", ".join(f"{t:.2f}" for t in times),
          f"s; median {statistics.median(times):.2f} s")
