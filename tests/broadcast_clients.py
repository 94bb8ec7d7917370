"""Real websocket clients from two independent PyPI libraries, used by the end-to-end tests.

Each function connects ``clients`` clients to ``url``, has them send ``messages`` text
messages in total (round-robin over the senders), and returns what every client received,
in arrival order. All waits are bounded by ``timeout``.
"""

from __future__ import annotations

import asyncio
import threading
import time

import websocket  # websocket-client
import websockets.asyncio.client


def expected_messages(clients: int, messages: int) -> list[str]:
    return [f"client {i % clients} message {i}" for i in range(messages)]


def with_websocket_client(url: str, clients: int, messages: int,
                          timeout: float = 30.0) -> list[list[str]]:
    """Blocking websocket-client connections, one reader thread each."""
    sockets = [websocket.create_connection(url, timeout=timeout) for _ in range(clients)]
    received: list[list[str]] = [[] for _ in range(clients)]
    done = [threading.Event() for _ in range(clients)]

    def read(index: int) -> None:
        ws = sockets[index]
        try:
            while len(received[index]) < messages:
                received[index].append(ws.recv())
        except (websocket.WebSocketException, OSError):
            pass
        finally:
            done[index].set()

    threads = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for i, text in enumerate(expected_messages(clients, messages)):
        sockets[i % clients].send(text)
    deadline = time.monotonic() + timeout
    for event in done:
        event.wait(max(0.0, deadline - time.monotonic()))
    for ws in sockets:
        ws.close()
    return received


def with_websockets(url: str, clients: int, messages: int,
                    timeout: float = 30.0) -> list[list[str]]:
    """asyncio connections from the `websockets` library."""

    async def run() -> list[list[str]]:
        connections = [await websockets.asyncio.client.connect(url, compression=None)
                       for _ in range(clients)]
        received: list[list[str]] = [[] for _ in range(clients)]

        async def read(index: int) -> None:
            async for text in connections[index]:
                received[index].append(text)
                if len(received[index]) == messages:
                    return

        readers = [asyncio.create_task(read(i)) for i in range(clients)]
        for i, text in enumerate(expected_messages(clients, messages)):
            await connections[i % clients].send(text)
        await asyncio.wait(readers, timeout=timeout)
        for task in readers:
            task.cancel()
        for connection in connections:
            await connection.close()
        return received

    return asyncio.run(run())


def assert_everyone_got_everything_once_in_one_order(received: list[list[str]],
                                                     clients: int, messages: int) -> None:
    """Every client got every message exactly once, all in the same (server) order,
    and each sender's messages in the order it sent them."""
    expected = expected_messages(clients, messages)
    first = received[0]
    assert sorted(first) == sorted(expected), f"client 0 got {len(first)}/{messages} messages"
    for index, got in enumerate(received):
        assert got == first, f"client {index} saw a different sequence than client 0"
    for sender in range(clients):
        mine = [m for m in first if m.startswith(f"client {sender} ")]
        assert mine == [m for m in expected if m.startswith(f"client {sender} ")]
