"""``greenchat doctor``: is this machine ready for N concurrent websockets, and if not,
what exactly to change.

The 2015 experiment that held ~500k websockets spent most of its time finding its walls
one at a time: open files, a full conntrack table, SYN-flood protection, 64k ports per
source address, TCP memory. The doctor reads every one of them at once (through a /proc
root, so tests use a fake tree), says OK or gives the command that fixes it, and with
``--apply`` writes the sysctls it recommends. The checks themselves are ``chat.checks``,
shared with ``greenchat bench``; this module sizes them for a target and keeps the table
of recommended values that deploy/sysctl.d/90-greenchat.conf is printed from
(``--sysctl-conf``). It reads the machine through ``chat.system`` only, never through the
load generator.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from .checks import (KERNEL_KB_PER_SOCKET, Check, check_conntrack, check_file_max,
                     check_kernel_log, check_max_map_count, check_memory, check_nr_open,
                     check_open_files, check_socket_buffers, check_somaxconn,
                     check_source_addresses, check_syn_backlog, check_tcp_ehash,
                     check_tcp_mem)
from .system import PROC, RESERVED_FDS, read_open_files_limit, sysctl_path

__all__ = ["Target", "Setting", "Change", "recommended", "run_checks", "apply",
           "sysctl_conf", "read_kernel_log", "main", "DEFAULT_CONNECTIONS"]

# The project's goal, measured on one 2-core box (BENCHMARKS.md), and twice the 2015
# experiment: the number deploy/sysctl.d is sized for.
DEFAULT_CONNECTIONS = 1_000_000
# Measured (BENCHMARKS.md, one-box runs): server RSS per connection above the workers'
# idle RSS, each worker's idle interpreter, and greenchat bench's RSS per connection.
SERVER_KB_PER_CONNECTION = 0.64
WORKER_IDLE_KB = 41 * 1024
GENERATOR_KB_PER_CONNECTION = 0.21
# The widest ephemeral port range that leaves the well-known ports alone.
WIDEST_PORT_RANGE = (1024, 65535)
# Kernel log lines older than this are history: the limit may have been raised since.
KERNEL_LOG_WINDOW_S = 3600.0
_SOMAXCONN_MAX = 65535  # listen()'s backlog is capped here on older kernels


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


@dataclass(frozen=True)
class Target:
    """What the machine should carry: ``connections`` spread over ``workers`` server
    processes, with the clients on this machine (a loopback load test) or elsewhere."""

    connections: int = DEFAULT_CONNECTIONS
    workers: int = 1
    local_clients: bool = True

    @property
    def per_process(self) -> int:
        """Files the busiest server process needs: its clients and its own."""
        return math.ceil(self.connections / self.workers) + RESERVED_FDS

    @property
    def sockets(self) -> int:
        """Sockets on this machine: both ends of every connection on loopback."""
        return self.connections * (2 if self.local_clients else 1)

    @property
    def backlog(self) -> int:
        """Handshakes the kernel should queue: a reconnect storm after a restart brings
        every client back within seconds; 1 % of them waiting at once, 128 at least."""
        return min(_SOMAXCONN_MAX, max(128, self.connections // 100))

    @property
    def map_count(self) -> int:
        """Memory mappings to allow one process. Not a measured need of greenchat (its
        heap of ~0.6 KB a client grows in 1 MiB arenas): headroom for allocators and load
        tools that map per connection or per thread, one per 4 connections, and never
        below the kernel's default."""
        return max(65530, self.connections // 4)

    def describe(self) -> str:
        processes = f"{self.workers} server process{'es' if self.workers > 1 else ''}"
        clients = ("clients on this machine over loopback" if self.local_clients
                   else "clients on other machines")
        return f"{self.connections:,} connections, {processes}, {clients}"


@dataclass(frozen=True)
class Setting:
    """One recommended sysctl: its value for the target, and why."""

    name: str
    value: str
    why: str
    optional: bool = False  # absent on kernels without the module (conntrack)


def recommended(target: Target) -> list[Setting]:
    """The sysctls for ``endpoint``: enough with room to spare, never below the usual
    kernel defaults, so a file printed for a small target lowers nothing."""
    n = target.connections
    tcp_pages = max(1 << 18, _pow2(n))
    backlog = min(_SOMAXCONN_MAX, max(4096, _pow2(target.backlog)))
    return [
        Setting("fs.file-max", str(max(1 << 20, _pow2(2 * target.sockets))),
                f"Open files system-wide: one per socket, {target.sockets:,} sockets "
                f"({'both ends on loopback' if target.local_clients else 'server side'}), "
                "doubled for headroom."),
        Setting("fs.nr_open", str(max(1 << 20, _pow2(target.per_process))),
                "Ceiling of any process's open-files limit (LimitNOFILE= cannot exceed "
                f"it): the busiest server process holds {target.per_process:,} files."),
        Setting("net.core.somaxconn", str(backlog),
                "Accept queue per listening socket: after a restart every client "
                "reconnects within seconds; the kernel must queue ~1 % of them while the "
                "server accepts (too small: 'Possible SYN flooding' in dmesg)."),
        Setting("net.ipv4.tcp_max_syn_backlog", str(backlog),
                "Half-open connections queued, sized like somaxconn."),
        Setting("net.netfilter.nf_conntrack_max", str(max(1 << 18, _pow2(n + n // 4))),
                "Once a firewall rule loads conntrack, every connection takes an entry "
                "(~300 bytes); a full table drops new connections ('nf_conntrack: table "
                "full'). The leading '-' ignores it where the module is not loaded.",
                optional=True),
        Setting("net.ipv4.ip_local_port_range", f"{WIDEST_PORT_RANGE[0]} {WIDEST_PORT_RANGE[1]}",
                "Ports per source address and server port for a load test from this "
                f"machine: {WIDEST_PORT_RANGE[1] - WIDEST_PORT_RANGE[0] + 1:,} instead of "
                f"28,232, so {math.ceil(n / 64512)} source addresses carry {n:,} "
                "instead of " f"{math.ceil(n / 28232)}. Reserve any service port inside "
                "it with net.ipv4.ip_local_reserved_ports."),
        Setting("net.ipv4.tcp_mem",
                f"{tcp_pages * 3 // 4} {tcp_pages} {tcp_pages * 3 // 2}",
                "TCP memory in pages for all sockets (low, pressure, max): one unread "
                "message costs a socket one 4 KB page of accounting, so a broadcast to "
                f"{n:,} slow readers needs {n:,} pages below the pressure mark."),
        Setting("vm.max_map_count", str(_pow2(target.map_count)),
                "Memory mappings per process: headroom for allocators and load tools "
                "(one per 4 connections), not a measured need of greenchat."),
    ]


def run_checks(target: Target, root: Path = PROC,
               kernel_log: list[str] | None = None) -> list[Check]:
    """Every check for ``endpoint`` against the tree at ``root``, in the order printed."""
    table = {setting.name: setting.value for setting in recommended(target)}
    soft, hard = read_open_files_limit(root)
    per_worker = max(1, (hard if hard > 0 else target.per_process) - RESERVED_FDS)
    workers_needed = math.ceil(target.connections / per_worker)
    checks = [
        check_open_files(root, target.per_process - RESERVED_FDS, reserved=RESERVED_FDS,
                         fewer=f"spread them over {workers_needed} gunicorn workers with "
                         f"CHAT_REDIS_URL (greenchat doctor --workers {workers_needed})"),
        check_nr_open(root, target.per_process, int(table["fs.nr_open"])),
        check_file_max(root, target.sockets, int(table["fs.file-max"])),
        check_somaxconn(root, target.backlog, int(table["net.core.somaxconn"])),
        check_syn_backlog(root, target.backlog, int(table["net.ipv4.tcp_max_syn_backlog"])),
        check_conntrack(root, target.connections, int(table["net.netfilter.nf_conntrack_max"]))
        or Check("net.netfilter.nf_conntrack_max", True,
                 "conntrack inactive (module not loaded): connections are not tracked"),
    ]
    if target.local_clients:
        checks.append(check_source_addresses(root, target.connections, WIDEST_PORT_RANGE))
    else:
        checks.append(Check("net.ipv4.ip_local_port_range", True,
                            "clients on other machines: their port ranges matter, not "
                            "this one's"))
    tcp_mem = tuple(int(field) for field in table["net.ipv4.tcp_mem"].split())
    checks += [
        check_tcp_mem(root, target.connections, tcp_mem),  # type: ignore[arg-type]
        check_socket_buffers(root, target.connections),
        check_max_map_count(root, target.map_count, int(table["vm.max_map_count"])),
        _check_memory(root, target),
    ]
    ehash = check_tcp_ehash(root, target.sockets)
    if ehash is not None:
        checks.append(ehash)
    if kernel_log is None:
        checks.append(Check("kernel log", True, "unreadable, not checked"))
    else:
        checks += check_kernel_log(kernel_log, _uptime(root), KERNEL_LOG_WINDOW_S)
    return checks


def _check_memory(root: Path, target: Target) -> Check:
    kernel_kb = KERNEL_KB_PER_SOCKET * (2 if target.local_clients else 1)
    per_connection = kernel_kb + SERVER_KB_PER_CONNECTION
    counted = (f"kernel {kernel_kb:g} KB"
               f"{' for both loopback sockets' if target.local_clients else ''}, server "
               f"{SERVER_KB_PER_CONNECTION} KB")
    if target.local_clients:
        per_connection += GENERATOR_KB_PER_CONNECTION
        counted += f", greenchat bench {GENERATOR_KB_PER_CONNECTION} KB"
    counted += f"; plus {WORKER_IDLE_KB // 1024} MB per server process"
    check = check_memory(root, target.connections, per_connection,
                         base_kb=target.workers * WORKER_IDLE_KB, counted=counted)
    if check.ok:
        return check
    return Check(check.name, False, check.detail,
                 "plan fewer connections per machine, or put the load generator on another "
                 "machine (--clients remote)")


def _uptime(root: Path) -> float | None:
    try:
        return float((root / "uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def read_kernel_log(max_lines: int = 20000, timeout: float = 5.0) -> list[str] | None:
    """The last ``max_lines`` of ``dmesg``; None when not permitted (dmesg_restrict) or
    not installed. Bounded in time and size: the ring buffer can be large."""
    try:
        result = subprocess.run(["dmesg"], capture_output=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.decode(errors="replace").splitlines()[-max_lines:]


@dataclass(frozen=True)
class Change:
    """One sysctl written by --apply: old -> new, or why it could not be."""

    sysctl: str
    old: str | None
    new: str
    error: str = ""

    def __str__(self) -> str:
        if self.error:
            return f"could not set {self.sysctl} to {self.new}: {self.error}"
        return f"changed {self.sysctl}: {self.old} -> {self.new}"


def apply(settings: list[tuple[str, str]], root: Path = PROC) -> list[Change]:
    """Write each (sysctl, value) under ``root``/sys, as ``sysctl -w`` would."""
    changes = []
    for name, value in settings:
        path = sysctl_path(name, root)
        try:
            old = " ".join(path.read_text().split())
            path.write_text(value + "\n")
            changes.append(Change(name, old, " ".join(path.read_text().split())))
        except OSError as error:
            changes.append(Change(name, None, value, error.strerror or str(error)))
    return changes


def sysctl_conf(target: Target) -> str:
    """A /etc/sysctl.d file with the recommended values and why each."""
    lines = [
        f"# greenchat: kernel settings for {target.describe()}.",
        f"# Printed by `greenchat doctor --connections {target.connections}"
        f"{f' --workers {target.workers}' if target.workers > 1 else ''}"
        f"{'' if target.local_clients else ' --clients remote'} --sysctl-conf`.",
        "# Install as /etc/sysctl.d/90-greenchat.conf and load with `sysctl --system`;",
        "# the open-files limit is per process: LimitNOFILE= in deploy/greenchat.service.",
    ]
    for setting in recommended(target):
        lines.append("")
        words, line = setting.why.split(), "#"
        for word in words:
            if len(line) + 1 + len(word) > 88:
                lines.append(line)
                line = "#"
            line += " " + word
        lines.append(line)
        lines.append(f"{'-' if setting.optional else ''}{setting.name} = {setting.value}")
    return "\n".join(lines) + "\n"


def _report_text(target: Target, checks: list[Check], changes: list[Change]) -> str:
    out = [f"greenchat doctor: {target.describe()}"]
    out += [str(change) for change in changes]
    for check in checks:
        if check.ok:
            out.append(f"OK    {check.name}: {check.detail}")
        else:
            out.append(f"FIX   {check.name}: {check.detail}")
            if check.fix:
                out.append(f"      -> {check.fix}")
    problems = [check for check in checks if not check.ok]
    if not problems:
        out.append(f"ready for {target.connections:,} connections")
    else:
        settable = sum(1 for check in problems if check.setting)
        hint = (f"; {settable} of them are sysctls: greenchat doctor --apply (root) writes "
                "them now, deploy/sysctl.d/90-greenchat.conf keeps them across reboots"
                if settable else "")
        out.append(f"not ready: {len(problems)} to fix{hint}")
    return "\n".join(out)


def main(target: Target, *, root: Path = PROC, apply_fixes: bool = False,
         as_json: bool = False, kernel_log_path: Path | None = None,
         print_conf: bool = False) -> int:
    """Print the report (or the sysctl.d file); 0 when ready for the target, 1 when not,
    2 when --apply is asked of a non-root user on the real /proc."""
    if print_conf:
        print(sysctl_conf(target), end="")
        return 0
    if apply_fixes and root == PROC and os.geteuid() != 0:
        print("greenchat doctor: --apply writes /proc/sys and needs root", file=sys.stderr)
        return 2
    if kernel_log_path is not None:
        kernel_log = kernel_log_path.read_text(errors="replace").splitlines()
    else:
        kernel_log = read_kernel_log() if root == PROC else None
    checks = run_checks(target, root, kernel_log)
    changes: list[Change] = []
    if apply_fixes:
        changes = apply([check.setting for check in checks
                         if not check.ok and check.setting is not None], root)
        if changes:
            checks = run_checks(target, root, kernel_log)
    ready = all(check.ok for check in checks)
    if as_json:
        print(json.dumps({"target": asdict(target), "ready": ready,
                          "checks": [check.to_dict() for check in checks],
                          "changes": [asdict(change) for change in changes]}, indent=2))
    else:
        print(_report_text(target, checks, changes))
    return 0 if ready else 1
