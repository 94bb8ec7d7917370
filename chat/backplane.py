"""Carrying messages between processes and hosts: Redis pub/sub (the in-memory default,
one process, is ``chat.hub.Backplane`` itself).

One process holds at most ~19,900 sockets on the machines this was built on (open files),
and one gevent worker uses one core, so a large chat is many processes. A message is
delivered to the local clients first (``Hub.publish``), then handed to the backplane,
which publishes it for the other processes; each process ignores its own echo.

A channel per room, subscribed while the process has a member there (the hub's
``watch``/``unwatch``): a process reads from Redis only the messages of its own rooms, so
with rooms spread over N processes each reads about 1/N of the traffic instead of all of
it (BENCHMARKS.md). A room's channel is ``<channel>:room:{#<room>}`` and its history
stream ``<channel>:history:{#<room>}`` (``room_channel``, ``history_key``): one hash tag,
so in a Redis Cluster both live on the room's shard. The base channel
(``CHAT_REDIS_CHANNEL``, default ``greenchat``) stays subscribed for publishers from
outside: anything on it that is not an envelope is text for the lobby, so ``redis-cli
PUBLISH greenchat "hello"`` reaches every lobby client, and an envelope on it goes to its
room. Servers of the version before this one published everything on the base channel:
these hear them, they do not hear these (upgrade every process at once).

On a Redis Cluster (``CHAT_REDIS_CLUSTER``) rooms' channels are sharded (SPUBLISH,
SSUBSCRIBE on a connection per master holding watched rooms: ``_Subscription`` per node,
placed by the slot of the channel), each room's stream on its room's shard; the base
channel is a plain SUBSCRIBE on the URL's node (a PUBLISH reaches every node).

Redis pub/sub is at-most-once: a message published while a process is disconnected from
Redis never reaches that process's clients. Local delivery never depends on Redis.

Wire format of a message (the envelope)::

    b"GC2" + message id (24 bytes: the publishing process's 16-byte origin + an 8-byte
          sequence number) + kind (b"t" text | b"b" binary) + len(room) (1 byte)
          + room (UTF-8) + payload

A server numbers its messages 1, 2, 3... and publishes them in that order, so a batch
it sends again because Redis answered too late (Redis may have applied it) is known to
every receiver for a copy and dropped (``CopyFilter``). Sequence 0 marks a one-off
(``publish`` from outside the servers), never taken for a copy.

History (``CHAT_HISTORY`` > 0): each room's last messages are also kept in a capped Redis
Stream, written in the same MULTI/EXEC as the PUBLISH, so the stream's order is the
channel's order; every worker, and a restarted server, reads the same history. Entries
hold the envelope (field ``m``). The same MULTI sets the stream to expire
``CHAT_HISTORY_TTL`` seconds after the room's last message, so rooms that go quiet leave
nothing behind in Redis. A history read waits until Redis has confirmed the room's
subscription (``_await_subscription``), so a joiner misses nothing between the two.

Failures: every wait on Redis is bounded by ``CHAT_REDIS_TIMEOUT`` (T). Commands time
out after T, and the report loop sends some every second; the listener pings after T
seconds of silence on its connection and gives the subscription up when the answer takes T
more (and at once after another loop found Redis lost). So a Redis that stops answering,
a host that vanishes or a NAT that forgets the flow is noticed within T + 1 s, 2 T at
most, logged once, shown as ``backplane_connected: false``, and retried with a growing
delay (0.1 s doubling to 5 s).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import time
from collections import OrderedDict
from typing import Any, Mapping
from urllib.parse import urlsplit, urlunsplit

import gevent
from gevent.event import Event
from gevent.lock import Semaphore

from .config import DEFAULTS
from .hub import Backplane, Deliver, Report

__all__ = ["RedisBackplane", "CopyFilter", "encode_envelope", "decode_envelope",
           "create_backplane", "publish", "history_key", "room_channel", "connection_options",
           "connect_redis"]

log = logging.getLogger(__name__)

MAGIC = b"GC2"
ORIGIN_SIZE = 16
ID_SIZE = ORIGIN_SIZE + 8
_TEXT = b"t"
_BINARY = b"b"
# Messages waiting for Redis while it is slow or away; beyond this (or beyond
# CHAT_REDIS_QUEUE_BYTES) they are dropped and counted: the backplane must never hold a
# worker's memory hostage.
MAX_PENDING = 10_000
# One pipeline round trip carries at most this many messages and (beyond its first
# message) this many bytes, so a batch goes through well within CHAT_REDIS_TIMEOUT even on
# a slow link (1 MiB takes ~0.1 s at 100 Mbit/s) instead of timing out again and again.
BATCH = 500
BATCH_BYTES = 1 << 20
# Origins (server processes) whose highest sequence a receiver remembers; the one heard
# least recently is forgotten first. A copy arrives within seconds of its original, so
# only thousands of processes publishing in between could make one slip through.
MAX_ORIGINS = 10_000
# What the listener's pings carry (Redis answers ["pong", PING] on a subscribed connection).
PING = b"greenchat-ping"


def encode_envelope(msg_id: bytes, room: str, message: str | bytes) -> bytes:
    room_bytes = room.encode()
    if len(room_bytes) > 255:
        raise ValueError("room name longer than 255 UTF-8 bytes")
    if isinstance(message, str):
        kind, payload = _TEXT, message.encode()
    else:
        kind, payload = _BINARY, message
    return MAGIC + msg_id + kind + bytes((len(room_bytes),)) + room_bytes + payload


def decode_envelope(data: bytes) -> tuple[bytes | None, str, str | bytes]:
    """(message id, room, message); a foreign (non-envelope) message is lobby text, id None."""
    head = len(MAGIC) + ID_SIZE
    if not data.startswith(MAGIC) or len(data) < head + 2:
        return None, "", data.decode()  # UnicodeDecodeError for garbage: the caller drops it
    msg_id = data[len(MAGIC):head]
    kind = data[head:head + 1]
    room_end = head + 2 + data[head + 1]
    room = data[head + 2:room_end].decode()
    payload = data[room_end:]
    return msg_id, room, payload.decode() if kind == _TEXT else payload


def _escape(name: str) -> str:
    """``name`` with ``%``, ``{`` and ``}`` percent-encoded: a key made of it has no hash
    tag of its own, and two names never become one key."""
    return name.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


def _room_tag(room: str) -> str:
    """The hash tag of a room's keys: ``{#<room>}``, so a room's channel and its history
    stream hash to the same Redis Cluster slot (only the part between the first ``{``
    and the next ``}`` is hashed). The ``#`` keeps the lobby's (``""``) tag non-empty
    (``{}`` is no tag); ``_escape`` keeps braces in a room name from ending it."""
    return "{#" + _escape(room) + "}"


def room_channel(channel: str, room: str) -> str:
    """The pub/sub channel of a room's messages: ``<channel>:room:{#<room>}``."""
    return f"{_escape(channel)}:room:{_room_tag(room)}"


def history_key(channel: str, room: str) -> str:
    """The Redis Stream holding a room's history: ``<channel>:history:{#<room>}``."""
    return f"{_escape(channel)}:history:{_room_tag(room)}"


def _queue(pipe, channel: str, batch: list[tuple[str, bytes]], history: int,
           history_ttl: int, sharded: bool = False) -> None:
    """Add messages ((room, envelope) each) to a Redis pipeline: to their room's stream
    when history is kept (``history`` > 0: its cap), then to the room's channel (with
    SPUBLISH when ``sharded``: Redis Cluster); then renew each stream's expiry, so a
    room's history lives ``history_ttl`` s past its last message."""
    rooms = set()
    publish = pipe.spublish if sharded else pipe.publish
    for room, envelope in batch:
        if history:
            pipe.xadd(history_key(channel, room), {"m": envelope}, maxlen=history,
                      approximate=True)
            rooms.add(room)
        publish(room_channel(channel, room), envelope)
    for room in rooms:
        pipe.expire(history_key(channel, room), history_ttl)


def _send(client, channel: str, batch: list[tuple[str, bytes]], history: int,
          history_ttl: int, cluster: bool) -> None:
    """Publish a batch in one round trip: one MULTI/EXEC with history, so each stream's
    order is its channel's order even with several processes publishing at once.

    On a Redis Cluster a transaction holds keys of one slot only, so with history each
    run of consecutive messages to one room is a MULTI/EXEC of its own, in the batch's
    order (a round trip each): every node then gets this process's messages in the order
    of their sequence numbers, which ``CopyFilter`` relies on. Without history, one
    pipeline, which redis-py splits by node, keeping the order within each.
    """
    if not (cluster and history):
        pipe = client.pipeline(transaction=bool(history))
        _queue(pipe, channel, batch, history, history_ttl, sharded=cluster)
        pipe.execute()
        return
    start = 0
    while start < len(batch):
        end = start + 1
        while end < len(batch) and batch[end][0] == batch[start][0]:
            end += 1
        pipe = client.pipeline(transaction=True)
        _queue(pipe, channel, batch[start:end], history, history_ttl, sharded=True)
        pipe.execute()
        start = end


def connect_redis(url: str, cluster: bool, **options: Any):
    """A redis-py client for ``url``: a ``RedisCluster`` when ``cluster`` (its
    constructor asks the cluster for its slots: call it where a wait is allowed)."""
    import redis
    if not cluster:
        return redis.Redis.from_url(url, **options)
    from redis.cluster import RedisCluster
    # RedisCluster takes its retry policy itself, not in the nodes' options.
    return RedisCluster.from_url(url, retry=options.pop("retry"), **options)


def connection_options(timeout: float) -> dict[str, Any]:
    """redis-py client options that bound every wait on Redis by ``timeout`` seconds.

    No retries inside redis-py (recent versions retry a timed-out command by default, 10
    times in 8.1, each waiting ``timeout`` again, and so re-send a MULTI/EXEC Redis may
    already have applied): the backplane's loops retry, count and log. TCP keepalive probes a
    connection idle for ``timeout`` every half of it, twice: the kernel drops a connection
    to a vanished host even when nothing is being sent, and NATs see the flow alive.
    """
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    keepalive = {"TCP_KEEPIDLE": math.ceil(timeout), "TCP_KEEPINTVL": math.ceil(timeout / 2),
                 "TCP_KEEPCNT": 2}
    return {"socket_connect_timeout": timeout, "socket_timeout": timeout,
            "socket_keepalive": True,
            "socket_keepalive_options": {getattr(socket, name): value
                                         for name, value in keepalive.items()
                                         if hasattr(socket, name)},
            "retry": Retry(NoBackoff(), 0)}


def publish(redis_url: str, message: str | bytes, room: str = "", *,
            channel: str = "greenchat", history: int = 0,
            history_ttl: int = DEFAULTS["CHAT_HISTORY_TTL"],
            timeout: float = DEFAULTS["CHAT_REDIS_TIMEOUT"], cluster: bool = False) -> None:
    """Publish to a room's clients from any process that can reach the servers' Redis.

    ``history``: the servers' ``CHAT_HISTORY``, so the message also enters the room's
    history (0: it does not); ``history_ttl``: their ``CHAT_HISTORY_TTL``. Sent once:
    on an error (``redis.RedisError``) Redis may or may not have taken it, and calling
    again may deliver it twice. ``cluster``: the servers' ``CHAT_REDIS_CLUSTER``.
    """
    envelope = encode_envelope(os.urandom(ORIGIN_SIZE) + bytes(8), room, message)
    client = connect_redis(redis_url, cluster, **connection_options(timeout))
    try:
        _send(client, channel, [(room, envelope)], history, history_ttl, cluster)
    finally:
        client.close()


class RedisBackplane(Backplane):
    """Redis pub/sub through redis-py: a listener, a publisher and a report greenlet per
    process, each bounded by ``timeout`` on every wait (see the module's docstring).

    What operators read (``/stats`` ``cluster``, ``/metrics``, presence) comes from the
    reports the report loop last read, never from a request to Redis, so it answers at
    once even while Redis does not; ``cluster`` says how old the reports are (``age_s``).
    Needs gevent's monkey-patching (``greenchat serve`` and gunicorn's gevent workers do
    it) so redis-py's sockets yield to other greenlets.
    """

    name = "redis"
    MIN_DELAY = 0.1
    MAX_DELAY = 5.0
    REPORT_INTERVAL = 1.0
    # A worker that has not reported for this long is gone (stopped or crashed). Generous:
    # a worker busy with a broadcast to 20,000 clients on a loaded machine reports late.
    REPORT_STALE = 15.0
    # /metrics shows each worker's figures as of this many seconds ago (worker_reports):
    # more than a resting worker's reads are apart (REPORT_READ_EVERY rounds).
    REPORT_LAG = 3.0
    # A worker keeps its last reports in this many fields of the hash, so one that reads
    # a little late (a busy loop) still sees each of them.
    REPORT_SLOTS = 2
    # Everyone's reports are read every round while this worker was asked for them (its
    # /stats, /metrics, /rooms, presence) in the last REPORT_WANTED seconds, and every
    # REPORT_READ_EVERY rounds otherwise (see _report_loop).
    REPORT_WANTED = 30.0
    REPORT_READ_EVERY = 2

    def __init__(self, url: str, channel: str = "greenchat", history: int = 0, *,
                 history_ttl: int = DEFAULTS["CHAT_HISTORY_TTL"],
                 queue_bytes: int = DEFAULTS["CHAT_REDIS_QUEUE_BYTES"],
                 timeout: float = DEFAULTS["CHAT_REDIS_TIMEOUT"],
                 cluster: bool = False) -> None:
        import redis  # imported here: the in-memory default needs no Redis client

        self.url = url
        self.channel = channel
        self.history = history
        self.stores_history = history > 0
        self.history_ttl = history_ttl
        self.queue_bytes = queue_bytes
        self.timeout = timeout
        self._redis = redis
        # Rooms spread over a Redis Cluster's shards (SPUBLISH, SSUBSCRIBE).
        self.cluster = cluster
        self._options = connection_options(timeout)
        # Commands (publishing, reports, history reads); a RedisCluster is made on first
        # use (``_commands``): its constructor talks to the cluster.
        self._client = None if cluster else self._new_client()
        # The base channel's subscription has a client of its own (on a cluster, to the
        # node the URL names: a PUBLISH reaches every node's subscribers); its liveness is
        # the listener's pings.
        self._subscriber = redis.Redis.from_url(url, **self._options)
        self.origin = os.urandom(ORIGIN_SIZE)  # drawn again in start(): after any fork
        self._sequence = 0
        self._pending: list[tuple[str, bytes]] = []  # (room, envelope), oldest first
        self._pending_bytes = 0
        self._wakeup = Event()
        self._greenlets: list[gevent.Greenlet] = []
        self._stopping = False
        self._link = _Link(self)
        self._base = channel.encode()  # foreign lobby text arrives here (redis-cli PUBLISH)
        self._subscription = _Subscription(self, self._subscriber, self._base)
        self._rooms: dict[bytes, str] = {}  # channel -> room, for the rooms watched
        # channel -> the subscription holding it: the base one, or on a cluster the one
        # to the node serving the channel's slot (``_shards``, by node name)
        self._routes: dict[bytes, _Subscription] = {}
        self._shards: dict[str, _Subscription] = {}
        self._unrouted: set[bytes] = set()  # watched before the cluster's slots were known
        self._reroute = Event()  # the router (cluster) has channels to place or re-check
        self._waiters: dict[bytes, Event] = {}  # channel -> set at its confirmation
        self._deliver_to: Deliver | None = None
        self._making_client = Semaphore()
        # Every worker's recent reports as the report loop read them, oldest first: what
        # /stats, /metrics and presence answer from, and when (time.monotonic()) they were
        # last read.
        self._versions: dict[str, list[_Report]] = {}
        self._reports_read: float | None = None
        self._reports_written = 0
        self._reports_wanted = -math.inf  # time.monotonic() of the last ask
        # Each field of the reports hash as last read: its raw value, and its report's
        # "reported" (None: not a report of ours), so an unchanged field is not decoded.
        self._report_fields: dict[bytes, tuple[bytes, float | None]] = {}
        self.published = 0
        self.received = 0
        self.dropped = 0
        self.reconnects = 0
        self.duplicates = 0
        self.publish_failures = 0

    # -- lifecycle -------------------------------------------------------------------

    def start(self, deliver: Deliver, report: Report) -> None:
        # Each serving process needs an origin of its own, or its peers would take its
        # messages for their own echo: an app may be created before gunicorn forks.
        self.origin = os.urandom(ORIGIN_SIZE)
        self._deliver_to = deliver
        self._greenlets = [gevent.spawn(self._subscription.run, deliver),
                           gevent.spawn(self._publish_loop),
                           gevent.spawn(self._report_loop, report)]
        if self.cluster:
            self._greenlets.append(gevent.spawn(self._route_loop))

    def stop(self) -> None:
        self._stopping = True
        self._wakeup.set()
        self._reroute.set()
        for subscription in self._all_subscriptions():
            subscription.wake()
        gevent.killall(self._greenlets, timeout=2)
        if self._client is not None:
            self._client.close()
        for subscription in self._all_subscriptions():
            subscription.client.close()

    def _new_client(self):
        # health_check_interval: a pooled connection idle for ``timeout`` is PINGed before
        # it carries a command, so a flow that died while idle fails on the PING, not in
        # the middle of a MULTI/EXEC.
        return connect_redis(self.url, self.cluster, health_check_interval=self.timeout,
                             **self._options)

    def _commands(self):
        """The client for commands; on a cluster made at first use (it asks the cluster
        for its slots, bounded by ``timeout`` per node): raises while none answers."""
        if self._client is None:
            with self._making_client:  # one, though several loops may ask at once
                if self._client is None:
                    self._client = self._new_client()
        return self._client

    def _all_subscriptions(self) -> list["_Subscription"]:
        return [self._subscription, *self._shards.values()]

    def _drop_connections(self) -> None:
        """Close the commands' pooled connections (they may hang on a Redis that is gone)."""
        client = self._client
        if client is None:
            return
        if self.cluster:
            client.disconnect_connection_pools()
        else:
            client.connection_pool.disconnect()

    def describe(self) -> str:
        kind = "redis cluster" if self.cluster else "redis"
        return f"{kind} {_without_password(self.url)} channel {self.channel!r}"

    @property
    def connected(self) -> bool:
        """Subscribed, and every loop's last exchange with Redis went through."""
        return self._link.up and not self._unrouted and all(
            subscription.up for subscription in self._all_subscriptions()
            if subscription.base is not None or subscription.wanted)

    def stats(self) -> dict:
        return {"backplane": self.name, "backplane_connected": self.connected,
                "backplane_published": self.published, "backplane_received": self.received,
                "backplane_dropped": self.dropped, "backplane_reconnects": self.reconnects,
                # copies of messages already delivered (a batch sent again), not delivered
                "backplane_duplicates": self.duplicates,
                # batches Redis failed or did not answer in time; each is sent again
                "backplane_publish_failures": self.publish_failures,
                "backplane_pending": len(self._pending),
                "backplane_pending_bytes": self._pending_bytes,
                # rooms whose channel this process is subscribed to (rooms with members here)
                "backplane_rooms": sum(channel in subscription.confirmed
                                       for channel, subscription in self._routes.items())}

    # -- statistics of every worker -------------------------------------------------

    @property
    def _workers_key(self) -> str:
        return f"{self.channel}:workers"

    def _report_loop(self, report: Report) -> None:
        """Every second, put this worker's /stats in a Redis hash; read everyone's too,
        so that any worker answers for all of them without asking Redis.

        Reading is the dear half, and it grows with the square of the workers: each
        reads every worker's reports. At a million clients on 63 workers, reading and
        decoding all of them every second was ~35% of a worker's py-spy samples while
        clients connected, doing nothing for the clients (63 idle workers: 0.40 of a
        core, 0.23 after this; bench/idle_workers.py). So a worker takes in only the
        fields written since its last read, decodes a report only when its figures are
        asked for (``_Report``: 0.14 of a core then), and reads every round only while
        somebody asked it for the figures in the last ``REPORT_WANTED`` seconds
        (``_want_reports``), every ``REPORT_READ_EVERY`` rounds otherwise: still within
        ``REPORT_LAG``, so /metrics stays consistent whichever worker answers.
        """
        rounds = 0
        while not self._stopping:
            wanted = time.monotonic() - self._reports_wanted <= self.REPORT_WANTED
            try:
                self._exchange_reports(report(), wanted or rounds % self.REPORT_READ_EVERY == 0)
            except Exception as error:  # a lost round, logged once
                self._link.failed("reports", error)
            else:
                self._link.ok("reports")
            rounds += 1
            gevent.sleep(self.REPORT_INTERVAL)

    def _want_reports(self) -> None:
        """Somebody needs everyone's figures: read them every round for a while."""
        self._reports_wanted = time.monotonic()

    def _exchange_reports(self, mine: dict, read: bool = True) -> None:
        worker = self.origin.hex()
        self._reports_written += 1
        field = f"{worker}:{self._reports_written % self.REPORT_SLOTS}"
        pipe = self._commands().pipeline(transaction=False)
        # "reported" and "worker" first: a reader takes them from the head (_report_head)
        # and decodes the rest only when the figures are asked for.
        pipe.hset(self._workers_key, field,
                  json.dumps({"reported": time.time(), "worker": worker, **mine}))
        if not read:
            pipe.execute()
            return
        pipe.hgetall(self._workers_key)
        _, entries = pipe.execute()
        now = time.time()
        stale = []
        known, self._report_fields = self._report_fields, {}
        for name, raw in entries.items():
            seen = known.get(name)
            if seen is not None and seen[0] == raw:
                reported = seen[1]  # read before: its version is in _versions already
                version = None
            else:
                version = _report_head(raw)
                reported = None if version is None else version.reported
            if reported is None or now - reported > self.REPORT_STALE:
                stale.append(name)  # gone, or not a report of ours: removed too
                continue
            self._report_fields[name] = (raw, reported)
            if version is not None:
                versions = self._versions.setdefault(version.worker, [])
                if all(v.reported != reported for v in versions):
                    versions.append(version)
                    versions.sort(key=lambda v: v.reported)
        if stale:
            self._commands().hdel(self._workers_key, *stale)
        for worker, versions in list(self._versions.items()):
            if now - versions[-1].reported > self.REPORT_STALE:
                del self._versions[worker]  # gone: stopped or crashed
                continue
            # Older than what worker_reports() chooses now, a version is never needed again.
            needed = [v for v in versions if v.reported <= now - self.REPORT_LAG]
            if needed:
                del versions[:versions.index(needed[-1])]
        self._reports_read = time.monotonic()

    SUMMED = ("connections", "handshakes", "messages_received", "messages_published",
              "deliveries", "bytes_out", "slow_consumers_closed", "protocol_errors",
              "rss_bytes")

    # What each worker's entry of cluster_stats()["per_worker"] holds: the dashboard's lines,
    # and "reported", the worker's clock, to turn counter deltas into rates.
    PER_WORKER = ("pid", "reported", "connections", "rss_bytes", "messages_received",
                  "deliveries", "bytes_out")

    def _newest_reports(self) -> list[dict]:
        """Each live worker's newest report the report loop read, sorted by pid."""
        self._want_reports()
        now = time.time()
        newest = (versions[-1].decoded() for versions in self._versions.values()
                  if now - versions[-1].reported <= self.REPORT_STALE)
        return sorted((report for report in newest if report is not None),
                      key=lambda w: w["pid"])

    def worker_reports(self) -> list[dict]:
        """For /metrics: each live worker's newest report written ``REPORT_LAG`` seconds
        ago or earlier (its first one in its first seconds), sorted by pid. Never waits.

        Workers read the reports at different moments, so their newest ones differ; a
        scrape answered by one, then one answered by another, could see a counter go back
        (Prometheus takes that for a restart). Chosen by the time they were written, the
        reports are the same whichever worker answers, provided it read within the lag.
        """
        self._want_reports()
        now = time.time()
        chosen = []
        for versions in self._versions.values():
            if now - versions[-1].reported > self.REPORT_STALE:
                continue
            old_enough = [v for v in versions if v.reported <= now - self.REPORT_LAG]
            report = (old_enough[-1] if old_enough else versions[0]).decoded()
            if report is not None:
                chosen.append(report)
        return sorted(chosen, key=lambda w: w["pid"])

    def presence(self, local: dict[str, int]) -> dict[str, int]:
        own = self.origin.hex()
        counts = dict(local)  # ours live, the others' from their last report
        for report in self._newest_reports():
            if report["worker"] != own:
                for room, members in report.get("presence", {}).items():
                    counts[room] = counts.get(room, 0) + members
        return counts

    def cluster_stats(self) -> dict | None:
        workers = self._newest_reports()
        totals: dict[str, Any] = {name: sum(w.get(name, 0) for w in workers)
                                  for name in self.SUMMED}
        totals["workers"] = len(workers)
        totals["per_worker"] = [{name: w.get(name, 0) for name in self.PER_WORKER}
                                for w in workers]
        # Seconds since the reports were read (None: not yet); an error while Redis is away.
        read = self._reports_read
        totals["age_s"] = None if read is None else round(time.monotonic() - read, 3)
        if not self._link.up:
            totals["error"] = f"Redis unavailable: {self._link.reason}"
        return totals

    # -- publishing ------------------------------------------------------------------

    def publish(self, message: str | bytes, room: str = "") -> bytes | None:
        self._sequence += 1
        msg_id = self.origin + self._sequence.to_bytes(8, "big")
        envelope = encode_envelope(msg_id, room, message)
        if (len(self._pending) >= MAX_PENDING
                or self._pending_bytes + len(envelope) > self.queue_bytes):
            self.dropped += 1
            return msg_id
        self._pending.append((room, envelope))
        self._pending_bytes += len(envelope)
        self._wakeup.set()
        return msg_id

    def load_history(self, room: str, count: int) -> list[tuple[bytes | None, str | bytes]]:
        self._await_subscription(room)
        entries = self._commands().xrevrange(history_key(self.channel, room), count=count)
        stored, ids = [], set()
        for _, fields in reversed(entries):
            try:
                msg_id, _, message = decode_envelope(fields[b"m"])
            except (KeyError, UnicodeDecodeError, IndexError):
                continue  # not ours: skip it, as the listener does
            if msg_id is not None:
                if msg_id in ids:
                    continue  # a batch written twice (sent again after a timeout)
                ids.add(msg_id)
            stored.append((msg_id, message))
        return stored

    def _next_batch(self) -> tuple[list[tuple[str, bytes]], int]:
        """The oldest pending messages that make one round trip, and their bytes."""
        size = count = 0
        for _, envelope in self._pending[:BATCH]:
            if count and size + len(envelope) > BATCH_BYTES:
                break
            size += len(envelope)
            count += 1
        return self._pending[:count], size

    def _publish_loop(self) -> None:
        """Send pending messages in order, a pipeline per batch; retry while Redis is away.

        A batch whose answer does not come is sent again: Redis may have applied it, and
        then receivers drop the copies by their ids (and history reads skip them).
        """
        backoff = _Backoff(self)
        while not self._stopping:
            self._wakeup.wait()
            self._wakeup.clear()
            while self._pending and not self._stopping:
                batch, size = self._next_batch()
                try:
                    _send(self._commands(), self.channel, batch, self.history,
                          self.history_ttl, self.cluster)
                except Exception as error:  # the batch stays: logged once, sent again
                    self.publish_failures += 1
                    self._link.failed("publisher", error)
                    backoff.wait()
                    continue
                self._link.ok("publisher")
                backoff.reset()
                del self._pending[:len(batch)]
                self._pending_bytes -= size
                self.published += len(batch)

    # -- listening -------------------------------------------------------------------

    def watch(self, room: str) -> None:
        channel = room_channel(self.channel, room).encode()
        self._rooms[channel] = room
        self._route(channel)

    def unwatch(self, room: str) -> None:
        channel = room_channel(self.channel, room).encode()
        self._rooms.pop(channel, None)
        self._unrouted.discard(channel)
        subscription = self._routes.pop(channel, None)
        if subscription is not None:
            subscription.drop(channel)

    def _route(self, channel: bytes) -> None:
        """Hand a watched channel to the subscription that must hold it (never waits:
        ``watch`` runs in the hub's callbacks)."""
        subscription = self._shard_of(channel) if self.cluster else self._subscription
        if subscription is None:  # the cluster's slots are not known yet: the router will
            self._unrouted.add(channel)
            self._reroute.set()
            return
        held = self._routes.get(channel)
        if held is not subscription:
            if held is not None:
                held.drop(channel)  # its slot moved to another node
            self._routes[channel] = subscription
        subscription.want(channel)

    def _shard_of(self, channel: bytes) -> "_Subscription | None":
        """The subscription to the node serving ``channel``'s slot, as the commands'
        client last learned the slots; None before it did."""
        client = self._client
        if client is None:
            return None
        # The slot map read without redis-py's lock (get_node_from_slot takes it): the
        # hub's callbacks must never wait for the router, which may hold it while asking
        # the cluster for its slots.
        nodes = client.nodes_manager.slots_cache.get(self._redis.crc.key_slot(channel))
        if not nodes:  # a slot no node serves (the cluster is changing): the router retries
            return None
        node = nodes[0]  # the primary
        subscription = self._shards.get(node.name)
        if subscription is None:
            node_client = self._redis.Redis(host=node.host, port=node.port, **self._options)
            subscription = self._shards[node.name] = _Subscription(
                self, node_client, None, sharded=True, loop=f"shard {node.name}")
            self._greenlets.append(gevent.spawn(subscription.run, self._deliver_to))
        return subscription

    def _route_loop(self) -> None:
        """On a cluster: learn the slots (the commands' client), place the channels
        watched before that, and after a shard's subscription failed, ask the cluster for
        its slots again and move the channels whose slot another node serves now."""
        backoff = _Backoff(self)
        while not self._stopping:
            self._reroute.wait()
            self._reroute.clear()
            try:
                client = self._commands()
                if any(not subscription.up and subscription.wanted
                       for subscription in self._shards.values()):
                    client.nodes_manager.initialize()
            except Exception as error:  # no node answers: tried again after a delay
                self._link.failed("router", error)
                backoff.wait()
                self._reroute.set()
                continue
            self._link.ok("router")
            for channel in [*self._unrouted, *self._routes]:
                self._unrouted.discard(channel)
                self._route(channel)
            if self._unrouted:
                backoff.wait()  # slots no node serves: ask again later
            else:
                backoff.reset()

    def _await_subscription(self, room: str) -> None:
        """Return once Redis has confirmed the subscription of ``room``'s channel (the hub
        watched the room before asking for its history); raise after ``timeout``.

        This makes the history seam exact: a message published after the confirmation
        reaches this process live, one published before it is in the stream read next
        (the same MULTI/EXEC wrote both), so a joiner misses nothing in between.
        """
        channel = room_channel(self.channel, room).encode()
        deadline = time.monotonic() + self.timeout
        while True:
            subscription = self._routes.get(channel)
            if subscription is not None and channel in subscription.confirmed:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopping:
                raise self._redis.TimeoutError(f"the subscription of room {room!r} was not "
                                               f"confirmed within {self.timeout:g} s")
            self._waiters.setdefault(channel, Event()).wait(remaining)

    def _confirmed(self, channel: bytes) -> None:
        waiter = self._waiters.pop(channel, None)
        if waiter is not None:
            waiter.set()

    def _deliver(self, deliver: Deliver, data: bytes, channel: bytes,
                 copies: "CopyFilter") -> None:
        try:
            msg_id, room, message = decode_envelope(data)
        except (UnicodeDecodeError, IndexError):
            log.warning("dropped a malformed message on Redis channel %r", channel)
            return
        if msg_id is None and channel != self._base:
            # Foreign text published on a room's channel is for that room.
            room = self._rooms.get(channel)
            if room is None:
                return  # a room unwatched meanwhile: nobody here is in it
        if msg_id is not None:
            if msg_id.startswith(self.origin):
                return  # our own message: already delivered locally
            if copies.seen(msg_id):
                self.duplicates += 1
                return
        self.received += 1
        deliver(message, room, msg_id)


# The head of a report as _exchange_reports writes it: its time and its worker.
_REPORT_HEAD = re.compile(rb'\{"reported": ([0-9.eE+-]+), "worker": "([0-9a-f]+)", ')


class _Report:
    """One worker's report as read from Redis: when it was written, by which worker, and
    its JSON, decoded the first time somebody needs the figures.

    Every worker reads every worker's report every second or two, and nobody may ask
    for the figures in between. Decoded at once, they were most of what 63 idle workers
    cost: 0.26 of a core, 0.14 decoded on demand, 0.08 with no reading at all
    (bench/idle_workers.py 63, median of 3).
    """

    __slots__ = ("reported", "worker", "raw", "_report")

    def __init__(self, reported: float, worker: str, raw: bytes,
                 report: dict | None = None) -> None:
        self.reported = reported
        self.worker = worker
        self.raw = raw
        self._report = report

    def decoded(self) -> dict | None:
        """The report; None when its body is not one of ours (it is then left out)."""
        if self._report is None:
            self._report = _decode_report(self.raw) or {}
        return self._report or None


def _decode_report(raw: bytes) -> dict | None:
    """A whole report, checked; None when it is not one of ours."""
    try:
        report = json.loads(raw)
        reported = report["reported"]
        if (isinstance(report.get("pid"), int) and isinstance(report.get("worker"), str)
                and isinstance(reported, (int, float))):
            return report
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def _report_head(raw: bytes) -> _Report | None:
    """A report read from Redis, its body not decoded yet when its head is ours (any
    other form is decoded whole: written by another version); None if not a report."""
    head = _REPORT_HEAD.match(raw)
    if head is not None:
        try:
            return _Report(float(head[1]), head[2].decode(), raw)
        except ValueError:
            pass
    report = _decode_report(raw)
    if report is None:
        return None
    return _Report(report["reported"], report["worker"], raw, report)


def _by_slot(channels: list[bytes]) -> list[list[bytes]]:
    """``channels`` grouped by Redis Cluster hash slot."""
    from redis.crc import key_slot
    groups: dict[int, list[bytes]] = {}
    for channel in channels:
        groups.setdefault(key_slot(channel), []).append(channel)
    return list(groups.values())


class _Subscription:
    """One subscribed connection to Redis, read by one greenlet (``run``), and the
    channels it should hold: the base channel (when given) and the rooms' channels.

    redis-py's ``PubSub`` must not be used by two greenlets at once: ``subscribe()`` from
    the hub (``watch`` runs in its callbacks) while the listener reads the same
    connection would share its socket and parser, and on an error redis-py reconnects
    the connection under the reader (``PubSub._execute``). So ``want`` and ``drop`` only
    record the wish and wake the greenlet, which sends the (UN)SUBSCRIBE itself before it
    reads again: one loop iteration, then a round trip for Redis's confirmation.

    The greenlet never blocks inside redis-py with nothing to read (such a read cannot
    be cut short by a wake-up): it waits for its socket to be readable, a wake-up, or its
    next ping's time, and reads only when bytes are there (a message's rest may take up
    to ``timeout``; redis-py rewinds its parser on a partial one).
    """

    __slots__ = ("owner", "client", "base", "sharded", "loop", "wanted", "up", "_asked",
                 "_due", "confirmed", "copies", "_changed", "_wake")

    def __init__(self, owner: RedisBackplane, client, base: bytes | None,
                 sharded: bool = False, loop: str = "subscriber") -> None:
        self.owner = owner
        self.client = client  # a redis.Redis for the one server this connection goes to
        self.base = base  # subscribed with SUBSCRIBE while running, whatever is wanted
        self.sharded = sharded  # room channels with SSUBSCRIBE (Redis Cluster)
        # its name for _Link: a shard's subscription fails and recovers on its own
        self.loop = loop
        self.wanted: set[bytes] = set()  # room channels the hub watches
        # True once the current connection's first subscription was confirmed
        self.up = False
        self._asked: set[bytes] = set()  # subscribed on this connection, not unsubscribed since
        self._due: dict[bytes, int] = {}  # channel -> (un)subscribe replies not read yet
        # In effect: asked, and every reply read. SUBSCRIBE, UNSUBSCRIBE, SUBSCRIBE of one
        # channel in quick succession (a room emptied and joined again) gets three replies;
        # only after the third is the channel confirmed again.
        self.confirmed: set[bytes] = set()
        # Copies are known per connection: one origin's messages reach it in the order
        # they were published (on a cluster, messages to rooms on different shards do not
        # reach one process in one order).
        self.copies = CopyFilter()
        # wanted changed since the last _apply: only then is it compared with _asked (a
        # wake-up for every message must not cost a pass over thousands of rooms)
        self._changed = True
        self._wake = Event()

    def want(self, channel: bytes) -> None:
        self.wanted.add(channel)
        self._changed = True
        self._wake.set()

    def drop(self, channel: bytes) -> None:
        self.wanted.discard(channel)
        self._changed = True
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def run(self, deliver: Deliver) -> None:
        owner = self.owner
        backoff = _Backoff(owner)
        while not owner._stopping:
            if self.base is None and not self.wanted:
                # Nothing to hold: no connection until a room is wanted, and nothing to
                # wait for if it failed meanwhile.
                owner._link.ok(self.loop)
                self._wake.clear()
                self._wake.wait()
                continue
            pubsub = self.client.pubsub()
            try:
                self._receive(pubsub, deliver, backoff)
            except Exception as error:  # the subscription is lost, whatever broke
                if self.up:
                    owner.reconnects += 1
                self._reset()
                owner._link.failed(self.loop, error)
                if self.sharded:
                    owner._reroute.set()  # did its slots move to another node?
                backoff.wait()
            else:
                self._reset()
            finally:
                pubsub.close()

    def _reset(self) -> None:
        """The connection is gone: every channel is to be subscribed anew on the next."""
        self.up = False
        self._changed = True
        self._asked.clear()
        self._due.clear()
        self.confirmed.clear()

    def _apply(self, pubsub) -> None:
        """Send the (UN)SUBSCRIBEs that bring the connection to what is wanted."""
        if not self._changed:
            return
        self._changed = False
        if self.base is not None and self.base not in self._asked:
            self._sent(self.base, True)
            pubsub.subscribe(self.base)
        new = [channel for channel in self.wanted if channel not in self._asked]
        old = [channel for channel in self._asked if channel not in self.wanted
               and channel != self.base]
        for channel in new:
            self._sent(channel, True)
        for channel in old:
            self._sent(channel, False)
        if not self.sharded:
            if new:
                pubsub.subscribe(*new)
            if old:
                pubsub.unsubscribe(*old)
            return
        # One SSUBSCRIBE holds channels of one slot only (else CROSSSLOT).
        for channels in _by_slot(new):
            pubsub.ssubscribe(*channels)
        for channels in _by_slot(old):
            pubsub.sunsubscribe(*channels)

    def _sent(self, channel: bytes, subscribe: bool) -> None:
        self._due[channel] = self._due.get(channel, 0) + 1
        self.confirmed.discard(channel)
        if subscribe:
            self._asked.add(channel)
        else:
            self._asked.discard(channel)

    def _replied(self, channel: bytes, proven: float, backoff: "_Backoff") -> None:
        """Redis answered one (UN)SUBSCRIBE of ``channel``."""
        due = self._due.get(channel, 0)
        if not due:  # Redis dropped it unasked (a cluster slot moved): start anew
            raise self.owner._redis.ConnectionError(
                f"Redis ended the subscription of {channel!r}")
        if due > 1:
            self._due[channel] = due - 1
            return
        del self._due[channel]
        if channel in self._asked:
            self.confirmed.add(channel)
            self.owner._confirmed(channel)
            if not self.up:
                self.up = True
                self.owner._link.ok(self.loop, since=proven)
                backoff.reset()

    def _receive(self, pubsub, deliver: Deliver, backoff: "_Backoff") -> None:
        """Keep the subscription what is wanted and deliver what it brings, until nothing
        is wanted (a shard's connection without rooms is closed); check the connection
        with a ping after ``timeout`` seconds of silence, or at once when another loop
        found Redis lost; raise when the answer does not come within ``timeout``.

        redis-py's own ``health_check_interval`` sends pings on a subscribed connection
        but never notices a missing answer, so the listener sends its own
        (``PubSub.ping``).
        """
        owner = self.owner
        timeout = owner.timeout
        heard = time.monotonic()  # when Redis last sent anything on this connection
        proven = heard  # when the last request Redis answered was sent
        ping_sent: float | None = None  # when the ping not answered yet was sent
        readable = None  # a read watcher on the connection's socket, made once connected
        try:
            while not owner._stopping:
                self._wake.clear()
                if self.base is None and not self.wanted:
                    return
                self._apply(pubsub)
                connection = pubsub.connection
                if readable is None:
                    # redis-py offers no way to wait for its socket and something else at
                    # once: a libev watcher on it wakes this greenlet like a want() does.
                    readable = gevent.get_hub().loop.io(connection._sock.fileno(), 1)
                read = 0
                while read < BATCH and connection.can_read(timeout=0):
                    message = pubsub.get_message(timeout=timeout)
                    read += 1
                    heard = time.monotonic()
                    if message is None:
                        continue
                    kind = message["type"]
                    if kind in ("message", "smessage"):
                        owner._deliver(deliver, message["data"], message["channel"],
                                       self.copies)
                    elif kind == "pong":
                        if ping_sent is not None:
                            proven, ping_sent = ping_sent, None
                            owner._link.ok(self.loop, since=proven)
                    elif kind in ("subscribe", "ssubscribe", "unsubscribe", "sunsubscribe"):
                        self._replied(message["channel"], proven, backoff)
                if read == BATCH:
                    gevent.sleep(0)  # a flood: let the flush and the others run
                    continue
                now = time.monotonic()
                if ping_sent is None:
                    if now - heard >= timeout or owner._link.doubts(proven):
                        pubsub.ping(PING)
                        ping_sent = now
                elif now - ping_sent >= timeout:
                    raise owner._redis.TimeoutError(
                        f"no answer to a ping within {timeout:g} s")
                next_check = heard if ping_sent is None else ping_sent
                readable.start(self._wake.set)
                try:
                    self._wake.wait(max(0.0, next_check + timeout - time.monotonic()))
                finally:
                    readable.stop()
        finally:
            if readable is not None:
                readable.close()


class CopyFilter:
    """Which message ids were delivered already, exactly, in one integer per origin.

    Each server publishes its messages in sequence order, a batch after the previous one
    was answered, so once sequence n of an origin was delivered, any id of that origin at
    or below n is a copy (a batch sent again after a late answer) and any above is new,
    gaps included (messages lost while a subscription was down). A one-off id (sequence 0) is never a copy. The
    origin heard least recently is forgotten beyond ``max_origins``.
    """

    __slots__ = ("max_origins", "highest")

    def __init__(self, max_origins: int = MAX_ORIGINS) -> None:
        self.max_origins = max_origins
        self.highest: OrderedDict[bytes, int] = OrderedDict()  # origin -> highest sequence

    def seen(self, msg_id: bytes) -> bool:
        """True for a copy of a message already delivered; else remembers ``msg_id``."""
        origin = msg_id[:ORIGIN_SIZE]
        sequence = int.from_bytes(msg_id[ORIGIN_SIZE:], "big")
        if sequence == 0:
            return False
        if sequence <= self.highest.get(origin, 0):
            return True
        self.highest[origin] = sequence
        self.highest.move_to_end(origin)
        if len(self.highest) > self.max_origins:
            self.highest.popitem(last=False)
        return False


class _Backoff:
    """A capped, growing delay between one loop's retries (0.1 s doubling to 5 s)."""

    __slots__ = ("owner", "delay")

    def __init__(self, owner: RedisBackplane) -> None:
        self.owner = owner
        self.delay = owner.MIN_DELAY

    def wait(self) -> None:
        gevent.sleep(self.delay)
        self.delay = min(self.delay * 2, self.owner.MAX_DELAY)

    def reset(self) -> None:
        self.delay = self.owner.MIN_DELAY


# What each loop of the backplane does, for the log line of a loss.
LOOPS = {"subscriber": "the subscription", "router": "the cluster's slots",
         "publisher": "publishing",
         "reports": "the worker reports"}


class _Link:
    """Whether Redis answers the backplane, as its three loops (subscriber, publisher,
    reports) see it: lost at the first failure of any, back when every failing one has
    succeeded again. One log line for each loss and each recovery, never one per retry."""

    __slots__ = ("owner", "failing", "reason", "lost_at", "dropped_then")

    def __init__(self, owner: RedisBackplane) -> None:
        self.owner = owner
        self.failing: set[str] = set()
        self.reason = ""
        self.lost_at = 0.0
        self.dropped_then = 0

    @property
    def up(self) -> bool:
        return not self.failing

    def doubts(self, proven: float) -> bool:
        """True when Redis was found lost after ``proven`` (when a connection last got
        an answer): that connection must answer again before it counts as working."""
        return not self.up and self.lost_at > proven

    def failed(self, loop: str, error: Exception) -> None:
        if self.failing:
            self.failing.add(loop)
            return
        owner = self.owner
        # Whatever loop noticed it, the subscription is in doubt until it answers again
        # (or is made anew), and pooled connections may be hung on a Redis that is gone.
        self.failing.update((loop, "subscriber"))
        owner._drop_connections()
        for subscription in owner._all_subscriptions():
            subscription.wake()  # to ping at once
        what = LOOPS.get(loop, f"the subscription to {loop}")
        self.reason = f"{what}: {type(error).__name__}: {error}"
        self.lost_at = time.monotonic()
        self.dropped_then = owner.dropped
        log.warning(
            "Redis backplane lost at %s (%s); until it is back, other processes' messages "
            "do not reach this one and this one's wait (beyond %d messages or %d bytes "
            "they are dropped); retrying every %.1f-%.0f s",
            _without_password(owner.url), self.reason, MAX_PENDING, owner.queue_bytes,
            owner.MIN_DELAY, owner.MAX_DELAY,
            # not Redis failing but our own code: worth its traceback
            exc_info=None if isinstance(error, owner._redis.RedisError) else error)

    def ok(self, loop: str, since: float | None = None) -> None:
        """``loop`` exchanged with Redis; ``since``: what it sent then went out at this
        time.monotonic() (a proof only if after the loss began)."""
        if loop not in self.failing or since is not None and since < self.lost_at:
            return
        self.failing.discard(loop)
        if not self.failing:
            owner = self.owner
            log.warning("Redis backplane recovered after %.1f s at %s (%d messages dropped "
                        "meanwhile, %d waiting)", time.monotonic() - self.lost_at,
                        _without_password(owner.url), owner.dropped - self.dropped_then,
                        len(owner._pending))


def _without_password(url: str) -> str:
    """``url`` fit for a log line: a password in it becomes ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def create_backplane(config: Mapping[str, Any]) -> Backplane:
    """The backplane the settings (``CHAT_*``, see chat/config.py) ask for: Redis when
    ``CHAT_REDIS_URL`` is set, else the in-memory one."""
    if not config["CHAT_REDIS_URL"]:
        return Backplane()
    return RedisBackplane(config["CHAT_REDIS_URL"], config["CHAT_REDIS_CHANNEL"],
                          config["CHAT_HISTORY"], history_ttl=config["CHAT_HISTORY_TTL"],
                          queue_bytes=config["CHAT_REDIS_QUEUE_BYTES"],
                          timeout=float(config["CHAT_REDIS_TIMEOUT"]),
                          cluster=config["CHAT_REDIS_CLUSTER"])
