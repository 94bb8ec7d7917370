"""The live dashboard (chat/static/dashboard.html) in headless Chromium, against real
servers: it reads every worker's figures from /metrics and draws, on a time axis, a line
per worker: connections, handshakes, messages and deliveries per second, RSS and memory
per connection above the idle baseline; the broadcast fan-out's p50 and p99, and
refusals by reason."""

from __future__ import annotations

import re
import socket
import threading

import pytest

from helpers import greenchat_argv
from raw_clients import HANDSHAKE, connect_many, masked_frame, read_frame, read_response_head
from test_backplane import clients_on_both_workers, start_two_workers
from test_metrics import worker_pids
from test_page import PNG_SIGNATURE, browser, expect, open_chat  # noqa: F401 (fixtures)

CLOCK = re.compile(r"^\d\d:\d\d:\d\d$")
UNITS = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}


@pytest.fixture
def open_dashboard(open_chat):  # noqa: F811
    """The chat page's opener (own context, JavaScript errors fail the test), wider; the
    page has polled once when it returns."""
    def open_page(url: str):
        page = open_chat(url)
        page.set_viewport_size({"width": 1200, "height": 640})
        expect(page.locator("#status")).to_have_text(re.compile("^updated"))
        return page

    return open_page


def screenshot(page, path) -> bytes:
    page.screenshot(path=str(path), full_page=True)
    image = path.read_bytes()
    assert image.startswith(PNG_SIGNATURE)
    assert len(image) > 10_000, "a screenshot this small shows nothing"
    return image


def shown_bytes(text: str) -> float:
    number, unit = text.split()
    return float(number) * UNITS[unit]


def wait_for_chart_max(page, key: str, above: float = 0) -> None:
    """Wait until some value in a chart's window exceeds ``above``."""
    page.wait_for_function(
        f"Number(document.getElementById('chart-{key}').dataset.max) > {above}")


def refuse_a_foreign_page(port: int) -> None:
    request = HANDSHAKE.format(path="/", port=port, key="dGhlIHNhbXBsZSBub25jZQ==")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request.replace("\r\n\r\n", "\r\nOrigin: https://evil.example\r\n\r\n")
                     .encode())
        assert read_response_head(sock).startswith(b"HTTP/1.1 403")


def test_the_fan_out_quantiles_are_read_within_the_histograms_buckets(start_server,
                                                                       open_dashboard):
    server = start_server(greenchat_argv())
    page = open_dashboard(server.url + "/dashboard")
    # 10 broadcasts at or below 1 ms, 10 in (1 ms, 5 ms]: the median is the 1 ms bound,
    # p99 is 99 % of the way through the second bucket.
    buckets = "[[0.0005, 0], [0.001, 10], [0.005, 20], [Infinity, 20]]"
    assert page.evaluate(f"quantile(0.5, {buckets})") == pytest.approx(0.001)
    assert page.evaluate(f"quantile(0.99, {buckets})") == pytest.approx(0.001 + 0.004 * 0.98)
    assert page.evaluate("quantile(0.99, [[0.1, 0], [Infinity, 3]])") == pytest.approx(0.1)
    assert page.evaluate("quantile(0.5, [[0.1, 0], [Infinity, 0]])") is None
    # The page reads /metrics as Prometheus does: every worker, every figure.
    _, text = server.get("/metrics")
    workers = page.evaluate("text => workersOf(parseMetrics(text), 0)", text)
    assert [worker["pid"] for worker in workers] == [str(server.stats()["pid"])]
    assert len(workers[0]["fanout"]) == 11 and workers[0]["fanout"][-1][0] == float("inf")


def test_behind_an_admin_token_the_dashboard_reads_the_metrics_with_it(start_server,
                                                                        open_chat):  # noqa: F811
    server = start_server(greenchat_argv(), env={"CHAT_ADMIN_TOKEN": "s3cret"})
    page = open_chat(server.url + "/dashboard?token=s3cret")
    expect(page.locator("#status")).to_have_text(re.compile("^updated"))
    expect(page.locator("#workers")).to_have_text("1")


@pytest.mark.slow
def test_the_dashboard_shows_handshakes_fan_out_refusals_and_memory_above_idle(
        start_server, open_dashboard, tmp_path):
    server = start_server(greenchat_argv())
    page = open_dashboard(server.url + "/dashboard")
    expect(page.locator("#workers")).to_have_text("1")
    expect(page.locator("#legend")).to_contain_text(f"pid {server.stats()['pid']}")
    clients = connect_many(server.port, 200)
    try:
        expect(page.locator("#connections")).to_have_text("200")
        expect(page.locator("#caption-connections")).to_have_text("connections: 200")
        wait_for_chart_max(page, "handshakes")
        for n in range(20):  # 20 broadcasts to 200 clients
            clients[n].sendall(masked_frame(f"hello dashboard {n}".encode()))
            for sock in clients[:3]:
                assert read_frame(sock)[1] == f"hello dashboard {n}".encode()
        expect(page.locator("#fanout-p99")).to_have_text(re.compile(r"^\d+(\.\d+)? ms$"))
        p50, p99 = (float(page.locator(f"#fanout-{q}").inner_text().split()[0])
                    for q in ("p50", "p99"))
        assert 0 < p50 <= p99
        expect(page.locator("#chart-fanout path[data-series=p99]")).to_have_count(1)
        wait_for_chart_max(page, "messages")

        refuse_a_foreign_page(server.port)
        expect(page.locator("#refused")).to_have_text("1")
        expect(page.locator("#legend-refusals")).to_have_text("origin")
        wait_for_chart_max(page, "refusals")

        # Memory per connection is what the clients added to the idle process's RSS,
        # not all of its RSS divided among them (~450 kB a client at 200 clients).
        stats = server.stats()
        assert stats["idle_rss_bytes"] > 0
        whole_rss_each = stats["rss_bytes"] / stats["connections"]
        above_idle = shown_bytes(page.locator("#memory-per-connection").inner_text())
        assert above_idle < whole_rss_each / 4, (above_idle, whole_rss_each)

        times = page.locator("#chart-connections text.time")
        assert times.count() >= 3  # a tick every 30 s over two minutes
        assert all(CLOCK.match(text) for text in times.all_text_contents())
        clients.pop().close()
        expect(page.locator("#connections")).to_have_text("199")
        screenshot(page, tmp_path / "dashboard.png")
    finally:
        for sock in clients:
            sock.close()


@pytest.mark.slow
def test_the_dashboard_draws_a_line_per_gunicorn_worker(start_server, redis_server,
                                                        open_dashboard, tmp_path):
    server = start_two_workers(start_server, redis_server.url)
    pids = worker_pids(server.pid)
    page = open_dashboard(server.url + "/dashboard")
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
        expect(page.locator("#workers")).to_have_text("2")
        expect(page.locator("#connections")).to_have_text(str(len(clients)))
        for pid in pids:
            expect(page.locator("#legend")).to_contain_text(f"pid {pid}")
            expect(page.locator(f"#chart-connections path[data-series='{pid}']")).to_have_count(1)
        expect(page.locator("#messages")).to_have_text(re.compile("[1-9]"), timeout=15_000)
        expect(page.locator("#fanout-p99")).to_have_text(re.compile(r"^\d+(\.\d+)? ms$"))
        for key in ("handshakes", "messages", "deliveries"):
            wait_for_chart_max(page, key)
        page.wait_for_timeout(3000)  # a few more polls, so the charts show lines
        screenshot(page, tmp_path / "dashboard.png")
    finally:
        stop.set()
        sender.join(10)
    for sock in clients:
        sock.close()
