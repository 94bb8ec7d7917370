"""chat.system: machine facts read from a /proc tree (a fake one here, with the layouts
Linux writes), and the open-files limit of a real process."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from chat.system import (PAGE_SIZE, RESERVED_FDS, free_ports, listen_backlog, process_cpu_ns,
                         process_cpu_seconds, process_rss_bytes, read_meminfo,
                         read_open_files_limit, read_sysctl)

TICKS = os.sysconf("SC_CLK_TCK")
LIMITS_HEADER = "Limit                     Soft Limit           Hard Limit           Units\n"


def tree(root: Path, files: dict[str, str]) -> Path:
    """``root`` with each relative path holding its text."""
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_sysctl_is_read_from_its_dotted_name_and_is_none_when_absent(tmp_path):
    root = tree(tmp_path, {"sys/net/core/somaxconn": "4096\n",
                           "sys/net/ipv4/ip_local_port_range": "32768\t60999\n"})
    assert read_sysctl("net.core.somaxconn", root) == "4096"
    assert read_sysctl("net.ipv4.ip_local_port_range", root) == "32768\t60999"
    assert read_sysctl("net.netfilter.nf_conntrack_max", root) is None


def test_the_listen_backlog_is_somaxconn_or_the_default_when_unreadable(tmp_path):
    assert listen_backlog(root=tree(tmp_path / "a", {"sys/net/core/somaxconn": "16384\n"})) == 16384
    assert listen_backlog(root=tmp_path / "none") == 4096
    assert listen_backlog(512, root=tree(tmp_path / "b", {"sys/net/core/somaxconn": "x\n"})) == 512


def test_meminfo_is_kilobytes_by_name_and_empty_when_unreadable(tmp_path):
    root = tree(tmp_path, {"meminfo": "MemTotal:       24600000 kB\n"
                                      "MemAvailable:   20000000 kB\n"
                                      "HugePages_Total:       0\n"
                                      "Broken:\n"})
    assert read_meminfo(root) == {"MemTotal": 24_600_000, "MemAvailable": 20_000_000,
                                  "HugePages_Total": 0}
    assert read_meminfo(tmp_path / "none") == {}


def test_the_open_files_limit_of_a_process_is_soft_and_hard_with_unlimited_as_minus_one(tmp_path):
    root = tree(tmp_path, {
        "self/limits": LIMITS_HEADER + "Max open files            1024                 20000"
                                       "                files\n",
        "42/limits": LIMITS_HEADER + "Max open files            unlimited            unlimited"
                                     "            files\n",
        "43/limits": LIMITS_HEADER})
    assert read_open_files_limit(root) == (1024, 20000)
    assert read_open_files_limit(root, 42) == (-1, -1)
    with pytest.raises(ValueError, match="no 'Max open files' line"):
        read_open_files_limit(root, 43)


def test_rss_is_the_resident_pages_of_statm(tmp_path):
    root = tree(tmp_path, {"42/statm": "61234 10240 2048 1 0 9000 0\n"})
    assert process_rss_bytes(42, root) == 10240 * PAGE_SIZE
    with pytest.raises(OSError):
        process_rss_bytes(43, root)  # gone


def test_cpu_seconds_are_user_plus_system_ticks_even_with_a_parenthesis_in_the_name(tmp_path):
    fields = ["S"] + ["0"] * 10 + [str(3 * TICKS), str(TICKS // 2)] + ["0"] * 30
    root = tree(tmp_path, {"42/stat": f"42 (a (b) c) {' '.join(fields)}\n"})
    assert process_cpu_seconds(42, root) == pytest.approx(3.5, abs=1 / TICKS)


def test_cpu_nanoseconds_sum_every_thread_of_a_process(tmp_path):
    root = tree(tmp_path, {"42/task/42/schedstat": "1500000 200 7\n",
                           "42/task/43/schedstat": "2500000 100 3\n"})
    assert process_cpu_ns(42, root) == 4_000_000
    with pytest.raises(OSError):
        process_cpu_ns(44, root)  # gone


def test_this_process_is_read_the_same_way_from_the_real_proc():
    status = Path("/proc/self/status").read_text()
    vm_rss_kb = int(status.split("VmRSS:")[1].split()[0])
    assert abs(process_rss_bytes() - vm_rss_kb * 1024) <= 1 << 20  # read moments apart
    assert process_cpu_ns(os.getpid()) > 0


def test_a_process_raises_its_soft_open_files_limit_to_the_hard_one():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 256:
        pytest.skip(f"needs a finite hard open-files limit of at least 256, not {hard}")
    code = ("from chat.system import max_clients_per_process, open_files_limit\n"
            "import resource\n"
            "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], open_files_limit(),"
            " resource.getrlimit(resource.RLIMIT_NOFILE)[0], max_clients_per_process())")
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard)))
    assert result.returncode == 0, result.stderr
    before, returned, after, clients = map(int, result.stdout.split())
    assert (before, returned, after) == (128, hard, hard)
    assert clients == hard - RESERVED_FDS


def test_free_ports_asked_together_are_different_and_bindable():
    ports = free_ports(8)
    assert len(set(ports)) == 8
    for port in ports:
        with socket.socket() as server:
            server.bind(("127.0.0.1", port))
