"""GET /metrics: Prometheus text that parses, whose counters move by exactly the traffic a
test sends, with one ``pid`` label per worker, across gunicorn workers through Redis."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from chat.app import create_app
from chat.hub import FANOUT_BUCKETS, Hub
from chat.metrics import HubCollector
from helpers import greenchat_argv
from raw_clients import connect, masked_frame, read_frame
from test_backplane import clients_on_both_workers, start_two_workers
from test_connection import close_code, read_until_closed

Samples = dict[str, dict[tuple, float]]


def parse(text: str) -> Samples:
    """Sample name -> {sorted label pairs -> value}; raises on anything but Prometheus text."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def scrape(server, path: str = "/metrics") -> Samples:
    with urllib.request.urlopen(server.url + path, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse(response.read().decode())


def by_pid(samples: Samples, name: str) -> dict[int, float]:
    """The values of a metric whose only label is ``pid``."""
    return {int(dict(labels)["pid"]): value for labels, value in samples.get(name, {}).items()}


def histogram(samples: Samples, pid: int) -> tuple[list[float], float, float]:
    """(cumulative bucket counts in ``le`` order, _count, _sum) of the fan-out histogram."""
    buckets = {dict(labels)["le"]: value
               for labels, value in samples["greenchat_fanout_seconds_bucket"].items()
               if dict(labels)["pid"] == str(pid)}
    ordered = [buckets[repr(bound)] for bound in FANOUT_BUCKETS] + [buckets["+Inf"]]
    return (ordered, by_pid(samples, "greenchat_fanout_seconds_count")[pid],
            by_pid(samples, "greenchat_fanout_seconds_sum")[pid])


def test_the_histogram_turns_the_hubs_per_bucket_counts_into_cumulative_ones():
    hub = Hub()
    hub.fanout_counts = [3, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2]
    hub.fanout_sum = 12.5
    registry = CollectorRegistry()
    registry.register(HubCollector(hub))
    samples = parse(generate_latest(registry).decode())
    assert histogram(samples, hub.stats()["pid"]) == ([3, 3, 4, 4, 4, 4, 4, 4, 4, 4, 6], 6, 12.5)


def test_counters_move_by_exactly_the_traffic_sent_under_the_one_pid_of_the_server(greenchat):
    before = scrape(greenchat)
    pid = greenchat.stats()["pid"]
    assert set(by_pid(before, "greenchat_connections")) == {pid}
    clients = [connect(greenchat.port) for _ in range(3)]
    payloads = [f"message {n}".encode() * (n + 1) for n in range(4)]
    for payload in payloads:
        clients[0].sendall(masked_frame(payload))
    for sock in clients:
        assert [read_frame(sock) for _ in payloads] == [(0x1, p) for p in payloads]
    after = scrape(greenchat)

    def moved(name: str) -> float:
        return by_pid(after, name)[pid] - by_pid(before, name).get(pid, 0)

    assert by_pid(after, "greenchat_connections") == {pid: 3}
    assert moved("greenchat_handshakes_total") == 3
    assert moved("greenchat_messages_received_total") == 4
    assert moved("greenchat_messages_published_total") == 4
    assert moved("greenchat_deliveries_total") == 4 * 3
    # A server text frame under 126 bytes is a 2-byte header and the payload.
    assert moved("greenchat_delivered_bytes_total") == sum(2 + len(p) for p in payloads) * 3
    assert moved("greenchat_slow_consumers_closed_total") == 0
    assert moved("greenchat_protocol_errors_total") == 0
    assert by_pid(after, "greenchat_resident_memory_bytes")[pid] > 0
    assert by_pid(after, "greenchat_idle_resident_memory_bytes")[pid] > 0
    assert by_pid(after, "greenchat_report_age_seconds") == {pid: 0}
    assert "greenchat_backplane_connected" not in after  # no Redis, no backplane figures
    buckets, count, total = histogram(after, pid)
    # Coalescing may join messages that arrived together into one flush.
    assert 1 <= count - histogram(before, pid)[1] <= 4
    assert buckets == sorted(buckets) and buckets[-1] == count and total > 0


def test_protocol_errors_and_refusals_by_reason_are_counted_at_the_configured_path(
        start_server):
    server = start_server(greenchat_argv(), env={"CHAT_MAX_CONNECTIONS": "2",
                                                 "CHAT_METRICS_PATH": "/internal/metrics"})
    pid = server.stats()["pid"]
    bad = connect(server.port)
    bad.sendall(b"\x81\x02hi")  # unmasked: clients must mask
    assert close_code(read_until_closed(bad)[-1]) == 1002
    server.wait_stats(lambda s: s["connections"] == 0)
    clients = [connect(server.port) for _ in range(2)]
    for _ in range(2):
        with pytest.raises(ConnectionError, match="HTTP/1.1 503"):
            connect(server.port)
    samples = scrape(server, "/internal/metrics")
    assert by_pid(samples, "greenchat_protocol_errors_total") == {pid: 1}
    assert samples["greenchat_refused_total"] == {(("pid", str(pid)), ("reason", "full")): 2}
    assert by_pid(samples, "greenchat_connections") == {pid: 2}
    assert status_of(server, "/metrics") == 404
    for sock in clients:
        sock.close()


def status_of(server, path: str) -> int:
    try:
        return server.get(path)[0]
    except urllib.error.HTTPError as error:
        return error.code


def test_the_dashboard_page_is_told_the_configured_metrics_path():
    app = create_app({"CHAT_METRICS_PATH": "/internal/metrics", "CHAT_DASHBOARD_PATH": "/ops"})
    page = app.test_client().get("/ops")
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert b'<body data-metrics="/internal/metrics" data-token="">' in page.data


def worker_pids(master_pid: int) -> set[int]:
    """gunicorn's workers: the children of the master process, from /proc."""
    children = Path(f"/proc/{master_pid}/task/{master_pid}/children").read_text()
    return {int(pid) for pid in children.split()}


@pytest.mark.slow
def test_two_workers_each_report_under_their_pid_whichever_worker_is_scraped(start_server,
                                                                             redis_server):
    server = start_two_workers(start_server, redis_server.url)
    pids = worker_pids(server.pid)
    assert len(pids) == 2
    clients = clients_on_both_workers(server)
    messages = [f"from worker test {n}".encode() for n in range(5)]
    for message in messages:
        clients[0].sendall(masked_frame(message))
    for sock in clients:
        assert [read_frame(sock) for _ in messages] == [(0x1, m) for m in messages]
    wanted = {"greenchat_connections": len(clients), "greenchat_handshakes_total": len(clients),
              "greenchat_messages_received_total": len(messages),
              "greenchat_deliveries_total": len(messages) * len(clients)}
    # Figures come from the reports each worker writes every second: poll, bounded.
    deadline = time.monotonic() + 20
    while True:
        samples = scrape(server)
        totals = {name: sum(by_pid(samples, name).values()) for name in wanted}
        if totals == wanted and set(by_pid(samples, "greenchat_connections")) == pids:
            break
        assert time.monotonic() < deadline, f"{totals} != {wanted} or pids != {pids}: {samples}"
        time.sleep(0.1)
    assert all(count > 0 for count in by_pid(samples, "greenchat_connections").values())
    assert by_pid(samples, "greenchat_backplane_connected") == {pid: 1 for pid in pids}
    assert set(by_pid(samples, "greenchat_fanout_seconds_count")) == pids
    for sock in clients:
        sock.close()


@pytest.mark.slow
def test_no_counter_goes_backwards_while_scrapes_land_on_either_worker(start_server,
                                                                       redis_server):
    server = start_two_workers(start_server, redis_server.url)
    clients = clients_on_both_workers(server)
    seen: dict[int, float] = {}
    for round_number in range(30):
        clients[round_number % len(clients)].sendall(masked_frame(b"tick"))
        # Each scrape is a new connection, which the kernel hands to either worker.
        for pid, deliveries in by_pid(scrape(server), "greenchat_deliveries_total").items():
            assert deliveries >= seen.get(pid, 0), f"pid {pid} went back in round {round_number}"
            seen[pid] = deliveries
        time.sleep(0.1)
    assert len(seen) == 2
    for sock in clients:
        sock.close()


def test_with_an_admin_token_the_operators_routes_want_it(start_server):
    import urllib.error
    import urllib.request

    server = start_server(greenchat_argv(), env={"CHAT_ADMIN_TOKEN": "s3cret",
                                                 "CHAT_STATS_GREENLETS": "true"})

    def status(path: str, token: str | None = None) -> int:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        request = urllib.request.Request(server.url + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    for path in ("/stats", "/metrics", "/dashboard"):
        assert status(path) == 401 and status(path, "wrong") == 401
        assert status(path, "s3cret") == 200
    assert status("/dashboard?token=s3cret") == 200
    assert status("/stats?token=s3cret") == 401  # figures want the header, not the URL
    assert status("/") == 200  # the chat page itself stays public
    request = urllib.request.Request(server.url + "/stats?greenlets=1",
                                     headers={"Authorization": "Bearer s3cret"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert "greenlets" in json.loads(response.read())


def test_the_heap_walk_of_stats_is_off_unless_asked_for(greenchat):
    assert "greenlets" not in greenchat.get_json("/stats?greenlets=1")
