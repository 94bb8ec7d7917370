"""greenchat doctor: each limit OK or its fix, exit codes, --json, --apply, and the deploy
files sized by it. A fake /proc tree stands in for the machine, except in the one test
that raises a real sysctl by one and puts it back."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from chat.cli import main as greenchat
from chat.doctor import Target, apply, run_checks, sysctl_conf
from helpers import ROOT

CONF = ROOT / "deploy" / "sysctl.d" / "90-greenchat.conf"
SERVICE = ROOT / "deploy" / "greenchat.service"

# A machine with the kernel defaults seen here, able to take a million connections
# except for the sysctls a million needs raised.
DEFAULTS = {
    "fs/file-max": "2466174",
    "fs/file-nr": "800\t0\t2466174",
    "fs/nr_open": "1048576",
    "net/core/somaxconn": "4096",
    "net/ipv4/tcp_max_syn_backlog": "2048",
    "net/ipv4/ip_local_port_range": "32768\t60999",
    "net/ipv4/tcp_mem": "287898\t383866\t575796",
    "net/ipv4/tcp_rmem": "4096\t131072\t33554432",
    "net/ipv4/tcp_wmem": "4096\t16384\t4194304",
    "vm/max_map_count": "65530",
}
CAP_SYS_RESOURCE_HELD = "000001ffffffffff"
CAP_SYS_RESOURCE_CLEAR = "000001fffeffffff"  # this machine: bit 24 clear


def fake_proc(root: Path, sysctls: dict[str, str] | None = None, *,
              nofile: tuple[int, int] = (1048576, 1048576), cap_eff: str = CAP_SYS_RESOURCE_HELD,
              available_kb: int = 24_000_000, uptime_s: float = 7200.0) -> Path:
    files = {f"sys/{name}": value for name, value in {**DEFAULTS, **(sysctls or {})}.items()}
    files.update({
        "meminfo": f"MemTotal:       24600000 kB\nMemAvailable:   {available_kb} kB\n",
        "self/limits": "Limit                     Soft Limit           Hard Limit           Units\n"
                       f"Max open files            {nofile[0]}              {nofile[1]}"
                       "              files\n",
        "self/status": f"Name:\tpython\nCapPrm:\t{cap_eff}\nCapEff:\t{cap_eff}\n",
        "uptime": f"{uptime_s} 100.0",
    })
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return root


def a_million_ready(root: Path) -> Path:
    """The defaults with what a million needs raised (deploy/sysctl.d's values)."""
    return fake_proc(root, {
        "net/core/somaxconn": "16384", "net/ipv4/tcp_max_syn_backlog": "16384",
        "net/ipv4/tcp_mem": "786432 1048576 1572864", "vm/max_map_count": "262144"})


def doctor(capsys, root: Path, *args: str, kernel_log: Path | None = None) -> tuple[int, str]:
    if kernel_log is None:
        kernel_log = root / "kmsg.txt"
        if not kernel_log.exists():
            kernel_log.write_text("")
    status = greenchat(["doctor", "--proc-root", str(root), "--kernel-log", str(kernel_log),
                        *args])
    return status, capsys.readouterr().out


def sysctl_files(root: Path) -> dict[str, str]:
    return {str(path.relative_to(root)): path.read_text()
            for path in sorted((root / "sys").rglob("*")) if path.is_file()}


def test_a_value_below_the_target_is_reported_with_the_command_that_fixes_it(tmp_path, capsys):
    status, out = doctor(capsys, fake_proc(tmp_path), "--connections", "1000000")
    assert status == 1
    assert "FIX   net.core.somaxconn: 4096 is below the 10000" in out
    assert "      -> sysctl -w net.core.somaxconn=16384" in out
    assert "-> sysctl -w net.ipv4.tcp_max_syn_backlog=16384" in out
    assert "-> sysctl -w net.ipv4.tcp_mem='786432 1048576 1572864'" in out
    assert "-> sysctl -w vm.max_map_count=262144" in out
    assert "OK    fs.file-max" in out and "OK    fs.nr_open" in out
    assert out.rstrip().splitlines()[-1].startswith("not ready: 4 to fix")


def test_a_machine_that_fits_the_target_exits_0(tmp_path, capsys):
    status, out = doctor(capsys, a_million_ready(tmp_path), "--connections", "1000000")
    assert status == 0, out
    assert "FIX" not in out
    assert out.rstrip().endswith("ready for 1,000,000 connections")


def test_a_small_target_needs_nothing_raised_on_default_settings(tmp_path, capsys):
    status, out = doctor(capsys, fake_proc(tmp_path, nofile=(1024, 20000)),
                         "--connections", "18000")
    assert status == 0, out


def test_json_output_has_the_verdict_and_every_check(tmp_path, capsys):
    status, out = doctor(capsys, fake_proc(tmp_path), "--connections", "1000000", "--json")
    report = json.loads(out)
    assert status == 1 and report["ready"] is False and report["changes"] == []
    assert report["target"] == {"connections": 1_000_000, "workers": 1, "local_clients": True}
    by_name = {check["name"]: check for check in report["checks"]}
    assert by_name["net.core.somaxconn"]["setting"] == ["net.core.somaxconn", "16384"]
    assert by_name["fs.file-max"]["ok"] is True
    assert {"open files", "fs.nr_open", "net.netfilter.nf_conntrack_max", "net.ipv4.tcp_mem",
            "net.ipv4.ip_local_port_range", "vm.max_map_count", "memory",
            "kernel log"} <= set(by_name)


@pytest.mark.parametrize("args, message", [
    (["--connections", "0"], "must be a positive integer, got 0"),
    (["--workers", "x"], "invalid _positive value: 'x'"),
    (["--clients", "mars"], "invalid choice: 'mars'"),
    (["--proc-root", "/nonexistent/proc"], "--proc-root /nonexistent/proc is not a directory"),
])
def test_a_bad_option_gets_one_line_and_exit_status_2(args, message):
    result = subprocess.run([sys.executable, "-m", "chat", "doctor", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_nothing_is_written_without_apply(tmp_path, capsys):
    root = fake_proc(tmp_path)
    before = sysctl_files(root)
    doctor(capsys, root, "--connections", "1000000")
    doctor(capsys, root, "--connections", "1000000", "--json")
    assert sysctl_files(root) == before


def test_apply_raises_each_failing_sysctl_and_prints_old_and_new(tmp_path, capsys):
    root = fake_proc(tmp_path)
    status, out = doctor(capsys, root, "--connections", "1000000", "--apply")
    assert status == 0, out
    assert "changed net.core.somaxconn: 4096 -> 16384" in out
    assert "changed net.ipv4.tcp_max_syn_backlog: 2048 -> 16384" in out
    assert "changed net.ipv4.tcp_mem: 287898 383866 575796 -> 786432 1048576 1572864" in out
    assert "changed vm.max_map_count: 65530 -> 262144" in out
    assert (root / "sys/net/core/somaxconn").read_text().strip() == "16384"
    # what was already enough is left alone
    assert (root / "sys/fs/file-max").read_text().strip() == "2466174"
    assert (root / "sys/net/ipv4/ip_local_port_range").read_text().strip() == "32768\t60999"
    assert out.rstrip().endswith("ready for 1,000,000 connections")


def test_apply_never_lowers_part_of_tcp_mem(tmp_path, capsys):
    root = fake_proc(tmp_path, {"net/ipv4/tcp_mem": "900000 950000 9000000"})
    doctor(capsys, root, "--connections", "1000000", "--apply")
    assert (root / "sys/net/ipv4/tcp_mem").read_text().split() == ["900000", "1048576", "9000000"]


@pytest.mark.skipif(os.geteuid() != 0, reason="writing /proc/sys needs root")
def test_apply_changes_a_real_sysctl_and_it_can_be_put_back():
    path = Path("/proc/sys/net/core/somaxconn")
    old = path.read_text().strip()
    try:
        changes = apply([("net.core.somaxconn", str(int(old) + 1))])
        assert [str(change) for change in changes] == [
            f"changed net.core.somaxconn: {old} -> {int(old) + 1}"]
        assert path.read_text().strip() == str(int(old) + 1)
    finally:
        path.write_text(old + "\n")
    assert path.read_text().strip() == old


def test_apply_reports_a_sysctl_it_could_not_write(tmp_path):
    changes = apply([("net.core.no_such_setting", "1")], root=tmp_path)
    assert changes[0].error and "could not set net.core.no_such_setting to 1" in str(changes[0])


def test_an_absent_conntrack_module_is_inactive_and_ok(tmp_path):
    checks = {c.name: c for c in run_checks(Target(), fake_proc(tmp_path), [])}
    conntrack = checks["net.netfilter.nf_conntrack_max"]
    assert conntrack.ok and "conntrack inactive" in conntrack.detail


def test_an_active_conntrack_table_too_small_for_the_target_is_fixed_by_its_max(tmp_path, capsys):
    root = a_million_ready(tmp_path)
    fake_proc(root, {"net/core/somaxconn": "16384", "net/ipv4/tcp_max_syn_backlog": "16384",
                     "net/ipv4/tcp_mem": "786432 1048576 1572864", "vm/max_map_count": "262144",
                     "net/netfilter/nf_conntrack_max": "262144",
                     "net/netfilter/nf_conntrack_count": "5000"})
    status, out = doctor(capsys, root, "--connections", "1000000")
    assert status == 1
    assert "-> sysctl -w net.netfilter.nf_conntrack_max=2097152" in out


def test_a_tcp_hash_table_too_small_for_the_sockets_is_named_with_its_two_fixes(tmp_path, capsys):
    root = a_million_ready(tmp_path)
    fake_proc(root, {"net/core/somaxconn": "16384", "net/ipv4/tcp_max_syn_backlog": "16384",
                     "net/ipv4/tcp_mem": "786432 1048576 1572864", "vm/max_map_count": "262144",
                     "net/ipv4/tcp_ehash_entries": "262144"})
    status, out = doctor(capsys, root, "--connections", "1000000")
    assert status == 1
    assert ("FIX   net.ipv4.tcp_ehash_entries: 262144 buckets for 2000000 sockets: ~8 a "
            "bucket") in out
    assert ("-> boot with thash_entries=2097152, or run server and clients in a network "
            "namespace made after sysctl -w net.ipv4.tcp_child_ehash_entries=2097152") in out
    # clients elsewhere: the server's end only, one socket a connection, within two a bucket
    status, out = doctor(capsys, root, "--connections", "500000", "--clients", "remote")
    assert status == 0 and "OK    net.ipv4.tcp_ehash_entries: 262144 buckets for 500000" in out


def test_a_namespace_sharing_the_hosts_tcp_hash_table_is_checked_against_its_size(tmp_path):
    root = fake_proc(tmp_path, {"net/ipv4/tcp_ehash_entries": "-262144"})
    checks = {c.name: c for c in run_checks(Target(connections=1_000_000), root, [])}
    assert not checks["net.ipv4.tcp_ehash_entries"].ok
    # a kernel before 6.1 does not show the size: nothing to check
    checks = {c.name: c for c in run_checks(Target(connections=1_000_000), fake_proc(
        tmp_path / "old"), [])}
    assert "net.ipv4.tcp_ehash_entries" not in checks


def test_a_hard_open_files_limit_without_cap_sys_resource_says_it_cannot_be_raised_here(tmp_path, capsys):
    root = a_million_ready(tmp_path)
    fake_proc(root, {"net/core/somaxconn": "16384", "net/ipv4/tcp_max_syn_backlog": "16384",
                     "net/ipv4/tcp_mem": "786432 1048576 1572864", "vm/max_map_count": "262144"},
              nofile=(20000, 20000), cap_eff=CAP_SYS_RESOURCE_CLEAR)
    status, out = doctor(capsys, root, "--connections", "1000000")
    assert status == 1
    assert "FIX   open files: hard limit 20000 per process (soft 20000)" in out
    assert "lacks CAP_SYS_RESOURCE (CapEff bit 24 clear)" in out
    assert "greenchat doctor --workers 51" in out
    status, out = doctor(capsys, root, "--connections", "1000000", "--workers", "51")
    assert status == 0, out


def test_the_port_range_says_how_many_source_addresses_a_local_load_test_needs(tmp_path):
    checks = {c.name: c for c in run_checks(Target(1_000_000), fake_proc(tmp_path), [])}
    detail = checks["net.ipv4.ip_local_port_range"].detail
    assert "28232 ports per source address" in detail
    assert "needs 36 source addresses (127.0.0.2-127.0.0.37" in detail
    assert "'1024 65535' would need 16" in detail


def test_recent_kernel_messages_about_limits_are_reported_and_old_ones_only_counted(tmp_path, capsys):
    root = a_million_ready(tmp_path)  # uptime 7200 s
    log = tmp_path / "dmesg.txt"
    log.write_text(
        "[  100.000000] nf_conntrack: nf_conntrack: table full, dropping packet\n"
        "[ 7000.000000] TCP: request_sock_TCP: Possible SYN flooding on port 8080. "
        "Sending cookies.  Check SNMP counters.\n")
    status, out = doctor(capsys, root, "--connections", "1000000", kernel_log=log)
    assert status == 1
    assert "FIX   kernel log: Possible SYN flooding: 1 line(s) in the last 60 min" in out
    assert "nf_conntrack: table full:" not in out  # two hours old: history
    log.write_text("[  100.000000] nf_conntrack: nf_conntrack: table full, dropping packet\n")
    status, out = doctor(capsys, root, "--connections", "1000000", kernel_log=log)
    assert status == 0 and "(1 older)" in out


def test_remote_clients_need_only_the_server_side_sockets(tmp_path):
    root = fake_proc(tmp_path, {"fs/file-nr": "800\t0\t1500000", "fs/file-max": "1500000"})
    local = {c.name: c for c in run_checks(Target(1_000_000), root, [])}
    remote = {c.name: c for c in run_checks(Target(1_000_000, local_clients=False), root, [])}
    assert not local["fs.file-max"].ok and remote["fs.file-max"].ok


def parse_sysctl_conf(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip().lstrip("-")] = " ".join(value.split())
    return values


def test_the_deploy_sysctl_file_is_what_doctor_prints_for_a_million(capsys):
    assert greenchat(["doctor", "--connections", "1000000", "--sysctl-conf"]) == 0
    assert capsys.readouterr().out == CONF.read_text()
    assert CONF.read_text() == sysctl_conf(Target(1_000_000))


def test_the_deploy_sysctl_file_satisfies_doctor_for_a_million(tmp_path, capsys):
    values = parse_sysctl_conf(CONF.read_text())
    assert set(values) == {"fs.file-max", "fs.nr_open", "net.core.somaxconn",
                           "net.ipv4.tcp_max_syn_backlog", "net.netfilter.nf_conntrack_max",
                           "net.ipv4.ip_local_port_range", "net.ipv4.tcp_mem",
                           "vm.max_map_count"}
    # LimitNOFILE from the unit is the hard limit the server process gets.
    limit = int(re.search(r"^LimitNOFILE=(\d+)$", SERVICE.read_text(), re.M).group(1))
    assert limit <= int(values["fs.nr_open"])
    sysctls = {name.replace(".", "/"): value for name, value in values.items()}
    # conntrack active and busy: the file's max must still hold a million more
    sysctls["net/netfilter/nf_conntrack_count"] = "50000"
    sysctls["fs/file-nr"] = f"5000\t0\t{values['fs.file-max']}"
    root = fake_proc(tmp_path, sysctls, nofile=(limit, limit))
    status, out = doctor(capsys, root, "--connections", "1000000")
    assert status == 0, out
    assert "would need" not in out  # the widest port range already


def test_the_doctor_reads_the_machine_without_importing_the_load_generator():
    code = ("import json, sys, chat.doctor; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('chat'))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    assert {"chat.doctor", "chat.checks", "chat.system"} <= set(loaded)
    assert [name for name in loaded if name.startswith("chat.bench")] == []


def test_doctor_is_listed_in_the_greenchat_help():
    result = subprocess.run([sys.executable, "-m", "chat", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "doctor" in result.stdout
