"""deploy/tsung: the 2015 scenario (connect to / and stay) and its talking variant, run by
deploy/tsung/run.sh with tsung 1.7 against a real greenchat server, bounded in time.

The scenario is the 2015 one as it was: a ``tcp`` server, ``<websocket type="connect"
path="/">`` and no origin attribute (tsung then sends ``Origin: 127.0.0.1``), against the
defaults of ``greenchat serve`` and of ``gunicorn -c gunicorn.conf.py``; run.sh changes
only the numbers (server port, users, rates, source addresses).
The server's /stats says the users were there; tsung's own log says it counted no error.
tsung leaves `epmd -daemon` behind: run.sh stops the one it started, and these tests
check that and stop any left over, by PID.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from helpers import ROOT, greenchat_argv

RUN = ROOT / "deploy" / "tsung" / "run.sh"
SERVERS = {
    "greenchat serve": greenchat_argv(),
    "gunicorn -c gunicorn.conf.py": [sys.executable, "-m", "gunicorn", "-c",
                                     str(ROOT / "gunicorn.conf.py"), "--bind", "127.0.0.1:0"],
}

pytestmark = pytest.mark.skipif(
    shutil.which("tsung") is None and not os.environ.get("CI"),
    reason="tsung is not installed (apt-get install tsung; .ci/install-system-deps does)")


def epmd_pids() -> set[int]:
    """Running (not zombie) epmd processes."""
    pids = set()
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines()
                          if ":\t" in line)
        except OSError:
            continue
        if fields.get("Name") == "epmd" and not fields.get("State", "").startswith("Z"):
            pids.add(int(status.parent.name))
    return pids


@pytest.fixture
def no_stray_epmd():
    """Fail if a run leaves an epmd it started; stop it by PID either way."""
    before = epmd_pids()
    yield
    left = epmd_pids() - before
    for pid in left:
        os.kill(pid, signal.SIGTERM)
    assert not left, f"epmd left running by the run: {left}"


def tsung_totals(log: Path) -> dict[str, int]:
    """Counters from tsung.log: for each name the largest total ("stats: NAME now total")
    over every dump; timing samples (more numbers) are skipped."""
    totals: dict[str, int] = {}
    for line in log.read_text().splitlines():
        match = re.fullmatch(r"stats: (\w+) (\d+) (\d+)", line.strip())
        if match:
            name, total = match.group(1), int(match.group(3))
            totals[name] = max(totals.get(name, 0), total)
    return totals


def run_tsung(tmp_path: Path, port: int, *args: str) -> tuple[Path, str]:
    result = subprocess.run(
        ["bash", str(RUN), "-P", str(port), "-l", str(tmp_path / "logs"), *args],
        cwd=tmp_path, env=dict(os.environ, HOME=str(tmp_path)), capture_output=True,
        text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"logs: (\S+)", result.stdout)
    assert match, result.stdout
    return Path(match.group(1)), result.stdout


def session(scenario: str) -> str:
    """The <sessions> part of a scenario file: what every user does."""
    return re.search(r"<sessions>.*</sessions>", scenario, re.S).group(0)


def errors(totals: dict[str, int]) -> dict[str, int]:
    """tsung's error counters, less the one error_abort it counts when the load's duration
    ends the run (the scenario ending as planned)."""
    found = {name: n for name, n in totals.items()
             if name.startswith("error_") or name == "websocket_fail"}
    if found.get("error_abort") == 1:
        del found["error_abort"]
    return found


def test_the_scenario_is_the_2015_one_with_no_origin_workaround():
    for name in ("connect.xml", "messages.xml"):
        users_do = session((RUN.parent / name).read_text())
        assert '<websocket type="connect" path="/"></websocket>' in users_do, name
        assert "origin" not in users_do, name
    assert '<server host="127.0.0.1" port="8080" type="tcp"/>' in (
        RUN.parent / "connect.xml").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("server_name", SERVERS)
def test_the_2015_scenario_holds_every_user_connected_until_the_load_ends(
        start_server, server_name, tmp_path, no_stray_epmd):
    greenchat = start_server(SERVERS[server_name])  # each with its defaults: no CHAT_ setting
    users = 300
    peak = {"connections": 0}
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.5):
            try:
                peak["connections"] = max(peak["connections"], greenchat.stats()["connections"])
            except OSError:
                pass

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        logs, out = run_tsung(tmp_path, greenchat.port, "-u", str(users), "-d", "20", "-r", "100")
    finally:
        done.set()
        watcher.join(5)
    stats = greenchat.stats()
    assert stats["handshakes"] >= users and peak["connections"] >= users, (stats, peak)
    assert stats["refused"] == {} and stats["protocol_errors"] == 0
    totals = tsung_totals(logs / "tsung.log")
    assert totals["websocket_succ"] == users and totals["connected"] == users, totals
    assert errors(totals) == {}, totals
    assert f"{users} users (connect)" in out and "1 source addresses" in out
    # run.sh changed the numbers only: every user did what the 2015 file says
    assert session((logs.parent / "connect.xml").read_text()) == session(
        (RUN.parent / "connect.xml").read_text())
    # tsung ended every session when the load's 20 s were over
    greenchat.wait_stats(lambda s: s["connections"] == 0, timeout=30)


@pytest.mark.slow
def test_the_talking_variant_sends_messages_that_the_server_broadcasts(
        greenchat, tmp_path, no_stray_epmd):
    users = 50
    logs, _ = run_tsung(tmp_path, greenchat.port, "-s", "messages", "-u", str(users),
                        "-d", "15", "-r", "50", "-i", "2")
    stats = greenchat.stats()
    assert stats["handshakes"] >= users
    assert stats["messages_received"] >= users, stats  # each user talked at least once
    assert stats["deliveries"] >= stats["messages_received"] * (users // 2), stats
    totals = tsung_totals(logs / "tsung.log")
    assert totals["websocket_succ"] == users and errors(totals) == {}, totals


def test_run_sh_refuses_a_bad_argument_with_status_2(tmp_path):
    result = subprocess.run(["bash", str(RUN), "-u", "lots"], capture_output=True, text=True,
                            timeout=30, cwd=tmp_path)
    assert result.returncode == 2 and "not a positive integer: lots" in result.stderr
