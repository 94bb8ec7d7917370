"""Operability: ``GET /metrics`` in Prometheus text format, and the live dashboard page.

Nothing here runs on the hot path. The hub already counts everything in plain integers
(``Hub.stats()``); a custom collector turns those figures into metric families when
Prometheus scrapes, in a registry of the app's own (not prometheus_client's global one,
so two apps in one process do not collide).

Several gunicorn workers share the port, so a scrape lands on any one of them. Rather
than prometheus_client's multiprocess mode (a directory of mmap files, a file write per
increment), every sample carries a ``pid`` label and the scraped worker answers for all
of them from the Redis backplane's per-worker reports (each worker writes its own every
second). Its own figures come from there too, not live: a scrape answered live by worker
A and the next one answered from A's report by worker B could see A's counter go
backwards, which Prometheus takes for a restart (a spike in ``rate()``). One source per
series keeps every counter monotonic, at the price of figures up to a second old
(``greenchat_report_age_seconds``). Without Redis there is one worker, reported live.
"""

from __future__ import annotations

import html
import os
import time
from importlib import resources
from typing import Iterator

from flask import Flask, Response, current_app, request
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from .hub import Hub
from .views import admin_refusal, hub_of, state_of

__all__ = ["HubCollector", "register"]

# What generate_latest writes (the classic text format); spelled out because
# prometheus_client's CONTENT_TYPE_LATEST names a newer version since 0.22.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (metric name, key in Hub.stats(), help). Counters get "_total" from prometheus_client.
COUNTERS = (
    ("greenchat_handshakes", "handshakes", "Websocket upgrades completed."),
    ("greenchat_messages_received", "messages_received",
     "Messages clients sent to this worker."),
    ("greenchat_messages_published", "messages_published",
     "Messages this worker published (clients' and server code's)."),
    ("greenchat_deliveries", "deliveries", "Messages handed to a client's socket, one per receiver."),
    ("greenchat_delivered_bytes", "bytes_out", "Bytes of frames handed to clients' sockets."),
    ("greenchat_slow_consumers_closed", "slow_consumers_closed",
     "Clients closed because their backlog exceeded CHAT_MAX_BACKLOG."),
    ("greenchat_protocol_errors", "protocol_errors", "Clients closed for breaking RFC 6455."),
    ("greenchat_cpu_seconds", "cpu_s", "CPU time of the worker process."),
    ("greenchat_backplane_published", "backplane_published", "Messages sent to Redis."),
    ("greenchat_backplane_received", "backplane_received",
     "Messages from other workers received through Redis."),
    ("greenchat_backplane_dropped", "backplane_dropped",
     "Messages dropped while Redis was away too long."),
    ("greenchat_backplane_reconnects", "backplane_reconnects", "Losses of the Redis subscription."),
    ("greenchat_backplane_duplicates", "backplane_duplicates",
     "Copies of an already delivered message dropped (a batch Redis applied, sent again)."),
    ("greenchat_backplane_publish_failures", "backplane_publish_failures",
     "Round trips to Redis that failed and were tried again."),
    ("greenchat_internal_errors", "internal_errors",
     "Connections dropped for an unexpected error, each alone (see the log)."),
    ("greenchat_rate_limited", "rate_limited", "Messages over their client's rate limit."),
    ("greenchat_idle_dropped", "idle_dropped", "Clients dropped after a ping went unanswered."),
)
GAUGES = (
    ("greenchat_connections", "connections", "Open websocket clients."),
    ("greenchat_rooms", "rooms", "Rooms in use (the lobby counts from its first client on)."),
    ("greenchat_deflate_connections", "deflate_connections",
     "Open clients that agreed to permessage-deflate."),
    ("greenchat_resident_memory_bytes", "rss_bytes", "Resident set size of the worker process."),
    ("greenchat_idle_resident_memory_bytes", "idle_rss_bytes",
     "Resident set size when a client last joined the empty worker (0 before the first)."),
    ("greenchat_backplane_connected", "backplane_connected",
     "1 while the worker is subscribed to Redis."),
    ("greenchat_backplane_pending", "backplane_pending", "Messages waiting for Redis."),
    ("greenchat_backplane_pending_bytes", "backplane_pending_bytes",
     "Bytes of messages waiting for Redis (CHAT_REDIS_QUEUE_BYTES bounds them)."),
    ("greenchat_history_bytes", "history_bytes",
     "Bytes of room history this worker holds (CHAT_HISTORY_TOTAL_BYTES bounds them)."),
)


class HubCollector(Collector):
    """Reads ``Hub.stats()`` (and the other workers' reports) at scrape time."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def workers(self, now: float) -> list[dict]:
        """Every live worker's last report, as the backplane last read them (a scrape never
        waits on Redis); this worker's figures live if it has none (no Redis, a worker's
        first second, or Redis away for longer than a report stays fresh)."""
        reports = self.hub.backplane.worker_reports()
        if all(report["pid"] != os.getpid() for report in reports):
            reports = [{**self.hub.stats(), "reported": now}, *reports]
        workers, seen = [], set()
        for report in reports:
            # Two workers with one pid (on two hosts) would make duplicate series, which
            # Prometheus refuses: keep the first.
            if report["pid"] not in seen:
                seen.add(report["pid"])
                workers.append(report)
        return workers

    def collect(self) -> Iterator:
        now = time.time()
        workers = self.workers(now)
        for kind, table in ((GaugeMetricFamily, GAUGES), (CounterMetricFamily, COUNTERS)):
            for name, key, documentation in table:
                family = _family(kind, name, documentation, key, workers)
                if family.samples:  # the backplane figures exist only with Redis
                    yield family
        age = GaugeMetricFamily("greenchat_report_age_seconds",
                                "How old this pid's figures are (0: read live).",
                                labels=["pid"])
        refused = CounterMetricFamily("greenchat_refused", "Clients refused, by reason.",
                                      labels=["pid", "reason"])
        fanout = HistogramMetricFamily(
            "greenchat_fanout_seconds",
            "Time to hand one room's pending frames to every member's socket.",
            labels=["pid"])
        for worker in workers:
            pid = str(worker["pid"])
            age.add_metric([pid], max(0.0, now - worker["reported"]))  # hosts' clocks differ
            for reason, count in sorted(worker.get("refused", {}).items()):
                refused.add_metric([pid, reason], count)
            histogram = worker["fanout_seconds"]
            fanout.add_metric([pid], _cumulative_buckets(histogram["le"], histogram["counts"]),
                              histogram["sum"])
        yield from (age, refused, fanout)


def _family(kind, name: str, documentation: str, key: str, workers: list[dict]):
    """One metric family with a sample per worker that has ``key``."""
    family = kind(name, documentation, labels=["pid"])
    for worker in workers:
        if key in worker:
            family.add_metric([str(worker["pid"])], float(worker[key]))
    return family


def _cumulative_buckets(bounds: list[float], counts: list[int]) -> list[tuple[str, float]]:
    """Hub keeps a count per bucket; Prometheus wants, per bound, the count at or below it."""
    buckets, total = [], 0
    for bound, count in zip([*map(repr, bounds), "+Inf"], counts):
        total += count
        buckets.append((bound, total))
    return buckets


def metrics_view() -> Response:
    refusal = admin_refusal()
    if refusal is not None:
        return refusal
    hub_of(current_app).start()  # the backplane reports this worker from its first request on
    return Response(generate_latest(state_of(current_app).metrics), content_type=CONTENT_TYPE)


def dashboard_view() -> Response:
    """The static page, told where /metrics is (CHAT_METRICS_PATH) in its body's
    data-metrics (it reads every worker's figures there, as Prometheus would), and,
    behind CHAT_ADMIN_TOKEN, the token it was opened with (``?token=``), which its
    requests for the figures then carry in their Authorization header."""
    refusal = admin_refusal(page=True)
    if refusal is not None:
        return refusal
    page = resources.files("chat").joinpath("static/dashboard.html").read_text()
    metrics_path = html.escape(request.script_root + current_app.config["CHAT_METRICS_PATH"])
    token = html.escape(request.args.get("token", "")) if current_app.config["CHAT_ADMIN_TOKEN"] else ""
    page = page.replace('data-metrics="/metrics"',
                        f'data-metrics="{metrics_path}" data-token="{token}"', 1)
    return Response(page, mimetype="text/html")


def register(app: Flask) -> None:
    """Add ``/metrics`` and ``/dashboard`` (CHAT_METRICS_PATH, CHAT_DASHBOARD_PATH)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HubCollector(hub_of(app)))
    state_of(app).metrics = registry
    app.add_url_rule(app.config["CHAT_METRICS_PATH"], "chat.metrics", metrics_view)
    app.add_url_rule(app.config["CHAT_DASHBOARD_PATH"], "chat.dashboard", dashboard_view)
