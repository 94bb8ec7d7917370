"""A peer to compare greenchat with: the same broadcast chat on ``picows`` over uvloop.

picows is a websocket library written in Cython on top of an asyncio transport; with
uvloop (libuv) under it, it is the fastest Python websocket server we know of. This is
written the way its documentation and its ``examples/broadcast_server.py`` broadcast:
a ``WSListener`` per client, a set of every client's transport, and a loop of
``transport.send`` over that set for each text frame received (each send encodes and
writes the frame for that client). Its defaults otherwise: no automatic pings, a 16 KiB
read buffer per connection, no compression (picows has none).

    python -m chat.bench.peer_picows --port 0     # prints "... listening on http://HOST:PORT"

An optional extra (``pip install 'greenchat[bench]'``), never imported by the library;
``greenchat bench --compare picows`` and ``bench/idle_broadcast.py`` start it.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
import sys

import picows
import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest

__all__ = ["Relay", "main"]


class Relay(WSListener):
    """One client: joins the shared set when connected, broadcasts every text frame."""

    def __init__(self, clients: set[WSTransport]) -> None:
        self.clients = clients

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.clients.add(transport)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.clients.discard(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            message = frame.get_payload_as_bytes()
            for client in self.clients:
                client.send(WSMsgType.TEXT, message)
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()


async def run(host: str, port: int, backlog: int) -> None:
    clients: set[WSTransport] = set()

    def listener_factory(_request: WSUpgradeRequest) -> Relay:
        return Relay(clients)

    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set_result, None)
    # aiofastnet is off whether installed or not: the peer is picows on uvloop's transports.
    server = await picows.ws_create_server(listener_factory, host, port, backlog=backlog,
                                           use_aiofastnet=False)
    bound = server.sockets[0].getsockname()
    print(f"peer (picows {picows.__version__}, uvloop {uvloop.__version__}) listening on "
          f"http://{bound[0]}:{bound[1]}", flush=True)
    await stop
    server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8767, help="0: any free port, printed")
    parser.add_argument("--backlog", type=int, default=4096,
                        help="listen backlog (the kernel caps it at net.core.somaxconn)")
    args = parser.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(run(args.host, args.port, args.backlog))
    return 0


if __name__ == "__main__":
    sys.exit(main())
