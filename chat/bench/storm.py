"""A reconnect storm: every client dropped at once by a server restart, and back again.

The expensive moment of a server holding many idle clients is not the idle crowd but its
return: a restart drops them all, and they all come back within seconds, each through a
full handshake (docs/design.md, "The handshake is the CPU bill"). ``greenchat bench
--storm`` measures it: with the clients connected, it arms every load process to
reconnect the way the web page does (``chat/static/index.html``: exponential backoff
from 0.5 s to 30 s with "equal jitter", ``loadclient.reconnect_delay``), restarts a
gunicorn server, and follows the connections until all are back (or
``--storm-timeout``). The restart is one of:

- ``hup``: SIGHUP to the gunicorn master, its graceful reload: new workers start, the
  old ones stop accepting and close their clients with 1001 (``chat/worker.py``);
- ``kill``: SIGKILL to every worker of the master (a crash): the clients see their
  connections reset or closed and, until the master has forked new workers, nobody
  listening (with one SO_REUSEPORT socket per worker).

Reported: when 50%, 99% and 100% of the clients were connected again (seconds after the
signal), the drops, the reconnection attempts, refusals (connection refused, an HTTP
answer other than 101) and errors (timeouts, resets) with their reasons, and whether one
broadcast afterwards reached every client. ``--plot`` draws the connections over time.
"""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..system import PROC
from .errors import BenchError
from .histogram import LogHistogram

if TYPE_CHECKING:
    from .runner import Run

__all__ = ["TRIGGERS", "workers_of", "restart", "storm_phase", "time_to", "is_refusal"]

TRIGGERS = ("hup", "kill")
POLL_INTERVAL = 0.25
SETTLED_FOR = 1.0  # seconds everyone must stay connected before the storm counts as over
NO_DROP_WAIT = 30.0  # seconds to wait for a first drop before calling the restart a dud


def workers_of(master_pid: int, root: Path = PROC) -> list[int]:
    """The children of ``master_pid`` (a gunicorn master's workers)."""
    children: list[int] = []
    for task in (root / str(master_pid) / "task").iterdir():
        try:
            children += [int(pid) for pid in (task / "children").read_text().split()]
        except FileNotFoundError:
            pass
    return children


def restart(trigger: str, master_pid: int) -> list[int]:
    """Restart the server under ``master_pid``; the pids signalled. By PID only: the
    master itself (hup) or each of its children (kill)."""
    try:
        if trigger == "hup":
            os.kill(master_pid, signal.SIGHUP)
            return [master_pid]
        workers = workers_of(master_pid)
        if not workers:
            raise BenchError(f"--master-pid {master_pid} has no worker processes to kill")
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        return workers
    except (ProcessLookupError, FileNotFoundError):
        raise BenchError(f"--master-pid {master_pid}: no such process") from None
    except PermissionError:
        raise BenchError(f"--master-pid {master_pid}: not allowed to signal it") from None


def is_refusal(reason: str) -> bool:
    """A reconnection the server turned down (nobody listening, or an HTTP answer other
    than 101), as opposed to an error (a timeout, a reset, a close mid-handshake)."""
    return reason.startswith(("connect: ECONNREFUSED", "handshake: HTTP/"))


def time_to(histogram: LogHistogram, fraction: float, total: int) -> float | None:
    """Seconds by which ``fraction`` of ``total`` clients were connected again, from a
    histogram of reconnection delays in ns; None when fewer came back."""
    if total <= 0:
        return None
    rank = max(1, math.ceil(fraction * total))
    if rank > histogram.count:
        return None
    if rank == total:
        return histogram.max / 1e9  # exact
    seen = 0
    for low, high, count in histogram.buckets():
        seen += count
        if seen >= rank:
            return min(math.sqrt(low * high), histogram.max) / 1e9
    return histogram.max / 1e9  # pragma: no cover - rank <= count always stops the loop


def _counts(failures: dict[str, int]) -> tuple[int, int]:
    refused = sum(n for reason, n in failures.items() if is_refusal(reason))
    return refused, sum(failures.values()) - refused


def storm_phase(run: Run) -> dict:
    """Arm the load processes, restart the server, follow the reconnections; then one
    broadcast that every client must get. Returns the run's ``storm`` section."""
    s = run.scenario
    connections = run.status["open"]
    run.generator.ask({"cmd": "arm_reconnect"})
    run.progress.note(f"{run.label}: {connections:,} connected; restarting the server "
                      f"({s.storm}, master pid {s.master_pid})")
    t0 = time.monotonic()
    signalled = restart(s.storm, s.master_pid)
    timeline: dict[str, list] = {key: [] for key in (
        "t", "open", "connecting", "waiting", "refused", "errors", "attempts")}
    settled_since = None
    next_line = 0.0
    outcome = "timeout"
    while True:
        status = run.poll(show=False)
        storms = [reply["storm"] for reply in run.replies]
        now = time.monotonic()
        drops = sum(part["drops"] for part in storms)
        waiting = sum(part["waiting"] for part in storms)
        failures: dict[str, int] = {}
        for part in storms:
            for reason, count in part["failures"].items():
                failures[reason] = failures.get(reason, 0) + count
        refused, errors = _counts(failures)
        point = {"t": round(now - t0, 3), "open": status["open"],
                 "connecting": status["pending"], "waiting": waiting, "refused": refused,
                 "errors": errors, "attempts": sum(part["attempts"] for part in storms)}
        for key, value in point.items():
            timeline[key].append(value)
        if now >= next_line:
            next_line = now + 1.0
            run.progress.update(
                f"{run.label} storm {now - t0:6.1f}s {status['open']:,}/{connections:,} open, "
                f"{status['pending']:,} connecting, {waiting:,} waiting; {drops:,} drops, "
                f"{point['attempts']:,} attempts, {refused:,} refused, {errors:,} errors")
        if drops and status["open"] >= connections and not waiting and not status["pending"]:
            settled_since = settled_since or now
            if now - settled_since >= SETTLED_FOR:
                outcome = "all back"
                break
        else:
            settled_since = None
        if not drops and now - t0 > NO_DROP_WAIT:
            outcome = "no connection dropped"
            break
        if now - t0 > s.storm_timeout:
            break
        time.sleep(POLL_INTERVAL)
    run.progress.done()
    replies = run.generator.ask({"cmd": "storm", "since": t0}, timeout=120)
    back = LogHistogram()
    for reply in replies:
        back.merge(LogHistogram.from_dict(reply["back"]))
    failures = {}
    for reply in replies:
        for reason, count in reply["failures"].items():
            failures[reason] = failures.get(reason, 0) + count
    refused, errors = _counts(failures)
    drops_at = [reply[key] - t0 for reply in replies for key in ("first_drop", "last_drop")
                if reply[key]]
    result = {
        "trigger": s.storm, "master_pid": s.master_pid, "signalled": signalled,
        "outcome": outcome, "connections": connections,
        "open_at_end": sum(reply["open"] for reply in replies),
        "not_dropped": sum(reply["not_dropped"] for reply in replies),
        "drops": sum(reply["drops"] for reply in replies),
        "first_drop_s": round(min(drops_at), 3) if drops_at else None,
        "last_drop_s": round(max(drops_at), 3) if drops_at else None,
        "attempts": sum(reply["attempts"] for reply in replies),
        "reconnected": sum(reply["reconnected"] for reply in replies),
        "refused": refused, "errors": errors, "failures": failures,
        "time_to_s": {label: _round(time_to(back, fraction, connections)) for label, fraction
                      in (("50", 0.50), ("99", 0.99), ("100", 1.0))},
        "back": back.to_dict(),
        "timeline": timeline,
    }
    result["broadcast_after"] = _broadcast_after(run, result["open_at_end"])
    return result


def _broadcast_after(run: Run, open_now: int) -> dict:
    """One probe once the storm is over: every open client must get it once."""
    if not open_now:
        return {"sent": False, "expected": 0, "received": 0}
    probe_id = run.probes_sent
    run.send_probes(1, 1.0)
    deadline = time.monotonic() + run.scenario.drain_timeout
    received = 0
    while True:
        received = sum(reply["deliveries"] for reply in run.generator.ask(
            {"cmd": "deliveries", "id": probe_id}))
        if received >= open_now or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return {"sent": True, "probe": probe_id, "expected": open_now, "received": received}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
