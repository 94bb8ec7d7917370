"""What ``greenchat bench`` tells: the live progress line, the final table, JSON and a PNG.

``summarize`` turns one run's raw counts into the result dict that everything else
reads: the table, the comparison, ``--json`` (the dict as is) and ``--plot``. Every
figure in the table is in the JSON, with the samples it came from.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import TextIO

from .histogram import LogHistogram

__all__ = ["Progress", "summarize", "format_run", "format_comparison", "write_json", "plot"]

MB = 2 ** 20


class Progress:
    """One live line on a terminal (rewritten in place), or one line per update otherwise.

    ``note`` lines (preflight findings, steps) are always shown; updates only when
    ``enabled`` (stderr is a terminal, or ``--progress``).
    """

    def __init__(self, enabled: bool, stream: TextIO = sys.stderr) -> None:
        self.enabled = enabled
        self.stream = stream
        self.tty = stream.isatty()
        self._live = False

    def update(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            width = shutil.get_terminal_size().columns - 1
            self.stream.write("\r" + text[:width] + "\x1b[K")
            self._live = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        if self._live:
            self.stream.write("\r\x1b[K")
            self._live = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self._live:
            self.stream.write("\n")
            self.stream.flush()
            self._live = False


def _delta(end: dict | None, start: dict | None, key: str) -> int | None:
    if not end or not start or key not in end or key not in start:
        return None
    return end[key] - start[key]


def _kb_per(now: int | None, then: int | None, connections: int) -> float | None:
    if now is None or then is None or not connections:
        return None
    return (now - then) / 1024 / connections


def _processes(who: str, samples: list, baseline, idle, end, connections: int) -> dict:
    """RSS and CPU of the ``who`` ("server" or "generator") processes over the run."""
    rss = [value for s in samples if (value := getattr(s, f"{who}_rss")) is not None]
    cpu_end, cpu_start = getattr(end, f"{who}_cpu_s"), getattr(baseline, f"{who}_cpu_s")
    return {
        "rss_start_bytes": getattr(baseline, f"{who}_rss"),
        "rss_idle_bytes": getattr(idle, f"{who}_rss"),
        "rss_peak_bytes": max(rss) if rss else None,
        "kb_per_connection": _kb_per(getattr(idle, f"{who}_rss"),
                                     getattr(baseline, f"{who}_rss"), connections),
        **({"pss_start_bytes": baseline.server_pss, "pss_idle_bytes": idle.server_pss,
            "pss_kb_per_connection": _kb_per(idle.server_pss, baseline.server_pss,
                                             connections)} if who == "server" else {}),
        "cpu_s": cpu_end - cpu_start if cpu_end is not None and cpu_start is not None else None,
    }


def _phase_figures(phases: dict, who: str, work: str) -> dict:
    """``who``'s ("server" or "generator") CPU per connection made in the connect phases,
    per second of the idle phase (in cores) and per ``work`` ("delivery" or "message")
    in the hold phase, less what the idle phase says polling costs per second."""
    key = f"{who}_cpu_ns"
    connect, idle, hold = (phases.get(name) for name in ("connect", "idle", "hold"))
    per_connection = idle_ns_per_s = per_work = None
    if connect and connect[key] is not None and connect["connections"] > 0:
        per_connection = connect[key] / connect["connections"] / 1000
    if idle and idle[key] is not None and idle["seconds"] > 0:
        idle_ns_per_s = idle[key] / idle["seconds"]
    kernel_share = None
    if hold and hold[key] is not None and hold["deliveries"] > 0:
        busy = hold[key] - (idle_ns_per_s or 0.0) * hold["seconds"]
        per_work = busy / hold["deliveries"] / 1000
        system = hold.get(f"{who}_system_s")
        if system is not None and hold[key] > 0:
            kernel_share = system * 1e9 / hold[key]
    return {"cpu_us_per_connection": _round(per_connection),
            "idle_cpu_cores": _round(idle_ns_per_s and idle_ns_per_s / 1e9, 4),
            f"cpu_us_per_{work}": _round(per_work),
            # of the hold phase's CPU, the kernel's part (system time, 10 ms ticks)
            "hold_kernel_share": _round(kernel_share)}


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _ms(ns: float) -> float:
    return round(ns / 1e6, 3)


def summarize(*, label: str, scenario: dict, target: str, plan, server_pids: list[int],
              checks: list, notes: list[str],
              totals: dict, histogram: LogHistogram, per_probe: dict[int, list[int]],
              probes_sent: int, steps: list[dict], stopped_by: str | None,
              connect_s: float, timeline: dict, samples: list, baseline, idle,
              idle_open: int, end, phases: dict, duration: float,
              storm: dict | None = None, counted: bool = True) -> dict:
    """The result of one run (see the module docstring); ``ok`` applies the thresholds.

    After a reconnect storm every client was lost once on purpose: the verdict is then
    whether all came back within ``--storm-timeout`` and got the broadcast after it.
    ``counted``: the ``end`` sample's /stats counts the whole run (``observe.covers``);
    if not, its counters are left out rather than shown short.
    """
    failed = totals["failed"] + (0 if storm else totals["lost"])
    wrong = totals["missing"] + totals["duplicated"]
    last = sorted(latest for _count, latest in per_probe.values())
    peaks = [s.stats["connections"] for s in samples if s.stats is not None]
    available = [s.mem_available_kb for s in samples if s.mem_available_kb is not None]
    problems = []
    if failed > scenario["max_failures"]:
        problems.append(f"{failed} connections failed or lost (--max-failures "
                        f"{scenario['max_failures']})")
    if wrong > scenario["max_lost"]:
        problems.append(f"{totals['missing']} deliveries missing, {totals['duplicated']} "
                        f"duplicated (--max-lost {scenario['max_lost']})")
    if storm is not None:
        if storm["outcome"] != "all back":
            problems.append(f"storm: {storm['outcome']}, {storm['open_at_end']:,} of "
                            f"{storm['connections']:,} connected at the end")
        after = storm["broadcast_after"]
        if after["received"] != after["expected"]:
            problems.append(f"storm: the broadcast after it reached {after['received']:,} of "
                            f"{after['expected']:,} clients")
        totals = {**totals, "expected": after["expected"]}
    counters = {key: _delta(end.stats, baseline.stats, key) for key in
                ("handshakes", "messages_received", "deliveries", "slow_consumers_closed",
                 "protocol_errors")} if baseline.stats and end.stats and counted else None
    return {
        "label": label,
        "target": target,
        "ok": not problems,
        "problems": problems,
        "scenario": scenario,
        "notes": notes,
        "duration_s": round(duration, 3),
        "plan": {"workers": plan.processes, "per_worker": plan.quotas,
                 "per_source": plan.per_source, "source_addresses": plan.addresses},
        "preflight": [check.to_dict() for check in checks],
        "connections": {
            "target": scenario["connections"],
            "started": totals["started"],
            "established": totals["established"],
            "open_at_end": totals["open"],
            "failed": totals["failed"],
            "lost": totals["lost"],
            "close_frames": totals["close_frames"],
            "failures": totals["failures"],
            "connect_s": round(connect_s, 3),
            "per_s": round(totals["established"] / connect_s, 1) if connect_s > 0 else None,
        },
        "probes": {
            "sent": probes_sent,
            "deliveries_expected": totals["expected"],
            "deliveries_received": totals["received"],
            "missing": totals["missing"],
            "duplicated": totals["duplicated"],
            "other_messages": totals["other_messages"],
        },
        "latency_ms": {
            "count": histogram.count,
            "p50": _ms(histogram.quantile(0.50)),
            "p95": _ms(histogram.quantile(0.95)),
            "p99": _ms(histogram.quantile(0.99)),
            "max": _ms(histogram.max),
            "mean": _ms(histogram.mean),
            "last_delivery_median": _ms(statistics.median(last)) if last else None,
            "last_delivery_max": _ms(last[-1]) if last else None,
            "histogram": histogram.to_dict(),
        },
        "steps": steps,
        "stopped_by": stopped_by,
        "storm": storm,
        "server": {"pids": server_pids or None,
                   "peak_connections": max(peaks) if peaks else None, "counters": counters,
                   **_processes("server", samples, baseline, idle, end, idle_open),
                   **_phase_figures(phases, "server", "delivery")},
        "generator": {"workers": plan.processes,
                      **_processes("generator", samples, baseline, idle, end, idle_open),
                      **_phase_figures(phases, "generator", "message")},
        "phases": phases,
        "machine": {
            "mem_available_start_kb": baseline.mem_available_kb,
            "mem_available_min_kb": min(available) if available else None,
            "slab_start_kb": baseline.slab_kb,
            "slab_idle_kb": idle.slab_kb,
            "slab_kb_per_connection": ((idle.slab_kb - baseline.slab_kb) / idle_open
                                       if idle.slab_kb is not None and baseline.slab_kb
                                       is not None and idle_open else None),
        },
        "timeline": timeline,
        "samples": {
            "t": [round(s.t, 3) for s in samples],
            "server_connections": [s.stats["connections"] if s.stats else None for s in samples],
            "server_rss_bytes": [s.server_rss for s in samples],
            "generator_rss_bytes": [s.generator_rss for s in samples],
            "mem_available_kb": [s.mem_available_kb for s in samples],
            "slab_kb": [s.slab_kb for s in samples],
        },
    }


# -- text ----------------------------------------------------------------------------------

def _num(value, fmt: str = "{:,.0f}", unit: str = "") -> str:
    return "-" if value is None else fmt.format(value) + unit


def _mb(value: int | None) -> str:
    return _num(None if value is None else value / MB, "{:,.1f}", " MB")


def format_run(run: dict) -> str:
    """The final table of one run, as lines of text."""
    c, p, lat, server, gen, machine = (run[k] for k in ("connections", "probes", "latency_ms",
                                                         "server", "generator", "machine"))
    lines = [f"greenchat bench {run['target']} ({run['label']}): {run['plan']['workers']} "
             f"worker(s), {run['plan']['source_addresses'] or 'kernel-chosen'} source "
             f"address(es), {run['duration_s']:.1f} s"]

    def row(name: str, text: str) -> None:
        lines.append(f"  {name:<12}{text}")

    failures = ", ".join(f"{n} {reason}" for reason, n in c["failures"].items())
    row("connections", f"{c['established']:,} of {c['target']:,} established in "
        f"{c['connect_s']:.2f} s ({_num(c['per_s'])}/s); {c['failed']:,} failed"
        + (f" ({failures})" if failures else "") + f", {c['lost']:,} lost since")
    row("deliveries", f"{p['deliveries_received']:,} of {p['deliveries_expected']:,} for "
        f"{p['sent']} probe(s); {p['missing']:,} missing, {p['duplicated']:,} duplicated"
        + (f"; {p['other_messages']:,} other messages" if p["other_messages"] else "")
        + (" (counted over the connections still open)" if c["lost"] else ""))
    if lat["count"]:
        row("latency", f"p50 {lat['p50']:.1f} ms, p95 {lat['p95']:.1f} ms, p99 "
            f"{lat['p99']:.1f} ms, max {lat['max']:.1f} ms; last delivery of a probe after "
            f"{lat['last_delivery_median']:.1f} ms (median), {lat['last_delivery_max']:.1f} "
            "ms (max)")
    counters = {k: v for k, v in (server["counters"] or {}).items() if v is not None}
    row("server", f"peak {_num(server['peak_connections'])} connections; RSS "
        f"{_mb(server['rss_start_bytes'])} -> {_mb(server['rss_idle_bytes'])} "
        f"({_num(server['kb_per_connection'], '{:.2f}', ' KB')}/connection)"
        + (f", PSS {_mb(server['pss_start_bytes'])} -> {_mb(server['pss_idle_bytes'])}"
           if server.get("pss_idle_bytes") is not None else "")
        + f", CPU {_num(server['cpu_s'], '{:.1f}', ' s')}"
        + ("; /stats counted " + ", ".join(f"{v:,} {k.replace('_', ' ')}"
                                           for k, v in counters.items()) if counters else ""))
    row("generator", f"RSS {_mb(gen['rss_start_bytes'])} -> {_mb(gen['rss_idle_bytes'])} "
        f"({_num(gen['kb_per_connection'], '{:.2f}', ' KB')}/connection), CPU "
        f"{_num(gen['cpu_s'], '{:.1f}', ' s')}")
    row("CPU", "per connection: server "
        f"{_num(server['cpu_us_per_connection'], '{:.0f}', ' us')}, generator "
        f"{_num(gen['cpu_us_per_connection'], '{:.0f}', ' us')}; per delivery: server "
        f"{_num(server['cpu_us_per_delivery'], '{:.1f}', ' us')}, generator "
        f"{_num(gen['cpu_us_per_message'], '{:.1f}', ' us')} per message received"
        + (f"; idle: server {server['idle_cpu_cores']:.3f}, generator "
           f"{_num(gen['idle_cpu_cores'], '{:.3f}')} cores"
           if server["idle_cpu_cores"] is not None else ""))
    start, lowest = machine["mem_available_start_kb"], machine["mem_available_min_kb"]
    row("machine", f"MemAvailable {_num(start and start / 1024, '{:,.0f}', ' MB')}, lowest "
        f"{_num(lowest and lowest / 1024, '{:,.0f}', ' MB')}; Slab "
        f"{_num(machine['slab_kb_per_connection'], '{:.1f}', ' KB')}/connection (kernel)")
    storm = run.get("storm")
    if storm:
        times = storm["time_to_s"]
        reasons = ", ".join(f"{n:,} {reason}" for reason, n in sorted(
            storm["failures"].items(), key=lambda item: -item[1]))
        row("storm", f"{storm['trigger']} at 0 s: {storm['drops']:,} drops (first "
            f"{_num(storm['first_drop_s'], '{:.2f}', ' s')}, last "
            f"{_num(storm['last_drop_s'], '{:.2f}', ' s')}); back: 50% "
            f"{_num(times['50'], '{:.2f}', ' s')}, 99% {_num(times['99'], '{:.2f}', ' s')}, "
            f"100% {_num(times['100'], '{:.2f}', ' s')} ({storm['outcome']})")
        row("", f"{storm['attempts']:,} reconnection attempts, {storm['refused']:,} refused, "
            f"{storm['errors']:,} errors" + (f" ({reasons})" if reasons else ""))
    if run["steps"]:
        row("steps", "clients      p50 ms   p95 ms   p99 ms   max ms  missing")
        for step in run["steps"]:
            row("", f"{step['clients']:>7,}  {step['p50_ms']:>7.1f}  {step['p95_ms']:>7.1f}  "
                f"{step['p99_ms']:>7.1f}  {step['max_ms']:>7.1f}  {step['missing']:>7,}")
        if run["stopped_by"]:
            row("", f"stopped: {run['stopped_by']}")
    row("result", "OK" if run["ok"] else "FAILED: " + "; ".join(run["problems"]))
    return "\n".join(lines)


COMPARED = [
    # (title, getter, format, a cost to read against the floor's)
    ("connections established", lambda r: r["connections"]["established"], "{:,.0f}", False),
    ("connect rate /s", lambda r: r["connections"]["per_s"], "{:,.0f}", False),
    ("failed + lost connections", lambda r: r["connections"]["failed"] + r["connections"]["lost"],
     "{:,.0f}", False),
    ("deliveries missing", lambda r: r["probes"]["missing"], "{:,.0f}", False),
    ("latency p50 ms", lambda r: r["latency_ms"]["p50"], "{:,.1f}", True),
    ("latency p95 ms", lambda r: r["latency_ms"]["p95"], "{:,.1f}", True),
    ("latency p99 ms", lambda r: r["latency_ms"]["p99"], "{:,.1f}", True),
    ("latency max ms", lambda r: r["latency_ms"]["max"], "{:,.1f}", True),
    ("last delivery ms (max)", lambda r: r["latency_ms"]["last_delivery_max"], "{:,.1f}", True),
    ("server KB/connection", lambda r: r["server"]["kb_per_connection"], "{:,.2f}", True),
    ("server peak RSS MB", lambda r: r["server"]["rss_peak_bytes"] and
     r["server"]["rss_peak_bytes"] / MB, "{:,.1f}", True),
    ("server CPU s", lambda r: r["server"]["cpu_s"], "{:,.1f}", True),
    ("server CPU us/connection", lambda r: r["server"]["cpu_us_per_connection"], "{:,.0f}",
     True),
    ("server CPU us/delivery", lambda r: r["server"]["cpu_us_per_delivery"], "{:,.2f}", True),
    ("generator KB/connection", lambda r: r["generator"]["kb_per_connection"], "{:,.2f}",
     False),
    ("generator CPU us/connection", lambda r: r["generator"]["cpu_us_per_connection"],
     "{:,.0f}", False),
    ("generator CPU us/message", lambda r: r["generator"]["cpu_us_per_message"], "{:,.2f}",
     False),
]


def comparison(runs: list[dict]) -> dict:
    """Metric -> {"values": {label: value}, "ratio_to_floor": {label: ratio} or None}.

    Ratios are to the ``floor`` run of the same report, for the costs (CPU, memory,
    latency); None without a floor run, or for counts.
    """
    floor = next((run for run in runs if run["label"] == "floor"), None)
    table = {}
    for title, get, _fmt, cost in COMPARED:
        values = {run["label"]: get(run) for run in runs}
        ratios = None
        if floor is not None and cost:
            base = get(floor)
            ratios = {label: value / base if value is not None and base else None
                      for label, value in values.items()}
        table[title] = {"values": values, "ratio_to_floor": ratios}
    return table


def format_comparison(runs: list[dict]) -> str:
    table = comparison(runs)
    labels = [run["label"] for run in runs]
    rows = [["", *labels]]
    for title, _get, fmt, _cost in COMPARED:
        entry = table[title]
        cells = [title]
        for label in labels:
            cell = _num(entry["values"][label], fmt)
            ratio = (entry["ratio_to_floor"] or {}).get(label)
            if ratio is not None and label != "floor":
                cell += f" ({ratio:.2f}x)"
            cells.append(cell)
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["side by side: " + ", ".join(f"{run['label']} {run['target']}" for run in runs)]
    if "floor" in labels:
        lines.append("  (costs also as a multiple of the floor's, measured in this run)")
    for cells in rows:
        lines.append("  " + "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                                      for i, (cell, w) in enumerate(zip(cells, widths))))
    return "\n".join(lines)


def write_json(path: Path, report: dict) -> None:
    path.write_text(json.dumps(report, indent=1) + "\n")


# -- picture -------------------------------------------------------------------------------

def plot(path: Path, runs: list[dict]) -> None:
    """The 2015 post's curves: clients started vs connected, server RSS, latency (CDF);
    for a storm, the connections over the seconds after the restart instead."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    if runs and runs[0].get("storm"):
        plot_storm(path, runs[0], plt)
        return

    figure, (connected, memory, latency) = plt.subplots(3, 1, figsize=(8, 10))
    for run, color in zip(runs, ("tab:green", "tab:blue", "tab:orange", "tab:red")):
        label = run["label"]
        timeline, samples = run["timeline"], run["samples"]
        connected.plot(timeline["t"], timeline["started"], "--", color=color,
                       label=f"{label}: started")
        connected.plot(timeline["t"], timeline["established"], "-", color=color,
                       label=f"{label}: established")
        points = [(t, rss / MB) for t, rss in zip(samples["t"], samples["server_rss_bytes"])
                  if rss is not None]
        if points:
            memory.plot(*zip(*points), "-", color=color, label=f"{label}: server RSS")
        points = [(t, rss / MB) for t, rss in zip(samples["t"], samples["generator_rss_bytes"])
                  if rss is not None]
        if points:
            memory.plot(*zip(*points), ":", color=color, label=f"{label}: generator RSS")
        histogram = LogHistogram.from_dict(run["latency_ms"]["histogram"])
        if histogram.count:
            xs, ys, seen = [], [], 0
            for _low, high, n in histogram.buckets():
                seen += n
                xs.append(high / 1e6)
                ys.append(100.0 * seen / histogram.count)
            latency.step(xs, ys, where="post", color=color,
                         label=f"{label}: p95 {run['latency_ms']['p95']:.1f} ms")
    connected.set(title="connections over time", xlabel="seconds", ylabel="connections")
    memory.set(title="memory over time", xlabel="seconds", ylabel="MB")
    latency.set(title="broadcast delivery latency", xlabel="ms (log)",
                ylabel="% of deliveries within")
    latency.set_xscale("log")
    _save(figure, (connected, memory, latency), path, plt)


def _save(figure, panels, path: Path, plt) -> None:
    """Grid and legend on every panel, then the figure to ``path`` (closed after)."""
    for axes in panels:
        axes.grid(True, alpha=0.3)
        if axes.has_data():
            axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_storm(path: Path, run: dict, plt) -> None:
    """Connections open, connecting and waiting to reconnect over the seconds after the
    restart, with the times to 50/99/100% back; refusals and errors below."""
    storm = run["storm"]
    line = storm["timeline"]
    figure, (clients, trouble) = plt.subplots(2, 1, figsize=(8, 8), sharex=True)
    clients.plot(line["t"], line["open"], "-", color="tab:green", label="connected")
    clients.plot(line["t"], line["connecting"], "-", color="tab:blue",
                 label="handshake in flight")
    clients.plot(line["t"], line["waiting"], ":", color="tab:gray",
                 label="waiting out the backoff")
    for (label, seconds), style in zip(storm["time_to_s"].items(), ("--", "-.", ":")):
        if seconds is not None:
            clients.axvline(seconds, linestyle=style, color="black", alpha=0.6,
                            label=f"{label}% back: {seconds:.1f} s")
    clients.set(title=f"{storm['connections']:,} clients, server restarted at 0 s "
                f"({storm['trigger']})", ylabel="clients")
    trouble.plot(line["t"], line["attempts"], "-", color="tab:blue",
                 label="reconnection attempts")
    trouble.plot(line["t"], line["refused"], "-", color="tab:orange", label="refused")
    trouble.plot(line["t"], line["errors"], "-", color="tab:red", label="errors")
    trouble.set(title="reconnections so far", xlabel="seconds after the restart",
                ylabel="count")
    _save(figure, (clients, trouble), path, plt)
