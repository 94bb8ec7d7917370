"""Before a large run: what in the kernel or the limits will stop it, and how to fix each.

In the 2015 experiment most of the time went into discovering these one by one (ulimit,
a full conntrack table, SYN-flood protection, 64k ports per source address). Each check
here is a pure function of a /proc tree (``root``) and the plan's numbers, and returns a
``Check``: OK, or the problem and the exact command that fixes it. ``fatal`` marks the
problems that make the planned run impossible; the others only distort it.
``greenchat doctor`` can run the same checks with its own numbers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .procfs import PROC, read_meminfo, read_open_files_limit, read_sysctl

__all__ = ["Check", "check_open_files", "check_somaxconn", "check_syn_backlog",
           "check_conntrack", "check_port_range", "check_file_max", "check_memory",
           "run_checks", "KERNEL_KB_PER_SOCKET"]

# Kernel memory per idle TCP socket (socket, inode, dentry, file, epoll entry), measured
# in ../shared/DESIGN.md: ~8.4 KB per loopback connection, i.e. both of its sockets, plus
# ~1.8 KB the VM adds. Shown as Slab in /proc/meminfo, in no process's RSS.
KERNEL_KB_PER_SOCKET = 5.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str  # what was found, and what goes wrong when not ok
    fix: str = ""  # the command (or setting) that fixes it
    fatal: bool = False  # the planned run cannot succeed until it is fixed

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        if self.ok:
            return f"{self.name}: OK ({self.detail})"
        return f"{self.name}: {self.detail}" + (f"; fix: {self.fix}" if self.fix else "")


def _int_sysctl(name: str, root: Path) -> int | None:
    value = read_sysctl(name, root)
    return int(value) if value is not None and value.strip().isdigit() else None


def _power_of_two_at_least(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def check_open_files(root: Path, per_process: int, reserved: int = 64) -> Check:
    """One socket per connection: can one process open ``per_process`` of them?"""
    soft, hard = read_open_files_limit(root)
    needed = per_process + reserved
    if hard == -1 or hard >= needed:
        raised = ("" if soft == -1 or soft >= needed
                  else ", soft limit raised to hard by each worker")
        return Check("open files", True,
                     f"soft {soft}, hard {hard} per process; {per_process} sockets planned "
                     f"per worker{raised}")
    return Check("open files", False,
                 f"hard limit {hard} per process is below the {needed} files a worker with "
                 f"{per_process} connections needs",
                 f"ulimit -Hn {needed} as root (or nofile in /etc/security/limits.conf, "
                 "LimitNOFILE= for a systemd unit); or plan fewer connections per worker",
                 fatal=True)


def check_somaxconn(root: Path, in_flight: int) -> Check:
    """The listen backlog the kernel grants caps the handshakes a server can queue."""
    value = _int_sysctl("net.core.somaxconn", root)
    if value is None or value >= in_flight:
        return Check("net.core.somaxconn", True, f"{value}, {in_flight} handshakes in flight")
    return Check("net.core.somaxconn", False,
                 f"{value} is below the {in_flight} handshakes in flight: a local server's "
                 "accept queue overflows, SYNs are dropped and retried after 1 s",
                 f"sysctl -w net.core.somaxconn={_power_of_two_at_least(in_flight)}")


def check_syn_backlog(root: Path, in_flight: int) -> Check:
    value = _int_sysctl("net.ipv4.tcp_max_syn_backlog", root)
    if value is None or value >= in_flight:
        return Check("net.ipv4.tcp_max_syn_backlog", True,
                     f"{value}, {in_flight} handshakes in flight")
    return Check("net.ipv4.tcp_max_syn_backlog", False,
                 f"{value} is below the {in_flight} handshakes in flight: half-open "
                 "connections are dropped or answered with SYN cookies",
                 f"sysctl -w net.ipv4.tcp_max_syn_backlog={_power_of_two_at_least(in_flight)}")


def check_conntrack(root: Path, connections: int) -> Check | None:
    """Netfilter tracks every connection once a firewall rule needs it; None if absent."""
    maximum = _int_sysctl("net.netfilter.nf_conntrack_max", root)
    if maximum is None:
        return None
    count = _int_sysctl("net.netfilter.nf_conntrack_count", root) or 0
    if count == 0:
        return Check("net.netfilter.nf_conntrack_max", True,
                     f"conntrack present but tracking nothing (count 0, max {maximum})")
    if maximum - count >= connections:
        return Check("net.netfilter.nf_conntrack_max", True,
                     f"{maximum}, {count} in use, {connections} planned")
    return Check("net.netfilter.nf_conntrack_max", False,
                 f"connection tracking is active ({count} in use) and {maximum} entries "
                 f"cannot hold {connections} more: the kernel drops new connections "
                 "(dmesg: nf_conntrack: table full)",
                 f"sysctl -w net.netfilter.nf_conntrack_max="
                 f"{_power_of_two_at_least(count + connections)}", fatal=True)


def check_port_range(root: Path, per_source: int) -> Check:
    """Each (source address, destination) pair has at most the local port range's ports."""
    value = read_sysctl("net.ipv4.ip_local_port_range", root)
    if value is None:
        return Check("net.ipv4.ip_local_port_range", True, "unreadable, not checked")
    low, high = (int(field) for field in value.split())
    ports = high - low + 1
    if per_source <= ports:
        return Check("net.ipv4.ip_local_port_range", True,
                     f"{low}-{high}: {ports} ports, {per_source} connections planned per "
                     "source address")
    return Check("net.ipv4.ip_local_port_range", False,
                 f"{low}-{high} gives {ports} ports per source address and destination, "
                 f"{per_source} connections planned from each",
                 "sysctl -w net.ipv4.ip_local_port_range='1024 65535', or give more "
                 "source addresses (--source)", fatal=True)


def check_file_max(root: Path, sockets: int) -> Check:
    """System-wide open files: every socket on this machine (both ends on loopback)."""
    value = read_sysctl("fs.file-nr", root)
    if value is None:
        return Check("fs.file-max", True, "unreadable, not checked")
    allocated, _free, maximum = (int(field) for field in value.split())
    if maximum - allocated >= sockets:
        return Check("fs.file-max", True, f"{maximum}, {allocated} open, {sockets} planned")
    return Check("fs.file-max", False,
                 f"{maximum} files system-wide, {allocated} open: no room for {sockets} "
                 "more sockets", f"sysctl -w fs.file-max={allocated + 2 * sockets}",
                 fatal=True)


def check_memory(root: Path, connections: int, kb_per_connection: float) -> Check:
    """MemAvailable against the planned size (kernel sockets + the generator)."""
    available = read_meminfo(root).get("MemAvailable")
    needed = math.ceil(connections * kb_per_connection)
    if available is None:
        return Check("memory", True, "MemAvailable unreadable, not checked")
    if available >= needed:
        return Check("memory", True, f"{available // 1024} MB available, ~{needed // 1024} MB "
                     "planned (kernel sockets and the generator; the server's own memory "
                     "not counted)")
    return Check("memory", False,
                 f"{available // 1024} MB available but {connections} connections need "
                 f"~{needed // 1024} MB ({kb_per_connection:.1f} KB each for kernel sockets "
                 "and the generator, before the server's own memory)",
                 "plan fewer connections, or run the generator on another machine",
                 fatal=True)


def run_checks(*, connections: int, per_process: int, in_flight: int, per_source: int,
               sockets_per_connection: int = 2, generator_kb_per_connection: float = 1.5,
               root: Path = PROC) -> list[Check]:
    """Every check for a planned run. ``sockets_per_connection`` is 2 when the server is
    on this machine (loopback), 1 when only the client end is here."""
    sockets = connections * sockets_per_connection
    checks = [
        check_open_files(root, per_process),
        check_somaxconn(root, in_flight),
        check_syn_backlog(root, in_flight),
        check_conntrack(root, connections),
        check_port_range(root, per_source),
        check_file_max(root, sockets),
        check_memory(root, connections, generator_kb_per_connection
                     + KERNEL_KB_PER_SOCKET * sockets_per_connection),
    ]
    return [check for check in checks if check is not None]
