"""Make docs/dashboard.png: the dashboard of two gunicorn workers sharing a Redis of our
own, while raw clients join in steps, chat a little, some leave, and a few are refused
(pages of another site, broken handshakes).

Run from the repository root: ``.venv/bin/python docs/dashboard_screenshot.py``. Needs
redis-server, Chromium at /usr/bin/chromium and playwright (the test extra). About
two minutes; light traffic (at most 15 messages a second), not a benchmark.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from playwright.sync_api import sync_playwright  # noqa: E402

from helpers import RedisServer, Server  # noqa: E402
from raw_clients import HANDSHAKE, connect, masked_frame, read_response_head  # noqa: E402
from test_backplane import GUNICORN  # noqa: E402
from test_page import CHROMIUM, CHROMIUM_ARGS  # noqa: E402

SECONDS = 115  # the dashboard shows the last two minutes


def refused(port: int, old: str, new: str) -> None:
    """One upgrade request, ``old`` replaced by ``new``, which the server refuses."""
    request = HANDSHAKE.format(path="/", port=port, key="dGhlIHNhbXBsZSBub25jZQ==")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request.replace(old, new).encode())
        read_response_head(sock)


def chat(server: Server) -> list[socket.socket]:
    """60 clients join every 5 s until 40 s, 150 leave at 85 s; 5, 15, then 8 messages/s;
    a page of another site every 4 s from 20 s on, three broken handshakes at 60 s."""
    clients: list[socket.socket] = []
    for second in range(SECONDS):
        if second <= 40 and second % 5 == 0:
            clients += [connect(server.port) for _ in range(60)]
        if second == 85:
            for sock in clients[:150]:
                sock.close()
            clients = clients[150:]
        if second >= 20 and second % 4 == 0:
            refused(server.port, "\r\n\r\n", "\r\nOrigin: https://elsewhere.example\r\n\r\n")
        if second == 60:
            for _ in range(3):
                refused(server.port, "Version: 13", "Version: 99")
        rate = 5 if second < 30 else 15 if second < 85 else 8
        for n in range(rate):
            clients[n % len(clients)].sendall(masked_frame(f"message {second}.{n}".encode()))
            time.sleep(1 / rate)
    return clients


def main(output: Path = ROOT / "docs" / "dashboard.png") -> None:
    redis = RedisServer()
    server = Server(GUNICORN + ["--workers", "2"], env={"CHAT_REDIS_URL": redis.url})
    clients: list[socket.socket] = []
    try:
        server.wait_ready()
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_context(viewport={"width": 1200, "height": 700}).new_page()
            page.goto(server.url + "/dashboard")
            clients = chat(server)
            page.screenshot(path=str(output), full_page=True)
            browser.close()
    finally:
        for sock in clients:
            sock.close()
        server.stop()
        redis.stop()
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
