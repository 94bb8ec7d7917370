"""Carrying messages between processes and hosts: Redis pub/sub (the in-memory default,
one process, is ``chat.hub.Backplane`` itself).

One process holds at most ~19,900 sockets on the machines this was built on (open files),
and one gevent worker uses one core, so a large chat is many processes. A message is
delivered to the local clients first (``Hub.publish``), then handed to the backplane,
which publishes it for the other processes; each process ignores its own echo.

Redis pub/sub is at-most-once: a message published while a process is disconnected from
Redis never reaches that process's clients. Local delivery never depends on Redis.

Wire format on the channel (``CHAT_REDIS_CHANNEL``, default ``greenchat``)::

    b"GC2" + message id (24 bytes: the publishing process's 16-byte origin + an 8-byte
          sequence number) + kind (b"t" text | b"b" binary) + len(room) (1 byte)
          + room (UTF-8) + payload

Anything else published on the channel is taken as a text message for the lobby from
outside the server, so ``redis-cli PUBLISH greenchat "hello"`` reaches every client.

History (``CHAT_HISTORY`` > 0): each room's last messages are also kept in a capped Redis
Stream, ``<channel>:history:<room>`` (the lobby is ``lobby``), written in the same
MULTI/EXEC as the PUBLISH, so the stream's order is the channel's order; every worker,
and a restarted server, reads the same history. Entries hold the envelope (field ``m``).
"""

from __future__ import annotations

import json
import logging
import os
import time
import gevent
from gevent.event import Event

from .hub import Backplane, Deliver, Report

__all__ = ["RedisBackplane", "encode_envelope", "decode_envelope", "create_backplane",
           "publish"]

log = logging.getLogger(__name__)

MAGIC = b"GC2"
ORIGIN_SIZE = 16
ID_SIZE = ORIGIN_SIZE + 8
_TEXT = b"t"
_BINARY = b"b"
# Messages waiting for Redis while it is slow or away; beyond this they are dropped
# (and counted): the backplane must never hold a worker's memory hostage.
MAX_PENDING = 10_000
# How many pending messages go to Redis in one pipeline round trip.
BATCH = 500


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


def history_key(channel: str, room: str) -> str:
    """The Redis Stream holding a room's history."""
    return f"{channel}:history:{room or 'lobby'}"


def _queue(pipe, channel: str, room: str, envelope: bytes, history: int) -> None:
    """Add one message to a Redis pipeline: to the room's stream when history is kept
    (``history`` > 0: its cap), then to the channel."""
    if history:
        pipe.xadd(history_key(channel, room), {"m": envelope}, maxlen=history,
                  approximate=True)
    pipe.publish(channel, envelope)


def publish(redis_url: str, message: str | bytes, room: str = "", *,
            channel: str = "greenchat", history: int = 0) -> None:
    """Publish to a room's clients from any process that can reach the servers' Redis.

    ``history``: the servers' ``CHAT_HISTORY``, so the message also enters the room's
    history (0: it does not).
    """
    import redis

    envelope = encode_envelope(os.urandom(ID_SIZE), room, message)
    with redis.Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=5) as client:
        pipe = client.pipeline(transaction=True)
        _queue(pipe, channel, room, envelope, history)
        pipe.execute()


class RedisBackplane(Backplane):
    """Redis pub/sub through redis-py; one listener and one publisher greenlet per process.

    Both reconnect on their own with a capped, growing delay (0.1 s doubling to 5 s) and
    log each loss and recovery once. Needs gevent's monkey-patching (``greenchat serve``
    and gunicorn's gevent workers do it) so redis-py's sockets yield to other greenlets.
    """

    name = "redis"
    MIN_DELAY = 0.1
    MAX_DELAY = 5.0

    def __init__(self, url: str, channel: str = "greenchat", history: int = 0) -> None:
        import redis  # imported here: the in-memory default needs no Redis client

        self._redis_module = redis
        self.url = url
        self.channel = channel
        self.history = history
        self.stores_history = history > 0
        self.origin = os.urandom(ORIGIN_SIZE)
        self._sequence = 0
        self._client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
        self._pending: list[tuple[str, bytes]] = []  # (room, envelope)
        self._wakeup = Event()
        self._greenlets: list[gevent.Greenlet] = []
        self._stopping = False
        self.connected = False
        self.published = 0
        self.received = 0
        self.dropped = 0
        self.reconnects = 0

    # -- lifecycle -------------------------------------------------------------------

    def start(self, deliver: Deliver, report: Report) -> None:
        self._greenlets = [gevent.spawn(self._listen, deliver), gevent.spawn(self._publish_loop),
                           gevent.spawn(self._report_loop, report)]

    def stop(self) -> None:
        self._stopping = True
        self._wakeup.set()
        gevent.killall(self._greenlets, timeout=2)
        self._client.close()

    def describe(self) -> str:
        return f"redis {self.url} channel {self.channel!r}"

    def stats(self) -> dict:
        return {"backplane": self.name, "backplane_connected": self.connected,
                "backplane_published": self.published, "backplane_received": self.received,
                "backplane_dropped": self.dropped, "backplane_reconnects": self.reconnects}

    # -- statistics of every worker -------------------------------------------------

    REPORT_INTERVAL = 1.0
    # A worker that has not reported for this long is gone (stopped or crashed). Generous:
    # a worker busy with a broadcast to 20,000 clients on a loaded machine reports late.
    REPORT_STALE = 15.0

    @property
    def _workers_key(self) -> str:
        return f"{self.channel}:workers"

    def _report_loop(self, report: Report) -> None:
        """Every second, put this worker's /stats in a Redis hash, so any worker can sum them."""
        field = self.origin.hex()
        while not self._stopping:
            try:
                self._client.hset(self._workers_key, field, json.dumps(
                    {**report(), "reported": time.time(), "worker": field}))
            except self._redis_module.RedisError:
                pass  # the listener logs the outage; the report resumes with Redis
            gevent.sleep(self.REPORT_INTERVAL)

    SUMMED = ("connections", "handshakes", "messages_received", "messages_published",
              "deliveries", "bytes_out", "slow_consumers_closed", "protocol_errors",
              "rss_bytes")

    # What each worker's entry of cluster_stats()["per_worker"] holds: the dashboard's lines,
    # and "reported", the worker's clock, to turn counter deltas into rates.
    PER_WORKER = ("pid", "reported", "connections", "rss_bytes", "messages_received",
                  "deliveries", "bytes_out")

    def worker_reports(self) -> list[dict]:
        """The fresh reports in the Redis hash, sorted by pid; stale ones are deleted.

        Raises ``redis.RedisError`` while Redis is away.
        """
        reports = self._client.hgetall(self._workers_key)
        now = time.time()
        workers, stale = [], []
        for field, raw in reports.items():
            report = json.loads(raw)
            if now - report["reported"] > self.REPORT_STALE:
                stale.append(field)
            else:
                workers.append(report)
        if stale:
            self._client.hdel(self._workers_key, *stale)
        return sorted(workers, key=lambda w: w["pid"])

    def presence(self, local: dict[str, int]) -> dict[str, int]:
        own = self.origin.hex()
        counts = dict(local)  # ours live, the others' from their last report
        try:
            reports = self.worker_reports()
        except self._redis_module.RedisError:
            return counts  # Redis away: this process's own counts are still true
        for report in reports:
            if report.get("worker") != own:
                for room, members in report.get("presence", {}).items():
                    counts[room] = counts.get(room, 0) + members
        return counts

    def cluster_stats(self) -> dict | None:
        try:
            workers = self.worker_reports()
        except self._redis_module.RedisError as error:
            return {"error": f"Redis unavailable: {error}"}
        totals = {name: sum(w.get(name, 0) for w in workers) for name in self.SUMMED}
        totals["workers"] = len(workers)
        totals["per_worker"] = [{name: w.get(name, 0) for name in self.PER_WORKER}
                                for w in workers]
        return totals

    # -- publishing ------------------------------------------------------------------

    def publish(self, message: str | bytes, room: str = "") -> bytes | None:
        self._sequence += 1
        msg_id = self.origin + self._sequence.to_bytes(8, "big")
        if len(self._pending) >= MAX_PENDING:
            self.dropped += 1
            return msg_id
        self._pending.append((room, encode_envelope(msg_id, room, message)))
        self._wakeup.set()
        return msg_id

    def load_history(self, room: str, count: int) -> list[tuple[bytes | None, str | bytes]]:
        entries = self._client.xrevrange(history_key(self.channel, room), count=count)
        stored = []
        for _, fields in reversed(entries):
            try:
                msg_id, _, message = decode_envelope(fields[b"m"])
            except (KeyError, UnicodeDecodeError, IndexError):
                continue  # not ours: skip it, as the listener does
            stored.append((msg_id, message))
        return stored

    def _publish_loop(self) -> None:
        """Send pending messages in order, a pipeline per batch; retry while Redis is away."""
        errors = _Backoff(self, "publishing")
        while not self._stopping:
            self._wakeup.wait()
            self._wakeup.clear()
            while self._pending and not self._stopping:
                batch = self._pending[:BATCH]
                try:
                    # With history, one MULTI/EXEC per batch: the streams' order is the
                    # channel's order even with several workers publishing at once.
                    pipe = self._client.pipeline(transaction=self.stores_history)
                    for room, envelope in batch:
                        _queue(pipe, self.channel, room, envelope, self.history)
                    pipe.execute()
                except self._redis_module.RedisError as error:
                    errors.failed(error)
                    continue
                errors.recovered()
                del self._pending[:len(batch)]
                self.published += len(batch)

    # -- listening -------------------------------------------------------------------

    def _listen(self, deliver: Deliver) -> None:
        backoff = _Backoff(self, "listening")
        while not self._stopping:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.channel)
                self.connected = True
                backoff.recovered()
                for message in pubsub.listen():
                    if message["type"] == "message":
                        self._deliver(deliver, message["data"])
            except self._redis_module.RedisError as error:
                self.connected = False
                backoff.failed(error)
            finally:
                pubsub.close()

    def _deliver(self, deliver: Deliver, data: bytes) -> None:
        try:
            msg_id, room, message = decode_envelope(data)
        except (UnicodeDecodeError, IndexError):
            log.warning("dropped a malformed message on Redis channel %r", self.channel)
            return
        if msg_id is not None and msg_id[:ORIGIN_SIZE] == self.origin:
            return  # our own message: already delivered locally
        self.received += 1
        deliver(message, room, msg_id)


class _Backoff:
    """A capped, growing delay between retries, logging the first failure and the recovery."""

    __slots__ = ("owner", "what", "delay", "failing")

    def __init__(self, owner: RedisBackplane, what: str) -> None:
        self.owner = owner
        self.what = what
        self.delay = owner.MIN_DELAY
        self.failing = False

    def failed(self, error: Exception) -> None:
        if not self.failing:
            log.warning("Redis backplane %s at %s failed (%s); retrying every %.1f-%.0f s",
                        self.what, self.owner.url, error, self.owner.MIN_DELAY,
                        self.owner.MAX_DELAY)
            self.failing = True
            if self.what == "listening":
                self.owner.reconnects += 1
        gevent.sleep(self.delay)
        self.delay = min(self.delay * 2, self.owner.MAX_DELAY)

    def recovered(self) -> None:
        if self.failing:
            log.warning("Redis backplane %s at %s recovered", self.what, self.owner.url)
        self.failing = False
        self.delay = self.owner.MIN_DELAY


def create_backplane(redis_url: str, channel: str = "greenchat", history: int = 0) -> Backplane:
    """The backplane the configuration asks for: Redis when a URL is given, else memory."""
    return RedisBackplane(redis_url, channel, history) if redis_url else Backplane()
