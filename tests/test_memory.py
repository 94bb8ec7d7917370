"""Idle connections are cheap: no greenlet, no request state, a few hundred bytes each."""

from __future__ import annotations

import pytest

from helpers import greenchat_argv
from raw_clients import connect_many, masked_frame, read_frame

IDLE_CLIENTS = 5000
MAX_BYTES_PER_CLIENT = 4096


@pytest.mark.slow
def test_five_thousand_idle_clients_cost_under_4_kb_each_and_no_greenlet(start_server):
    greenchat = start_server(greenchat_argv(), env={"CHAT_STATS_GREENLETS": "true"})
    # Warm up: first handshakes import and cache things that later ones reuse.
    for sock in connect_many(greenchat.port, 200):
        sock.close()
    greenchat.wait_stats(lambda s: s["connections"] == 0)
    before = greenchat.get_json("/stats?greenlets=1")

    clients = connect_many(greenchat.port, IDLE_CLIENTS)
    try:
        during = greenchat.wait_stats(lambda s: s["connections"] == IDLE_CLIENTS)
        during = greenchat.get_json("/stats?greenlets=1")
        per_client = (during["rss_bytes"] - before["rss_bytes"]) / IDLE_CLIENTS
        print(f"{per_client:.0f} bytes of RSS per idle client; greenlets {before['greenlets']} -> {during['greenlets']}")
        assert per_client < MAX_BYTES_PER_CLIENT, f"{per_client:.0f} bytes of RSS per idle client"
        # No greenlet parked per client: the count does not grow with the clients.
        assert during["greenlets"] <= before["greenlets"] + 10, (before["greenlets"],
                                                                during["greenlets"])

        # And they are alive, not just counted: one message reaches every one of them.
        clients[0].sendall(masked_frame(b"wake up"))
        for sock in clients:
            assert read_frame(sock) == (0x1, b"wake up")
    finally:
        for sock in clients:
            sock.close()
    greenchat.wait_stats(lambda s: s["connections"] == 0)
