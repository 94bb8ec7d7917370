"""One benchmark run: connect at an arrival rate, hold, probe, tally; and ``--compare``.

The phases, all bounded in time:

1. one handshake to the URL (a clear error if it is not a websocket endpoint), the
   plan (load processes, source addresses) and the preflight checks;
2. connect: every load process opens its share at its share of ``--rate``; in step mode
   ``--step-clients`` at a time, each step followed by ``--step-broadcasts`` probes,
   until the p95 delivery latency of a step passes ``--max-p95-ms``;
3. idle: ``--idle`` seconds connected with nobody talking, to know what an idle crowd
   costs per second (keepalive pings, the driver's own polling);
4. hold: ``--hold`` seconds connected, one probe every 1/``--probe-rate`` s;
5. drain: wait (at most ``--drain-timeout``) until every probe reached every client,
   then count, per client, probes missing and probes received twice.

With ``--storm`` the idle and hold phases give way to a reconnect storm (``storm.py``):
restart the server, follow the clients' return, one broadcast to all afterwards.

The server's and the load processes' CPU is read (exactly, from /proc schedstat) at the
edges of the connect, idle and hold phases, so the report gives CPU per connection and
per delivery for both sides: the generator must spend less than the server on each, or
a one-box figure would measure the generator.

Probes are sent only while no connection is being made, so the clients expected to
receive a probe are exactly those open when it was sent. The driver asks every load process
for its counters four times a second (and shows them once a second); a thread reads the
server's /stats and /proc (``observe.py``).
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..checks import Check
from ..system import process_rss_bytes, read_open_files_limit, read_sysctl
from . import preflight
from .errors import BenchError
from .histogram import LogHistogram
from .observe import Observer, Sample, covers
from .plan import Plan, default_per_source, make_plan, per_process_limit, split
from .report import (Progress, comparison, format_comparison, format_run, plot, summarize,
                     write_json)
from .endpoint import Endpoint, check_endpoint, parse_url
from .peers import PEERS, start_peer
from .processes import LoadProcesses
from .storm import storm_phase

__all__ = ["Scenario", "main", "run", "run_scenario"]

POLL_INTERVAL = 0.25  # seconds between status requests to the load processes
# Seconds the final /stats may take to count the run's end: behind a Redis backplane the
# workers' reports reach it within ~3 s (chat.backplane's REPORT_LAG).
REPORTS_CATCH_UP = 10.0
SAMPLE_INTERVAL = 1.0  # seconds between timeline points and progress lines


@dataclass
class Scenario:
    """Everything a run needs; ``greenchat bench`` options map onto these fields."""

    url: str
    connections: int = 1000
    rate: float | None = None  # connections per second over all processes; None: no pacing
    hold: float = 5.0
    idle: float = 0.0
    probe_rate: float = 1.0
    step_clients: int | None = None
    step_broadcasts: int = 10
    max_p95_ms: float = 250.0
    message_size: int = 0
    echo: bool = True  # the server sends a message back to its sender too
    per_worker: int | None = None
    per_source: int | None = None
    source: list[str] | None = None
    inflight: int = 200
    handshake_timeout: float = 30.0
    generator_sched: str = "batch"  # the load processes' scheduling policy (loadclient)
    read_nap_ms: float = 0.0  # LoadClient's read_nap, in milliseconds
    drain_timeout: float = 10.0
    stats_url: str | None = None
    stats: bool = True
    server_pid: list[int] = field(default_factory=list)
    max_failures: int = 0
    max_lost: int = 0
    storm: str | None = None  # "hup" or "kill": restart the server once connected
    master_pid: int | None = None  # the gunicorn master to restart
    storm_timeout: float = 300.0


class Run:
    """The state of one run against one endpoint; ``execute`` returns its result dict."""

    def __init__(self, scenario: Scenario, endpoint: Endpoint, label: str,
                 progress: Progress) -> None:
        self.scenario = scenario
        self.endpoint = endpoint
        self.label = label
        self.progress = progress
        self.began = time.monotonic()
        self.probes_sent = 0
        self.established_target = 0  # connections asked for so far
        self.timeline: dict[str, list] = {"t": [], "started": [], "established": [],
                                          "failed": []}
        self.steps: list[dict] = []
        self.notes: list[str] = []  # what the user should know about this run
        self.stopped_by: str | None = None
        self.connect_s = 0.0  # time spent connecting, summed over the connect phases
        self.status: dict = {}
        self.replies: list[dict] = []  # the load processes' latest status replies
        # phase -> seconds, server and generator CPU (ns; None when unknown), and what
        # was done in it ("connections" or "deliveries")
        self.phases: dict[str, dict] = {}
        self._next_sample = 0.0
        self._last_progress = (0.0, 0)  # (t, established) of the last progress line

    # -- plan --------------------------------------------------------------------------

    def make_plan(self) -> tuple[Plan, list[Check]]:
        s = self.scenario
        _soft, hard = read_open_files_limit()
        limit = per_process_limit(hard if hard > 0 else 1 << 20)
        per_worker = s.per_worker or limit
        if per_worker > limit:
            raise BenchError(f"--per-worker {per_worker} is above what one worker can hold "
                             f"with the open-files limit {hard}: at most {limit}", status=2)
        ports = (read_sysctl("net.ipv4.ip_local_port_range") or "32768 60999").split()
        port_count = int(ports[1]) - int(ports[0]) + 1
        bind = s.source is not None or self.endpoint.loopback
        per_source = (s.per_source or default_per_source(port_count)) if bind else s.connections
        plan = make_plan(s.connections, per_worker, per_source, s.source, self.endpoint.loopback)
        checks = preflight.run_checks(
            connections=s.connections, per_process=max(plan.quotas),
            in_flight=s.inflight * plan.processes, per_source=min(per_source, s.connections),
            sockets_per_connection=2 if self.endpoint.loopback else 1)
        return plan, checks

    # -- CPU per phase -------------------------------------------------------------------

    def mark(self) -> tuple:
        """Now: time, server and generator CPU (ns), connections established, deliveries,
        server and generator system CPU (s)."""
        server, generator = self.observer.cpu_ns()
        return (time.monotonic(), server, generator, self.status.get("established", 0),
                self.status.get("deliveries", 0), *self.observer.kernel_share())

    def add_phase(self, name: str, since: tuple) -> None:
        """Add what happened since the mark ``since`` to phase ``name``."""
        now = self.mark()
        phase = self.phases.setdefault(name, {"seconds": 0.0, "server_cpu_ns": 0,
                                              "generator_cpu_ns": 0, "connections": 0,
                                              "deliveries": 0, "server_system_s": 0.0,
                                              "generator_system_s": 0.0})
        phase["seconds"] += now[0] - since[0]
        for key, i in (("server_cpu_ns", 1), ("generator_cpu_ns", 2),
                       ("server_system_s", 5), ("generator_system_s", 6)):
            if now[i] is None or since[i] is None or phase[key] is None:
                phase[key] = None  # a process gone or not known: no figure, not a wrong one
            else:
                phase[key] = round(phase[key] + now[i] - since[i], 6)
        phase["connections"] += now[3] - since[3]
        phase["deliveries"] += now[4] - since[4]

    # -- talking to the load processes ---------------------------------------------------

    def poll(self, force_sample: bool = False, show: bool = True) -> dict:
        """Every load process's counters, summed; a timeline point and (``show``) a
        progress line a second."""
        s = self.scenario
        replies = self.replies = self.generator.ask(
            {"cmd": "status", "probes": self.probes_sent, "echo": s.echo})
        total = {key: sum(r[key] for r in replies) for key in
                 ("started", "established", "open", "failed", "pending", "lost",
                  "close_frames", "deliveries", "expected", "other_messages")}
        total["connecting"] = any(r["connecting"] for r in replies)
        total["batches"] = [r["batch"] for r in replies if r["batch"]]
        self.status = total
        now = time.monotonic() - self.began
        if force_sample or now >= self._next_sample:
            self._next_sample = now + SAMPLE_INTERVAL
            timeline = self.timeline
            if timeline["t"] and now - timeline["t"][-1] < 0.05:  # same moment: replace it
                for values in timeline.values():
                    values.pop()
            for key in ("started", "established", "failed"):
                timeline[key].append(total[key])
            timeline["t"].append(round(now, 3))
            if show:
                self.show_progress(now, total)
        return total

    def show_progress(self, now: float, total: dict) -> None:
        then, before = self._last_progress
        rate = (total["established"] - before) / (now - then) if now > then else 0.0
        self._last_progress = (now, total["established"])
        sample = self.observer.latest
        server = []
        if sample is not None and sample.stats is not None:
            server.append(f"{sample.stats['connections']:,} conns")
        if sample is not None and sample.server_rss is not None:
            server.append(f"RSS {sample.server_rss / 2**20:,.0f} MB")
        server_text = f" | server {', '.join(server)}" if server else ""
        probes = ""
        if self.probes_sent:
            probes = (f" | probes {self.probes_sent}, deliveries "
                      f"{total['deliveries']:,}/{total['expected']:,}")
        self.progress.update(
            f"{self.label} {now:6.1f}s {total['open']:,}/{self.scenario.connections:,} open "
            f"({rate:,.0f}/s) errors {total['failed'] + total['lost']:,}{server_text}{probes}")

    def connect(self, total_wanted: int) -> None:
        """Grow to ``total_wanted`` connections (split evenly over the processes) and wait."""
        s = self.scenario
        plan = self.plan
        before = split(self.established_target, plan.processes)
        after = split(total_wanted, plan.processes)
        first = self.established_target == 0
        commands = []
        for number, (old, new) in enumerate(zip(before, after)):
            command = {"cmd": "start", "n": new - old, "first_probe": self.probes_sent,
                       "rate": (s.rate or 0.0) * (new - old) / max(1, total_wanted
                                                                     - self.established_target)}
            if first:
                command["sources"] = plan.sources[number]
            commands.append(command)
        adding = total_wanted - self.established_target
        self.established_target = total_wanted
        self.poll(force_sample=True)  # the curve starts where this phase starts
        mark = self.mark()
        started = time.monotonic()
        self.generator.ask(commands)
        # Each handshake ends within --handshake-timeout of its connect(); connects start at
        # the rate, or as handshake slots free up (at least ~100/s unless the server stalls).
        pace = s.rate if s.rate else 100.0
        deadline = started + adding / pace + s.handshake_timeout + 30
        while True:
            status = self.poll()
            if not status["connecting"]:
                break
            if time.monotonic() > deadline:
                self.generator.ask({"cmd": "cancel"})
                self.progress.note(f"{self.label}: connect phase cut off after "
                                   f"{time.monotonic() - started:.0f} s")
                break
            time.sleep(POLL_INTERVAL)
        status = self.poll(force_sample=True)
        self.add_phase("connect", mark)
        # The load processes' own clock (CLOCK_MONOTONIC, shared): first connect() to last 101.
        batches = status["batches"]
        if batches and all(finished for _began, finished in batches):
            self.connect_s += max(f for _b, f in batches) - min(b for b, _f in batches)
        else:
            self.connect_s += time.monotonic() - started

    def settle(self) -> None:
        """Let the server register the last clients before a probe is sent (bounded, 5 s)."""
        want = self.status["open"]
        deadline = time.monotonic() + 5.0
        if self.observer.stats_url is None:
            time.sleep(0.2)
            return
        while time.monotonic() < deadline:
            sample = self.observer.poll()
            if sample.stats is not None and sample.stats["connections"] >= want:
                return
            time.sleep(0.05)

    def send_probes(self, count: int, rate: float, duration: float = 0.0) -> None:
        """``count`` probes, one every 1/``rate`` s, from process 0; ``duration`` s at least."""
        s = self.scenario
        started = time.monotonic()
        end = started + max(duration, (count - 1) / rate if count and rate else 0.0)
        sent = 0
        while True:
            now = time.monotonic()
            if sent < count and now >= started + sent / rate:
                reply = self.generator.processes[0].request(
                    {"cmd": "probe", "id": self.probes_sent, "size": s.message_size})
                if reply["sent_ns"] is None:
                    self.notes.append(f"probes stopped after {self.probes_sent}: worker 0 has "
                                      "no open connection left")
                    self.progress.note(f"{self.label}: {self.notes[-1]}")
                    count = sent
                    continue
                self.probes_sent += 1
                sent += 1
                continue
            if sent >= count and now >= end:
                return
            self.poll()
            wake = min(started + sent / rate if sent < count else end,
                       now + POLL_INTERVAL)
            time.sleep(max(0.0, wake - time.monotonic()))

    def stay_idle(self, seconds: float) -> None:
        """``seconds`` connected with no probes, polling as during the hold."""
        self.poll()
        mark = self.mark()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.poll()
            time.sleep(max(0.0, min(POLL_INTERVAL, end - time.monotonic())))
        self.poll()
        self.add_phase("idle", mark)

    def drain(self) -> None:
        """Wait until every probe reached every client, or ``--drain-timeout`` passed."""
        deadline = time.monotonic() + self.scenario.drain_timeout
        while True:
            status = self.poll()
            if status["deliveries"] >= status["expected"] or time.monotonic() > deadline:
                return
            # Not faster: every poll wakes every load process (53 at a million) amid the
            # broadcast it measures; the last delivery is timed by them, not by this.
            time.sleep(POLL_INTERVAL)

    def tally(self) -> tuple[dict, LogHistogram, dict[int, list[int]]]:
        """Every load process's final counts, merged: totals, latency histogram, probe stats."""
        replies = self.generator.ask({"cmd": "tally", "probes": self.probes_sent,
                                      "echo": self.scenario.echo}, timeout=120)
        totals: dict = {key: sum(r[key] for r in replies) for key in
                        ("started", "established", "open", "failed", "lost", "close_frames",
                         "expected", "received", "missing", "duplicated", "other_messages")}
        failures: dict[str, int] = {}
        histogram = LogHistogram()
        per_probe: dict[int, list[int]] = {}
        for reply in replies:
            for reason, count in reply["failures"].items():
                failures[reason] = failures.get(reason, 0) + count
            histogram.merge(LogHistogram.from_dict(reply["histogram"]))
            for probe_id, (count, latest) in reply["probe_stats"].items():
                stat = per_probe.setdefault(int(probe_id), [0, 0])
                stat[0] += count
                stat[1] = max(stat[1], latest)
        totals["failures"] = failures
        return totals, histogram, per_probe

    # -- the phases ----------------------------------------------------------------------

    def step_mode(self) -> None:
        s = self.scenario
        previous, missing = LogHistogram(), 0
        while self.established_target < s.connections:
            self.connect(min(s.connections, self.established_target + s.step_clients))
            self.settle()
            self.send_probes(s.step_broadcasts, s.probe_rate or 10.0)
            self.drain()
            totals, histogram, _ = self.tally()
            step = histogram.minus(previous)
            row = {"clients": totals["open"], "probes": s.step_broadcasts,
                   "deliveries": step.count, "missing": totals["missing"] - missing,
                   "p50_ms": step.quantile(0.50) / 1e6, "p95_ms": step.quantile(0.95) / 1e6,
                   "p99_ms": step.quantile(0.99) / 1e6, "max_ms": step.max / 1e6}
            self.steps.append(row)
            previous, missing = histogram, totals["missing"]
            self.progress.note(f"{self.label} step {len(self.steps)}: {row['clients']:,} clients, "
                               f"p50 {row['p50_ms']:.1f} ms, p95 {row['p95_ms']:.1f} ms, "
                               f"max {row['max_ms']:.1f} ms")
            if row["p95_ms"] > s.max_p95_ms:
                self.stopped_by = (f"p95 {row['p95_ms']:.1f} ms > {s.max_p95_ms:g} ms at "
                                   f"{row['clients']:,} clients")
                break

    def execute(self) -> dict:
        s = self.scenario
        check_endpoint(self.endpoint)
        self.plan, checks = self.make_plan()
        for check in checks:
            if not check.ok:
                self.progress.note(f"preflight: {check}")
        fatal = [check for check in checks if check.fatal and not check.ok]
        if fatal:
            raise BenchError(f"preflight: {fatal[0]}", status=2)
        self.generator = LoadProcesses(self.endpoint, self.plan, inflight=s.inflight,
                                       handshake_timeout=s.handshake_timeout,
                                       sched=s.generator_sched, read_nap_ms=s.read_nap_ms)
        try:
            stats_url = (s.stats_url or self.endpoint.stats_url) if s.stats else None
            self.observer = Observer(stats_url=stats_url, server_pids=s.server_pid,
                                     generator_pids=self.generator.pids, began=self.began).start()
            try:
                return self._phases(checks)
            finally:
                self.observer.stop()
        finally:
            try:
                self.generator.ask({"cmd": "close"}, timeout=60)
            except BenchError:
                pass
            self.generator.stop()

    def _phases(self, checks: list[Check]) -> dict:
        s = self.scenario
        observer = self.observer
        notes = self.notes
        if s.stats and observer.stats_url is None:
            notes.append(f"no server /stats ({observer.stats_error}): server counters not "
                         "observed")
        if not observer.server_pids and self.endpoint.loopback:
            pid = _local_server_pid(observer.latest)
            if pid:
                observer.server_pids = [pid]
                notes.append(f"server pid {pid} (from /stats): RSS and CPU read from /proc")
        for note in list(notes):
            self.progress.note(f"{self.label}: {note}")
        baseline = observer.poll(pss=True)
        if s.step_clients:
            self.step_mode()
        else:
            self.connect(s.connections)
        self.settle()
        idle = observer.poll(pss=True)
        idle_open = self.status["open"]
        storm = None
        if s.storm:  # instead of idle and hold
            storm = storm_phase(self)
            self.poll(force_sample=True)
        else:
            if s.idle > 0:
                self.stay_idle(s.idle)
            self.poll()
            mark = self.mark()
            if s.hold > 0:
                self.send_probes(math.ceil(s.hold * s.probe_rate), s.probe_rate or 1.0,
                                 duration=s.hold)
            self.drain()
            self.poll(force_sample=True)
            self.add_phase("hold", mark)
        totals, histogram, per_probe = self.tally()
        if baseline.stats is None:  # no /stats (a peer): no counters to wait for
            end = observer.poll(pss=True)
            settled = False
        else:
            stopped = time.time()
            workers = len(baseline.stats.get("per_worker") or [])
            end = observer.poll_settled(stopped, REPORTS_CATCH_UP, pss=True, workers=workers)
            settled = covers(end.stats, stopped, workers)
            if end.stats is not None and not settled:
                notes.append("server counters not shown: the workers' reports in /stats "
                             f"did not catch up within {REPORTS_CATCH_UP:.0f} s")
        self.progress.done()
        return summarize(
            label=self.label, scenario=asdict(s), target=self.endpoint.url, plan=self.plan,
            server_pids=observer.server_pids,
            checks=checks, notes=notes, totals=totals, histogram=histogram,
            per_probe=per_probe, probes_sent=self.probes_sent, steps=self.steps,
            stopped_by=self.stopped_by, connect_s=self.connect_s,
            timeline=self.timeline, samples=observer.snapshot(), baseline=baseline,
            idle=idle, idle_open=idle_open, end=end, counted=settled, phases=self.phases,
            storm=storm, duration=time.monotonic() - self.began)


def _local_server_pid(sample: Sample | None) -> int | None:
    """The /stats pid when it is a process here whose RSS matches /stats (same machine)."""
    if sample is None or sample.stats is None or "pid" not in sample.stats:
        return None
    pid = sample.stats["pid"]
    try:
        rss = process_rss_bytes(pid)
    except (OSError, ValueError):
        return None
    reported = sample.stats.get("rss_bytes") or 0
    return pid if reported and abs(rss - reported) <= 0.2 * reported else None


# -- the command -----------------------------------------------------------------------

def run_scenario(scenario: Scenario, label: str, progress: Progress) -> dict:
    return Run(scenario, parse_url(scenario.url), label, progress).execute()


def environment() -> dict:
    return {"python": platform.python_version(), "kernel": platform.release(),
            "cpus": os.cpu_count(), "loadavg": list(os.getloadavg()),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def run(scenario: Scenario, *, compare: list[str] | tuple[str, ...] = (),
        progress: Progress) -> dict:
    """The whole command: the target, then each peer of ``compare`` started fresh on a
    free port and given the same scenario, in one report."""
    for name in compare:
        missing = PEERS[name].missing()
        if missing:  # before the target's run, not after it
            raise BenchError(f"--compare {name} needs {', '.join(missing)}: pip install "
                             "'greenchat[bench]'", status=2)
    report = {"version": 1, "argv": sys.argv, "environment": environment(), "runs": []}
    report["runs"].append(run_scenario(scenario, "target", progress))
    path = parse_url(scenario.url).path
    # A peer is one process: it holds no more sockets than its open-files limit allows.
    _soft, hard = read_open_files_limit()
    most = per_process_limit(hard) if hard > 0 else scenario.connections
    for name in compare:
        peer = start_peer(name)
        try:
            fields = {**asdict(scenario), "url": f"ws://127.0.0.1:{peer.port}{path}",
                      "stats": False, "stats_url": None, "server_pid": [peer.pid],
                      "connections": min(scenario.connections, most)}
            if fields["connections"] < scenario.connections:
                progress.note(f"{name}: {fields['connections']:,} connections at most (one "
                              f"process, open files {hard:,})")
            report["runs"].append(run_scenario(Scenario(**fields), name, progress))
        finally:
            peer.stop()
    report["ok"] = all(r["ok"] for r in report["runs"])
    return report


def main(scenario: Scenario, *, compare: list[str] | tuple[str, ...] = (),
         json_path: Path | None = None, plot_path: Path | None = None,
         progress: bool = False) -> int:
    """``greenchat bench``: run, print the table(s), write the files; the exit status.

    0: every run within its thresholds; 1: connections failed or deliveries were lost
    beyond them, or the run could not go on; 2: the plan does not fit this machine.
    """
    live = Progress(progress)
    try:
        report = run(scenario, compare=compare, progress=live)
    except BenchError as error:
        live.done()
        print(f"greenchat bench: {error}", file=sys.stderr)
        return error.status
    except KeyboardInterrupt:
        live.done()
        print("greenchat bench: interrupted", file=sys.stderr)
        return 130
    runs = report["runs"]
    print("\n\n".join(format_run(r) for r in runs))
    if compare:
        report["comparison"] = comparison(runs)
        print()
        print(format_comparison(runs))
    if json_path is not None:
        write_json(json_path, report)
    if plot_path is not None:
        plot(plot_path, runs)
    return 0 if report["ok"] else 1
