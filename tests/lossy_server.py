"""A broadcast server that loses exactly one delivery on purpose, to test loss detection.

Like ``chat/bench/peer_websockets.py`` (the ``websockets`` library, every text message to every
client), except that the 2nd broadcast skips one client that is not its sender. It
answers ``GET /stats`` with its counters, so the test fixtures see it as ready.

    python tests/lossy_server.py --port 0      # prints "... listening on http://HOST:PORT"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

import websockets
from websockets.asyncio.server import ServerConnection, serve

counters = {"connections": 0, "messages_received": 0, "deliveries": 0, "dropped": 0}


async def relay(connection: ServerConnection) -> None:
    try:
        async for message in connection:
            if not isinstance(message, str):
                continue
            counters["messages_received"] += 1
            receivers = list(connection.server.connections)
            if counters["messages_received"] == 2:
                victim = next((c for c in receivers if c is not connection), None)
                if victim is not None:
                    receivers.remove(victim)
                    counters["dropped"] += 1
            websockets.broadcast(receivers, message)
            counters["deliveries"] += len(receivers)
    except websockets.ConnectionClosed:
        pass


def stats(connection: ServerConnection, request):
    if request.path == "/stats":
        counters["connections"] = len(connection.server.connections)
        return connection.respond(200, json.dumps(counters))
    return None


async def run(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set_result, None)
    async with serve(relay, host, port, compression=None, ping_interval=None,
                     process_request=stats) as server:
        bound = server.sockets[0].getsockname()
        print(f"lossy server listening on http://{bound[0]}:{bound[1]}", flush=True)
        await stop


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(run(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
