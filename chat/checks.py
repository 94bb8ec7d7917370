"""Host checks: what in the kernel or the limits stops N websockets, and how to fix each.

In the 2015 experiment most of the time went into discovering these one by one (ulimit,
a full conntrack table, SYN-flood protection, 64k ports per source address). Each check
here is a pure function of a /proc tree (``root``) and a few numbers, and returns a
``Check``: OK, or the problem and the exact command that fixes it. ``fatal`` marks the
problems that make the planned load impossible; the others only distort it.
``setting`` names the sysctl and value that fix it, for ``greenchat doctor --apply``.

``greenchat doctor`` (chat/doctor.py) sizes them for a target number of connections;
``greenchat bench`` (chat/bench/preflight.py) for the run it plans. A ``recommended``
argument is the value to advise when it is enough (the doctor's table, also written to
deploy/sysctl.d); without it the fix is the smallest round value that fits.

A library leaf: it reads the machine through ``chat.system`` only.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .system import PAGE_SIZE, read_meminfo, read_open_files_limit, read_sysctl

__all__ = ["Check", "check_open_files", "check_nr_open", "check_somaxconn",
           "check_syn_backlog", "check_conntrack", "check_port_range", "check_source_addresses",
           "check_file_max", "check_tcp_mem", "check_socket_buffers", "check_max_map_count",
           "check_memory", "check_tcp_ehash", "tcp_ehash_buckets", "check_kernel_log",
           "has_capability", "port_range", "CAP_SYS_RESOURCE", "KERNEL_KB_PER_SOCKET",
           "EHASH_CHAIN_MAX"]

# Kernel memory per idle TCP socket (socket, inode, dentry, file, epoll entry), measured
# on loopback (docs/design.md): ~8.4 KB per connection, i.e. both of its sockets, plus
# ~1.8 KB the VM adds. Shown as Slab in /proc/meminfo, in no process's RSS.
KERNEL_KB_PER_SOCKET = 5.0
# The capability that lets a process raise its hard RLIMIT_NOFILE (linux/capability.h).
CAP_SYS_RESOURCE = 24
# Sockets per bucket of the kernel's table of established TCP connections above which the
# lookup every packet makes walks a chain long enough to cost: at a million loopback
# connections on 262,144 buckets (2M sockets, ~8 a bucket) it was 7% of the machine's
# samples during a broadcast, and a 2M-bucket table took the broadcast from 25.6 to 19.6 s
# (BENCHMARKS.md, "Issue 12, fourth pass").
EHASH_CHAIN_MAX = 2
_PAGE_KB = PAGE_SIZE // 1024


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str  # what was found, and what goes wrong when not ok
    fix: str = ""  # the command (or setting) that fixes it
    fatal: bool = False  # the planned run cannot succeed until it is fixed
    # (sysctl, value) that fixes it, written by ``greenchat doctor --apply``
    setting: tuple[str, str] | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        if self.ok:
            return f"{self.name}: OK ({self.detail})"
        return f"{self.name}: {self.detail}" + (f"; fix: {self.fix}" if self.fix else "")


def _int_sysctl(name: str, root: Path) -> int | None:
    value = read_sysctl(name, root)
    return int(value) if value is not None and value.strip().isdigit() else None


def _ints_sysctl(name: str, root: Path) -> list[int] | None:
    """A sysctl of several numbers (``tcp_mem``, ``ip_local_port_range``)."""
    value = read_sysctl(name, root)
    try:
        return [int(field) for field in value.split()] if value else None
    except ValueError:
        return None


def _power_of_two_at_least(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def _raise(name: str, value: int | str) -> tuple[str, tuple[str, str]]:
    """The command and the --apply setting that set sysctl ``name`` to ``value``."""
    text = str(value)
    quoted = f"'{text}'" if " " in text else text
    return f"sysctl -w {name}={quoted}", (name, text)


def _fix_value(need: int, recommended: int | None, fallback: int) -> int:
    """The recommended value when it covers the need, else ``fallback``."""
    return recommended if recommended is not None and recommended >= need else fallback


def has_capability(root: Path, bit: int, pid: int | str = "self") -> bool | None:
    """Whether ``pid``'s effective capabilities (CapEff in its status file) hold ``bit``;
    None when unreadable."""
    try:
        status = (root / str(pid) / "status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    return None


def check_open_files(root: Path, per_process: int, reserved: int = 64,
                     fewer: str = "plan fewer connections per worker") -> Check:
    """One socket per connection: can one process open ``per_process`` of them?

    Only a process with CAP_SYS_RESOURCE can raise its hard limit (root without it
    cannot), so the fix says whether ``ulimit -Hn`` can work from here.
    """
    soft, hard = read_open_files_limit(root)
    needed = per_process + reserved
    if hard == -1 or hard >= needed:
        raised = ("" if soft == -1 or soft >= needed
                  else ", soft limit raised to hard by each worker")
        return Check("open files", True,
                     f"soft {soft}, hard {hard} per process; {per_process} sockets planned "
                     f"per worker{raised}")
    capable = has_capability(root, CAP_SYS_RESOURCE)
    if capable is False:
        how = (f"this process lacks CAP_SYS_RESOURCE (CapEff bit {CAP_SYS_RESOURCE} clear), "
               f"so ulimit -Hn {needed} fails here even as root: start the server from "
               f"a manager that has it (LimitNOFILE={needed} in a systemd unit, nofile in "
               "/etc/security/limits.conf)")
    else:
        how = (f"ulimit -Hn {needed} as root (or nofile in /etc/security/limits.conf, "
               f"LimitNOFILE={needed} for a systemd unit)")
    return Check("open files", False,
                 f"hard limit {hard} per process (soft {soft}) is below the {needed} files a "
                 f"worker with {per_process} connections needs", f"{how}; or {fewer}",
                 fatal=True)


def check_nr_open(root: Path, per_process: int, recommended: int | None = None) -> Check:
    """fs.nr_open caps any process's hard open-files limit, even for root."""
    value = _int_sysctl("fs.nr_open", root)
    if value is None or value >= per_process:
        return Check("fs.nr_open", True, f"{value}: a process may raise its hard open-files "
                     f"limit to it; {per_process} needed by the busiest process")
    fix, setting = _raise("fs.nr_open", _fix_value(per_process, recommended,
                                                   _power_of_two_at_least(per_process)))
    return Check("fs.nr_open", False,
                 f"{value} caps every process's open-files limit below the {per_process} "
                 "one process needs", fix, setting=setting)


def check_somaxconn(root: Path, in_flight: int, recommended: int | None = None) -> Check:
    """The listen backlog the kernel grants caps the handshakes a server can queue."""
    value = _int_sysctl("net.core.somaxconn", root)
    if value is None or value >= in_flight:
        return Check("net.core.somaxconn", True, f"{value}, {in_flight} handshakes in flight")
    fix, setting = _raise("net.core.somaxconn", _fix_value(
        in_flight, recommended, _power_of_two_at_least(in_flight)))
    return Check("net.core.somaxconn", False,
                 f"{value} is below the {in_flight} handshakes in flight: a local server's "
                 "accept queue overflows, SYNs are dropped and retried after 1 s",
                 fix, setting=setting)


def check_syn_backlog(root: Path, in_flight: int, recommended: int | None = None) -> Check:
    value = _int_sysctl("net.ipv4.tcp_max_syn_backlog", root)
    if value is None or value >= in_flight:
        return Check("net.ipv4.tcp_max_syn_backlog", True,
                     f"{value}, {in_flight} handshakes in flight")
    fix, setting = _raise("net.ipv4.tcp_max_syn_backlog", _fix_value(
        in_flight, recommended, _power_of_two_at_least(in_flight)))
    return Check("net.ipv4.tcp_max_syn_backlog", False,
                 f"{value} is below the {in_flight} handshakes in flight: half-open "
                 "connections are dropped or answered with SYN cookies", fix, setting=setting)


def check_conntrack(root: Path, connections: int,
                    recommended: int | None = None) -> Check | None:
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
    need = count + connections
    fix, setting = _raise("net.netfilter.nf_conntrack_max", _fix_value(
        need, recommended, _power_of_two_at_least(need)))
    return Check("net.netfilter.nf_conntrack_max", False,
                 f"connection tracking is active ({count} in use) and {maximum} entries "
                 f"cannot hold {connections} more: the kernel drops new connections "
                 "(dmesg: nf_conntrack: table full)", fix, fatal=True, setting=setting)


def port_range(root: Path) -> tuple[int, int] | None:
    """net.ipv4.ip_local_port_range as (low, high); None when unreadable."""
    value = _ints_sysctl("net.ipv4.ip_local_port_range", root)
    return (value[0], value[1]) if value and len(value) == 2 else None


def check_port_range(root: Path, per_source: int) -> Check:
    """Each (source address, destination) pair has at most the local port range's ports."""
    found = port_range(root)
    if found is None:
        return Check("net.ipv4.ip_local_port_range", True, "unreadable, not checked")
    low, high = found
    ports = high - low + 1
    if per_source <= ports:
        return Check("net.ipv4.ip_local_port_range", True,
                     f"{low}-{high}: {ports} ports, {per_source} connections planned per "
                     "source address")
    return Check("net.ipv4.ip_local_port_range", False,
                 f"{low}-{high} gives {ports} ports per source address and destination, "
                 f"{per_source} connections planned from each",
                 "sysctl -w net.ipv4.ip_local_port_range='1024 65535', or give more "
                 "source addresses (--source)", fatal=True,
                 setting=("net.ipv4.ip_local_port_range", "1024 65535"))


def check_source_addresses(root: Path, connections: int, widest: tuple[int, int]) -> Check:
    """How many source addresses a load test from this machine needs for ``connections``.

    Informational: tools spread connections over addresses themselves (greenchat bench
    picks 127.0.0.2 and up; tsung needs one <ip> each). The ``widest`` range needs fewer.
    """
    found = port_range(root)
    if found is None:
        return Check("net.ipv4.ip_local_port_range", True, "unreadable, not checked")
    low, high = found
    ports = high - low + 1
    needed = math.ceil(connections / ports)
    widest_needed = math.ceil(connections / (widest[1] - widest[0] + 1))
    last = ipaddress.IPv4Address("127.0.0.2") + needed - 1
    detail = (f"{low}-{high}: {ports} ports per source address and server port, so a load "
              f"test of {connections} from this machine needs {needed} source address"
              f"{'es' if needed > 1 else ''} (127.0.0.2"
              f"{'-' + str(last) if needed > 1 else ''}; greenchat bench spreads over them "
              "itself, tsung needs one <ip> each)")
    if widest_needed < needed:
        detail += (f"; '{widest[0]} {widest[1]}' would need {widest_needed} "
                   f"(sysctl -w net.ipv4.ip_local_port_range='{widest[0]} {widest[1]}')")
    return Check("net.ipv4.ip_local_port_range", True, detail)


def check_file_max(root: Path, sockets: int, recommended: int | None = None) -> Check:
    """System-wide open files: every socket on this machine (both ends on loopback)."""
    value = read_sysctl("fs.file-nr", root)
    if value is None:
        return Check("fs.file-max", True, "unreadable, not checked")
    allocated, _free, maximum = (int(field) for field in value.split())
    if maximum - allocated >= sockets:
        return Check("fs.file-max", True, f"{maximum}, {allocated} open, {sockets} planned")
    fix, setting = _raise("fs.file-max", _fix_value(allocated + sockets, recommended,
                                                   allocated + 2 * sockets))
    return Check("fs.file-max", False,
                 f"{maximum} files system-wide, {allocated} open: no room for {sockets} "
                 "more sockets", fix, fatal=True, setting=setting)


def check_tcp_mem(root: Path, connections: int,
                  recommended: tuple[int, int, int] | None = None) -> Check:
    """net.ipv4.tcp_mem (pages, all sockets together) against one queued page each.

    An idle socket holds no buffer, but one unread message costs a page of accounting
    (measured: ~4 KB per socket, docs/design.md). Past the middle value ("pressure") the
    kernel shrinks buffers; past the last it drops data: a broadcast to a million slow
    readers needs a million pages below the pressure mark.
    """
    value = _ints_sysctl("net.ipv4.tcp_mem", root)
    if not value or len(value) != 3:
        return Check("net.ipv4.tcp_mem", True, "unreadable, not checked")
    low, pressure, high = value
    gb = _PAGE_KB / 1024 / 1024
    if pressure >= connections:
        return Check("net.ipv4.tcp_mem", True,
                     f"{low} {pressure} {high} pages: pressure at {pressure * gb:.1f} GB, "
                     f"one queued page for each of {connections} connections fits")
    wanted = recommended or (connections * 3 // 4, connections, connections * 3 // 2)
    if wanted[1] < connections:
        wanted = (connections * 3 // 4, connections, connections * 3 // 2)
    new = tuple(max(old, want) for old, want in zip(value, wanted))
    fix, setting = _raise("net.ipv4.tcp_mem", " ".join(str(n) for n in new))
    return Check("net.ipv4.tcp_mem", False,
                 f"{low} {pressure} {high} pages: TCP memory pressure starts at "
                 f"{pressure * gb:.1f} GB, below one queued page for each of {connections} "
                 f"connections ({connections * gb:.1f} GB): a broadcast to slow readers "
                 "makes the kernel shrink every buffer and then drop data", fix,
                 setting=setting)


def check_socket_buffers(root: Path, connections: int) -> Check:
    """tcp_rmem / tcp_wmem: what one socket may queue; tcp_mem caps the sum (informational)."""
    rmem = _ints_sysctl("net.ipv4.tcp_rmem", root)
    wmem = _ints_sysctl("net.ipv4.tcp_wmem", root)
    if not rmem or not wmem or len(rmem) != 3 or len(wmem) != 3:
        return Check("net.ipv4.tcp_rmem/tcp_wmem", True, "unreadable, not checked")
    worst = connections * (rmem[1] + wmem[1]) / 1024 ** 3
    return Check("net.ipv4.tcp_rmem/tcp_wmem", True,
                 f"default {rmem[1]} B read, {wmem[1]} B write per socket; idle sockets hold "
                 f"none, and if all {connections} filled their defaults ({worst:.0f} GB) "
                 "tcp_mem's limit above is what stops them")


def check_max_map_count(root: Path, need: int, recommended: int | None = None) -> Check:
    """vm.max_map_count: memory mappings one process may have (allocator arenas, carriers)."""
    value = _int_sysctl("vm.max_map_count", root)
    if value is None or value >= need:
        return Check("vm.max_map_count", True, f"{value}, {need} wanted")
    fix, setting = _raise("vm.max_map_count", _fix_value(need, recommended,
                                                         _power_of_two_at_least(need)))
    return Check("vm.max_map_count", False,
                 f"{value} memory mappings per process, below the {need} wanted: a process "
                 "whose heap grows in mappings fails its next one with ENOMEM", fix,
                 setting=setting)


def tcp_ehash_buckets(sockets: int) -> int:
    """A TCP table with a bucket for each of ``sockets`` (the kernel wants a power of two)."""
    return _power_of_two_at_least(sockets)


def check_tcp_ehash(root: Path, sockets: int) -> Check | None:
    """The kernel's hash table of established TCP sockets against the sockets planned.

    Every packet received looks its socket up in one bucket's chain. The table is sized
    at boot from the memory (262,144 buckets on a 24 GB machine) and cannot be resized;
    past ``EHASH_CHAIN_MAX`` sockets a bucket each lookup walks cold sockets, and every
    message, ping and handshake pays for it. A network namespace made after
    ``net.ipv4.tcp_child_ehash_entries`` is set gets a table of its own of that size
    (Linux 6.1+), which is how ``bench/one_box.py --netns`` runs. None when the kernel
    does not show the size (``net.ipv4.tcp_ehash_entries``, before 6.1).
    """
    value = read_sysctl("net.ipv4.tcp_ehash_entries", root)
    try:
        buckets = abs(int(value)) if value is not None else 0  # negative: shared with the host
    except ValueError:
        buckets = 0
    if not buckets:
        return None
    if sockets <= buckets * EHASH_CHAIN_MAX:
        return Check("net.ipv4.tcp_ehash_entries", True,
                     f"{buckets} buckets for {sockets} sockets planned")
    want = tcp_ehash_buckets(sockets)
    return Check("net.ipv4.tcp_ehash_entries", False,
                 f"{buckets} buckets for {sockets} sockets: ~{round(sockets / buckets)} a bucket, "
                 "and every packet's lookup walks them (set at boot, not resizable)",
                 f"boot with thash_entries={want}, or run server and clients in a network "
                 f"namespace made after sysctl -w net.ipv4.tcp_child_ehash_entries={want}")


def check_memory(root: Path, connections: int, kb_per_connection: float,
                 base_kb: int = 0, counted: str = "kernel sockets and the generator; the "
                 "server's own memory not counted") -> Check:
    """MemAvailable against the planned size: ``kb_per_connection`` each plus ``base_kb``."""
    available = read_meminfo(root).get("MemAvailable")
    needed = math.ceil(connections * kb_per_connection) + base_kb
    if available is None:
        return Check("memory", True, "MemAvailable unreadable, not checked")
    if available >= needed:
        return Check("memory", True, f"{available // 1024} MB available, ~{needed // 1024} MB "
                     f"planned ({counted})")
    return Check("memory", False,
                 f"{available // 1024} MB available but {connections} connections need "
                 f"~{needed // 1024} MB ({kb_per_connection:.1f} KB each: {counted})",
                 "plan fewer connections, or run the generator on another machine",
                 fatal=True)


# Kernel messages that name a limit this module checks, and the setting behind each.
KERNEL_LOG_SIGNS = (
    ("nf_conntrack: table full", "net.netfilter.nf_conntrack_max",
     "the connection-tracking table was full and new connections were dropped"),
    ("Possible SYN flooding", "net.core.somaxconn and net.ipv4.tcp_max_syn_backlog",
     "a listen queue overflowed and the kernel answered with SYN cookies or dropped SYNs"),
    ("TCP: out of memory", "net.ipv4.tcp_mem",
     "TCP ran out of its memory allowance and dropped data"),
    ("file-max limit", "fs.file-max", "the system ran out of file handles"),
)


def _log_time(line: str) -> float | None:
    """Seconds since boot of a ``dmesg`` line ("[  123.456789] ..."), None without one."""
    if line.startswith("["):
        stamp = line[1:].partition("]")[0].strip()
        try:
            return float(stamp)
        except ValueError:
            return None
    return None


def check_kernel_log(lines: list[str], uptime_s: float | None,
                     window_s: float = 3600.0) -> list[Check]:
    """The kernel's own word that a limit was hit in the last ``window_s`` seconds.

    Older lines are history (the limit may have been raised since) and only counted;
    lines without a timestamp count as recent.
    """
    checks = []
    older = 0
    for sign, setting, meaning in KERNEL_LOG_SIGNS:
        recent = []
        for line in lines:
            if sign not in line:
                continue
            stamp = _log_time(line)
            if stamp is None or uptime_s is None or uptime_s - stamp <= window_s:
                recent.append(line.strip())
            else:
                older += 1
        if recent:
            checks.append(Check(f"kernel log: {sign}", False,
                                f"{len(recent)} line(s) in the last {window_s / 60:.0f} min: "
                                f"{meaning}; last: {recent[-1][:160]}",
                                f"raise {setting} (see its line)"))
    if not checks:
        signs = ", ".join(repr(sign) for sign, _, _ in KERNEL_LOG_SIGNS)
        checks.append(Check("kernel log", True,
                            f"none of {signs} in the last {window_s / 60:.0f} min"
                            + (f" ({older} older)" if older else "")))
    return checks
