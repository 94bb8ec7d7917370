"""A peer to compare greenchat with: the same broadcast chat on ``websockets`` (asyncio).

Written the way the websockets documentation recommends a broadcast server: compression
off, ``websockets.broadcast`` over ``server.connections``, one handler coroutine per
client and no state of our own per connection. Keepalive pings are off: websockets' default
(one every 20 s per client) would add ~900 pings/s at 18k clients, while greenchat pings
only a client silent for CHAT_PING_INTERVAL (60 s), which a run under a minute never sees.

    python -m chat.bench.peer_websockets --port 0     # any free port, printed

An optional extra (``pip install 'greenchat[bench]'``), never imported by the library;
``greenchat bench --compare websockets`` and ``bench/idle_broadcast.py`` start it. It
imports nothing from greenchat (``chat`` and ``chat.bench`` load nothing on import).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
import sys

import websockets
from websockets.asyncio.server import ServerConnection, serve

__all__ = ["relay", "main"]


async def relay(connection: ServerConnection) -> None:
    """Broadcast every text message the client sends to every connected client."""
    try:
        async for message in connection:
            if isinstance(message, str):
                websockets.broadcast(connection.server.connections, message)
    except websockets.ConnectionClosed:
        pass  # a client that leaves without a closing handshake is not a server error


async def run(host: str, port: int, backlog: int) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set_result, None)
    async with serve(relay, host, port, compression=None, ping_interval=None,
                     backlog=backlog) as server:
        bound = server.sockets[0].getsockname()
        print(f"peer (websockets {websockets.__version__}) listening on "
              f"http://{bound[0]}:{bound[1]}", flush=True)
        await stop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0: any free port, printed")
    parser.add_argument("--backlog", type=int, default=4096,
                        help="listen backlog (the kernel caps it at net.core.somaxconn)")
    args = parser.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(run(args.host, args.port, args.backlog))
    return 0


if __name__ == "__main__":
    sys.exit(main())
