"""Clients from two independent libraries, against greenchat serve and gunicorn."""

from __future__ import annotations

import asyncio
import sys
import threading

import pytest
import websockets.asyncio.client

from broadcast_clients import (
    assert_everyone_got_everything_once_in_one_order,
    with_websocket_client,
    with_websockets,
)
from helpers import ROOT, greenchat_argv

CLIENTS = 20
MESSAGES = 100

SERVERS = {
    "greenchat serve": greenchat_argv(),
    "gunicorn -c gunicorn.conf.py": [
        sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"),
        "--bind", "127.0.0.1:0"],
    "gunicorn -k GeventWebSocketWorker chat.wsgi:app": [
        sys.executable, "-m", "gunicorn", "-k",
        "geventwebsocket.gunicorn.workers.GeventWebSocketWorker", "--bind", "127.0.0.1:0",
        "--no-control-socket", "chat.wsgi:app"],
}
LIBRARIES = {"websocket-client": with_websocket_client, "websockets": with_websockets}


@pytest.mark.slow
@pytest.mark.parametrize("server_name", SERVERS)
@pytest.mark.parametrize("library", LIBRARIES)
def test_every_client_receives_every_message_once_in_server_order(start_server, server_name,
                                                                   library):
    server = start_server(SERVERS[server_name])
    received = LIBRARIES[library](server.ws_url, CLIENTS, MESSAGES)
    assert_everyone_got_everything_once_in_one_order(received, CLIENTS, MESSAGES)
    stats = server.wait_stats(lambda s: s["connections"] == 0)
    assert stats["messages_received"] == MESSAGES
    assert stats["deliveries"] == CLIENTS * MESSAGES


def test_a_websockets_client_sees_what_websocket_client_clients_send(greenchat):
    """The two libraries in one chat: a `websockets` listener gets the same sequence."""
    heard: list[str] = []
    ready = threading.Event()

    async def listen() -> None:
        async with websockets.asyncio.client.connect(greenchat.ws_url, compression=None) as ws:
            ready.set()
            for _ in range(MESSAGES):
                heard.append(await asyncio.wait_for(ws.recv(), 20))

    listener = threading.Thread(target=asyncio.run, args=(listen(),), daemon=True)
    listener.start()
    assert ready.wait(10), "the websockets client did not connect"
    received = with_websocket_client(greenchat.ws_url, 5, MESSAGES)
    listener.join(30)
    assert_everyone_got_everything_once_in_one_order(received, 5, MESSAGES)
    assert heard == received[0]
