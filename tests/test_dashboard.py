"""The live dashboard (chat/static/dashboard.html) in headless Chromium, against real
servers: it shows the connections it polls from /stats, a line per worker."""

from __future__ import annotations

import re
import threading

import pytest

from helpers import greenchat_argv
from raw_clients import connect, masked_frame
from test_backplane import clients_on_both_workers, start_two_workers
from test_metrics import worker_pids
from test_page import PNG_SIGNATURE, browser, expect, open_chat  # noqa: F401 (fixtures)


@pytest.fixture
def open_dashboard(open_chat):  # noqa: F811
    """The chat page's opener (own context, JavaScript errors fail the test), wider."""
    def open_page(url: str):
        page = open_chat(url)
        page.set_viewport_size({"width": 1200, "height": 640})
        return page

    return open_page


def screenshot(page, path) -> bytes:
    page.screenshot(path=str(path), full_page=True)
    image = path.read_bytes()
    assert image.startswith(PNG_SIGNATURE)
    assert len(image) > 10_000, "a screenshot this small shows nothing"
    return image


@pytest.mark.slow
def test_the_dashboard_shows_the_connected_clients_and_draws_their_chart(start_server,
                                                                           open_dashboard,
                                                                           tmp_path):
    server = start_server(greenchat_argv())
    clients = [connect(server.port) for _ in range(4)]
    clients[0].sendall(masked_frame(b"hello dashboard"))
    page = open_dashboard(server.url + "/dashboard")
    expect(page.locator("#connections")).to_have_text("4")
    expect(page.locator("#workers")).to_have_text("1")
    expect(page.locator("#legend")).to_contain_text(f"pid {server.stats()['pid']}")
    expect(page.locator("#caption-connections")).to_have_text("connections: 4")
    clients.pop().close()
    expect(page.locator("#connections")).to_have_text("3")
    screenshot(page, tmp_path / "dashboard.png")


@pytest.mark.slow
def test_the_dashboard_draws_a_line_per_gunicorn_worker(start_server, redis_server,
                                                        open_dashboard, tmp_path):
    server = start_two_workers(start_server, redis_server.url)
    pids = worker_pids(server.pid)
    clients = clients_on_both_workers(server)
    stop = threading.Event()

    def chatter() -> None:
        """A message every 50 ms (bounded), so the rate charts have something to draw."""
        for n in range(200):
            if stop.wait(0.05):
                return
            clients[n % len(clients)].sendall(masked_frame(f"tick {n}".encode()))

    sender = threading.Thread(target=chatter, daemon=True)
    sender.start()
    try:
        page = open_dashboard(server.url + "/dashboard")
        expect(page.locator("#workers")).to_have_text("2")
        expect(page.locator("#connections")).to_have_text(str(len(clients)))
        for pid in pids:
            expect(page.locator("#legend")).to_contain_text(f"pid {pid}")
        expect(page.locator("#messages")).to_have_text(re.compile("[1-9]"), timeout=15_000)
        page.wait_for_timeout(4000)  # a few more polls, so the charts show lines
        screenshot(page, tmp_path / "dashboard.png")
    finally:
        stop.set()
        sender.join(10)
    for sock in clients:
        sock.close()
