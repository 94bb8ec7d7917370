"""greenchat bench: counts that match the server's, losses caught, clean failures.

Real servers in subprocesses (conftest's fixtures), the real command in a subprocess;
the pure parts (histogram, plan, preflight on a fake /proc tree) without sockets.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest
import websocket  # websocket-client

from chat.bench import loadclient
from chat.bench.errors import BenchError
from chat.bench.histogram import LogHistogram
from chat.bench.observe import covers
from chat.bench.loadclient import (BACKOFF_MAX_S, BACKOFF_MIN_S, LoadClient, parse_probe,
                                   probe_payload, reconnect_delay)
from chat.bench.plan import make_plan, per_process_limit, split
from chat.bench.preflight import run_checks
from chat.bench.storm import is_refusal, time_to
from chat.checks import (check_conntrack, check_file_max, check_memory, check_open_files,
                         check_port_range, check_somaxconn)
from chat.protocol import CloseCode, CloseReceived, ServerProtocol, accept_key
from helpers import ROOT, greenchat_argv

LOSSY_SERVER = [sys.executable, str(ROOT / "tests" / "lossy_server.py"), "--port", "0"]


def run_bench(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chat", "bench", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def read_report(path: Path) -> dict:
    return json.loads(path.read_text())


# -- against real servers --------------------------------------------------------------------

@pytest.mark.slow
def test_a_small_run_reports_the_same_counts_as_the_servers_stats(greenchat, tmp_path):
    report_path, plot_path = tmp_path / "report.json", tmp_path / "plot.png"
    result = run_bench(greenchat.ws_url, "-n", "300", "--per-worker", "150", "--hold", "2",
                       "--probe-rate", "2", "--json", str(report_path), "--plot", str(plot_path),
                       "--progress")
    assert result.returncode == 0, result.stderr + result.stdout
    run = read_report(report_path)["runs"][0]
    stats = greenchat.wait_stats(lambda s: s["connections"] == 0)

    assert run["plan"]["workers"] == 2
    assert run["connections"]["established"] == 300
    assert run["connections"]["failed"] == run["connections"]["lost"] == 0
    assert run["server"]["peak_connections"] == 300
    probes = run["probes"]
    assert probes["sent"] == 4  # 2 s at 2 per second
    assert stats["messages_received"] == probes["sent"]
    assert stats["deliveries"] == probes["deliveries_received"] == 4 * 300
    assert probes["deliveries_expected"] == 4 * 300
    assert probes["missing"] == probes["duplicated"] == 0
    assert stats["handshakes"] == 300 + 1  # and the one that checked the URL first
    assert run["server"]["counters"]["deliveries"] == 4 * 300
    latency = run["latency_ms"]
    assert latency["count"] == 4 * 300
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"] < 5000
    assert run["generator"]["kb_per_connection"] is not None
    assert run["phases"]["connect"]["connections"] == 300
    assert run["phases"]["hold"]["deliveries"] == 4 * 300
    assert run["server"]["cpu_us_per_delivery"] > 0
    assert run["generator"]["cpu_us_per_message"] > 0
    assert "result      OK" in result.stdout
    assert "target    " in result.stderr and "300/300 open" in result.stderr  # --progress

    png = plot_path.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > 20_000  # three panels with curves, not an empty canvas


@pytest.mark.slow
def test_a_lost_delivery_fails_the_run_and_is_counted(start_server, tmp_path):
    lossy = start_server(LOSSY_SERVER)
    report_path = tmp_path / "report.json"
    result = run_bench(lossy.ws_url, "-n", "20", "--hold", "2", "--probe-rate", "2",
                       "--drain-timeout", "2", "--json", str(report_path))
    assert result.returncode == 1, result.stderr + result.stdout
    run = read_report(report_path)["runs"][0]
    assert run["ok"] is False
    assert run["probes"]["missing"] == 1
    assert run["probes"]["deliveries_received"] == 4 * 20 - 1
    assert lossy.stats()["dropped"] == 1
    assert "FAILED: 1 deliveries missing" in result.stdout


def test_a_lost_delivery_within_max_lost_passes(start_server):
    lossy = start_server(LOSSY_SERVER)
    result = run_bench(lossy.ws_url, "-n", "10", "--hold", "1", "--probe-rate", "3",
                       "--drain-timeout", "1", "--max-lost", "1")
    assert result.returncode == 0, result.stderr + result.stdout
    assert "1 missing" in result.stdout


def test_other_clients_chatting_do_not_disturb_the_probe_counts(greenchat, tmp_path):
    chatter = websocket.create_connection(greenchat.ws_url, timeout=10)
    stop = threading.Event()

    def chat() -> None:
        for n in range(200):  # bounded: at most 200 messages, 0.05 s apart
            if stop.wait(0.05):
                return
            chatter.send(f"hello {n}; greenchat-probe lookalike {n}" if n % 2 else "hi")

    thread = threading.Thread(target=chat, daemon=True)
    thread.start()
    report_path = tmp_path / "report.json"
    try:
        result = run_bench(greenchat.ws_url, "-n", "50", "--hold", "1.5", "--probe-rate", "2",
                           "--json", str(report_path))
    finally:
        stop.set()
        thread.join(5)
        chatter.close()
    assert result.returncode == 0, result.stderr + result.stdout
    probes = read_report(report_path)["runs"][0]["probes"]
    assert probes["other_messages"] > 50
    assert probes["missing"] == probes["duplicated"] == 0
    assert probes["deliveries_received"] == probes["sent"] * 50


def test_step_mode_adds_clients_per_step_and_stops_at_the_latency_limit(greenchat, tmp_path):
    report_path = tmp_path / "report.json"
    result = run_bench(greenchat.ws_url, "-n", "300", "--step-clients", "100",
                       "--step-broadcasts", "2", "--probe-rate", "20", "--hold", "0",
                       "--max-p95-ms", "0.001", "--json", str(report_path))
    assert result.returncode == 0, result.stderr + result.stdout
    run = read_report(report_path)["runs"][0]
    assert [step["clients"] for step in run["steps"]] == [100]
    assert run["stopped_by"].startswith("p95 ")
    assert run["probes"]["deliveries_received"] == 2 * 100


@pytest.mark.slow
def test_compare_alone_runs_the_same_scenario_against_the_websockets_peer(greenchat, tmp_path):
    report_path = tmp_path / "report.json"
    result = run_bench(greenchat.ws_url, "-n", "100", "--hold", "1", "--probe-rate", "2",
                       "--compare", "--json", str(report_path))
    assert result.returncode == 0, result.stderr + result.stdout
    report = read_report(report_path)
    assert [run["label"] for run in report["runs"]] == ["target", "websockets"]
    peer = report["runs"][1]
    assert peer["connections"]["established"] == 100
    assert peer["probes"]["deliveries_received"] == 2 * 100
    assert peer["server"]["kb_per_connection"] is not None  # read from the peer's /proc
    assert report["comparison"]["connections established"]["values"] == {
        "target": 100, "websockets": 100}
    assert report["comparison"]["server CPU us/delivery"]["ratio_to_floor"] is None
    assert "side by side" in result.stdout


@pytest.mark.slow
def test_compare_with_a_list_runs_every_peer_and_reads_costs_against_the_floor(greenchat,
                                                                                 tmp_path):
    report_path = tmp_path / "report.json"
    result = run_bench(greenchat.ws_url, "-n", "100", "--hold", "1", "--probe-rate", "2",
                       "--idle", "0.5", "--compare", "websockets,picows,floor",
                       "--json", str(report_path), timeout=120)
    assert result.returncode == 0, result.stderr + result.stdout
    report = read_report(report_path)
    runs = report["runs"]
    assert [run["label"] for run in runs] == ["target", "websockets", "picows", "floor"]
    for run in runs:
        assert run["connections"]["established"] == 100, run["label"]
        assert run["probes"]["deliveries_received"] == run["probes"]["deliveries_expected"] \
            == 2 * 100, run["label"]
        assert run["phases"]["hold"]["deliveries"] == 2 * 100, run["label"]
        assert run["phases"]["connect"]["connections"] == 100, run["label"]
        for side in ("server", "generator"):
            assert run[side]["cpu_us_per_connection"] > 0, (run["label"], side)
            assert run[side]["idle_cpu_cores"] is not None, (run["label"], side)
    cpu = report["comparison"]["server CPU us/connection"]
    assert cpu["ratio_to_floor"]["floor"] == 1.0
    assert cpu["ratio_to_floor"]["target"] == pytest.approx(
        cpu["values"]["target"] / cpu["values"]["floor"])
    assert report["comparison"]["connections established"]["ratio_to_floor"] is None
    assert "multiple of the floor's" in result.stdout


# -- clean failures ---------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--rate", "0"], "argument --rate: must be a positive number, got 0"),
    (["-n", "0"], "argument -n/--connections: must be a positive integer, got 0"),
    (["--hold", "-1"], "argument --hold: must be 0 or more, got -1"),
    (["http://127.0.0.1:1/"], "expected a ws://HOST[:PORT]/PATH URL, got 'http://127.0.0.1:1/'"),
    (["wss://127.0.0.1:1/"], "wss:// is not supported"),
    (["--source", "nowhere"], "not an IPv4 address: 'nowhere'"),
    (["--max-lost", "-2"], "argument --max-lost: must be 0 or more, got -2"),
    (["--compare", "websockets,nope"], "unknown peer 'nope' (choose from websockets, picows, "
     "floor)"),
    (["--compare", "ws://127.0.0.1:1/"], "(the URL goes before --compare)"),
])
def test_a_bad_option_gets_one_line_and_exit_status_2(args, message):
    result = run_bench(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_an_unreachable_server_gets_one_line_and_exit_status_1():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: connections are refused
        result = run_bench(f"ws://127.0.0.1:{port}/", "-n", "10")
    assert result.returncode == 1
    assert result.stderr.strip() == (f"greenchat bench: cannot connect to "
                                     f"ws://127.0.0.1:{port}/: Connection refused")


def test_a_path_that_is_not_a_websocket_endpoint_shows_the_status_line(greenchat):
    url = f"ws://127.0.0.1:{greenchat.port}/nowhere"
    result = run_bench(url, "-n", "10")
    assert result.returncode == 1
    assert result.stderr.strip() == (f"greenchat bench: {url} is not a websocket endpoint: "
                                     "HTTP/1.1 404 NOT FOUND")


def test_more_connections_per_worker_than_open_files_allow_is_refused(greenchat):
    result = run_bench(greenchat.ws_url, "-n", "10", "--per-worker", "100000000")
    assert result.returncode == 2
    assert "--per-worker 100000000 is above what one worker can hold" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# -- the pure parts ---------------------------------------------------------------------------

def test_histogram_percentiles_are_within_one_percent_of_the_exact_ones():
    rng = random.Random(7)
    values = sorted(int(rng.lognormvariate(15, 1.5)) + 1 for _ in range(20_000))
    histogram = LogHistogram()
    for value in values:
        histogram.record(value)
    for q in (0.5, 0.95, 0.99):
        exact = values[math.ceil(q * len(values)) - 1]
        assert abs(histogram.quantile(q) - exact) <= 0.01 * exact, q
    assert histogram.max == values[-1]


def test_histograms_from_several_workers_merge_into_the_histogram_of_all_values():
    parts = [LogHistogram() for _ in range(3)]
    whole = LogHistogram()
    for n in range(1, 3000):
        parts[n % 3].record(n * 1000)
        whole.record(n * 1000)
    merged = LogHistogram()
    for part in parts:
        merged.merge(LogHistogram.from_dict(json.loads(json.dumps(part.to_dict()))))
    assert merged.to_dict() == whole.to_dict()
    since = whole.minus(parts[0])
    assert since.count == parts[1].count + parts[2].count


def test_a_probe_payload_carries_its_id_and_send_time_and_nothing_else_parses():
    payload = probe_payload(42, 123456789, size=100)
    assert len(payload) == 100
    assert parse_probe(payload) == (42, 123456789)
    assert parse_probe(b"hello") is None
    assert parse_probe(b"greenchat-probe lookalike 3") is None


def test_the_plan_never_uses_a_source_address_beyond_its_ports_across_workers():
    plan = make_plan(50_000, per_worker=19_000, per_source=14_000, sources=None, loopback=True)
    assert plan.quotas == [16_667, 16_667, 16_666]
    used: dict[str, int] = {}
    for worker, quota in zip(plan.sources, plan.quotas):
        assert sum(n for _address, n in worker) == quota
        for address, n in worker:
            used[address] = used.get(address, 0) + n
    assert max(used.values()) <= 14_000
    assert sorted(used) == ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]


def test_the_plan_refuses_too_few_given_source_addresses():
    with pytest.raises(BenchError, match="need 4 source addresses"):
        make_plan(50_000, 19_000, 14_000, sources=["10.0.0.1", "10.0.0.2"], loopback=False)


def test_an_even_split_never_shrinks_as_connections_grow():
    for parts in (1, 3, 7):
        for n in range(0, 60):
            assert all(a <= b for a, b in zip(split(n, parts), split(n + 1, parts)))
            assert sum(split(n, parts)) == n
    assert per_process_limit(20_000) == 19_000


def fake_proc(root: Path, *, somaxconn: int = 4096, syn_backlog: int = 4096,
              ports: str = "32768\t60999", conntrack: tuple[int, int] | None = None,
              file_nr: str = "3000\t0\t2466170", available_kb: int = 24_000_000,
              nofile: tuple[int, int] = (1024, 20000)) -> Path:
    """A /proc tree with just the files preflight reads."""
    files = {
        "sys/net/core/somaxconn": str(somaxconn),
        "sys/net/ipv4/tcp_max_syn_backlog": str(syn_backlog),
        "sys/net/ipv4/ip_local_port_range": ports,
        "sys/fs/file-nr": file_nr,
        "meminfo": f"MemTotal:       24000000 kB\nMemAvailable:   {available_kb} kB\n"
                   "Slab:             200000 kB\n",
        "self/limits": "Limit                     Soft Limit           Hard Limit           Units\n"
                       f"Max open files            {nofile[0]}                 {nofile[1]}"
                       "                files\n",
    }
    if conntrack is not None:
        files["sys/net/netfilter/nf_conntrack_max"] = str(conntrack[0])
        files["sys/net/netfilter/nf_conntrack_count"] = str(conntrack[1])
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return root


def test_preflight_passes_on_a_machine_that_fits_the_plan(tmp_path):
    checks = run_checks(connections=18_000, per_process=19_000, in_flight=200,
                        per_source=14_116, root=fake_proc(tmp_path))
    assert all(check.ok for check in checks), [str(c) for c in checks if not c.ok]
    # conntrack absent: not checked at all
    assert "net.netfilter.nf_conntrack_max" not in [check.name for check in checks]


def test_preflight_names_each_problem_with_the_command_that_fixes_it(tmp_path):
    root = fake_proc(tmp_path, somaxconn=128, ports="60000 60999", conntrack=(65536, 100),
                     file_nr="3000 0 10000", available_kb=100_000, nofile=(1024, 4096))
    somaxconn = check_somaxconn(root, in_flight=400)
    assert not somaxconn.ok and not somaxconn.fatal
    assert somaxconn.fix == "sysctl -w net.core.somaxconn=512"
    conntrack = check_conntrack(root, 100_000)
    assert conntrack.fatal and conntrack.fix == "sysctl -w net.netfilter.nf_conntrack_max=131072"
    ports = check_port_range(root, per_source=14_000)
    assert ports.fatal and "1000 ports per source address" in ports.detail
    assert "ip_local_port_range='1024 65535'" in ports.fix
    files = check_file_max(root, sockets=20_000)
    assert files.fatal and files.fix == "sysctl -w fs.file-max=43000"
    memory = check_memory(root, 100_000, kb_per_connection=11.5)
    assert memory.fatal and "97 MB available" in memory.detail
    open_files = check_open_files(root, per_process=19_000)
    assert open_files.fatal and "hard limit 4096" in open_files.detail


def test_conntrack_that_tracks_nothing_is_no_problem(tmp_path):
    root = fake_proc(tmp_path, conntrack=(1000, 0))
    assert check_conntrack(root, 1_000_000).ok


def test_the_soft_open_files_limit_below_the_plan_is_fine_when_the_hard_one_fits(tmp_path):
    check = check_open_files(fake_proc(tmp_path, nofile=(1024, 20000)), per_process=19_000)
    assert check.ok and "raised to hard" in check.detail


def test_bench_is_listed_in_the_greenchat_help():
    result = subprocess.run([sys.executable, "-m", "chat", "bench", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=30,
                            env=dict(os.environ, COLUMNS="100"))
    assert result.returncode == 0
    for option in ("--rate", "--hold", "--probe-rate", "--step-clients", "--compare",
                   "--server-pid", "--plot", "--json", "--max-lost"):
        assert option in result.stdout


# -- bench/rooms.py --------------------------------------------------------------------------

def run_rooms_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "rooms.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_the_rooms_benchmark_delivers_every_message_in_both_layouts(tmp_path):
    out = tmp_path / "rooms.json"
    done = run_rooms_script("-n", "200", "--rooms", "4", "--runs", "1", "--rounds", "2",
                            "--warm-rounds", "1", "--idle", "0.1", "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    report = read_report(out)
    runs = report["runs"]
    assert [(run["rooms"], run["connections"], run["deliveries"]) for run in runs] == [
        (1, 200, 400), (4, 200, 400)]
    assert set(report["median"]) == {"1", "4"}
    ratios = report["ratio_spread_to_one_room"]
    assert ratios["cpu_us_per_delivery"] > 0
    # 200 connections barely move RSS (they reuse what the warm-up freed): a memory figure
    # only from a growth above the script's resolution, a memory ratio only from two.
    for run in runs:
        growth = run["rss_kb_after"] - run["rss_kb_before"]
        if growth < report["memory_resolution_kb"]:
            assert run["kb_per_connection"] is None
        else:
            assert run["kb_per_connection"] == pytest.approx(growth / 200)
    one, spread = (run["kb_per_connection"] for run in runs)
    if one is None or spread is None:
        assert ratios["kb_per_connection"] is None
        assert "memory unmeasurable" in done.stdout
    else:
        assert ratios["kb_per_connection"] == pytest.approx(spread / one)


def test_the_rooms_benchmark_refuses_connections_that_do_not_split_into_rooms():
    done = run_rooms_script("-n", "101", "--rooms", "4")
    assert done.returncode == 2
    assert "multiple of --rooms" in done.stderr.strip().splitlines()[-1]


# -- the load client's closing handshake ------------------------------------------------

class ClosingServer:
    """A one-connection websocket server on a thread: it completes the handshake, sends a
    close frame when told to, reads the client's answer and, if ``hang_up``, closes TCP."""

    def __init__(self, hang_up: bool) -> None:
        self.hang_up = hang_up
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.client_port = 0
        self.send_close = threading.Event()
        self.answered = threading.Event()  # the client's close frame came
        self.eof = threading.Event()  # the client closed TCP
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(10)
        conn, (_host, self.client_port) = self.listener.accept()
        conn.settimeout(10)
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            key = re.search(rb"Sec-WebSocket-Key: (\S+)", request).group(1)
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                         + accept_key(key).encode() + b"\r\n\r\n")
            if not self.send_close.wait(10):
                return
            codec = ServerProtocol()
            codec.send_close(CloseCode.GOING_AWAY)
            conn.sendall(codec.data_to_send())
            while not self.answered.is_set():
                data = conn.recv(4096)
                if not data:
                    return
                if any(isinstance(e, CloseReceived) for e in codec.receive_data(data)):
                    self.answered.set()
            if self.hang_up:
                conn.shutdown(socket.SHUT_WR)
            if conn.recv(4096) == b"":  # blocks until the client closes (or the timeout)
                self.eof.set()

    def close(self) -> None:
        self.thread.join(15)
        self.listener.close()


def time_wait_local_ports(port: int, client_port: int) -> set[int]:
    """Local ports of the TIME_WAIT sockets between the two ports, from either side."""
    out = subprocess.run(["ss", "-Htan", "state", "time-wait"], capture_output=True,
                         text=True, check=True).stdout
    ends = {(int(a.rsplit(":", 1)[1]), int(b.rsplit(":", 1)[1]))
            for a, b in (line.split()[-2:] for line in out.splitlines())}
    return {local for local, peer in ends if {local, peer} == {port, client_port}}


def step_until(client: LoadClient, done: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        client.step(0.05)


@contextmanager
def closed_by_the_server(hang_up: bool) -> Iterator[tuple[ClosingServer, LoadClient]]:
    """A load client with one connection to a ClosingServer that has sent its close frame."""
    server = ClosingServer(hang_up)
    client = LoadClient("127.0.0.1", server.port)
    try:
        assert client.connect(1, [""], timeout=10).ok
        server.send_close.set()
        yield server, client
    finally:
        client.close()
        server.close()


def test_the_load_client_answers_every_ping_so_the_server_keeps_its_idle_clients(
        start_server):
    server = start_server(greenchat_argv(), env={"CHAT_PING_INTERVAL": "0.2"})
    client = LoadClient("127.0.0.1", server.port)
    try:
        assert client.connect(20, [""], timeout=10).ok
        # Pinged after 0.2-0.4 s of silence, dropped 0.2 s later without an answer:
        # three rounds of pings, the loop turning all the while.
        step_until(client, lambda: server.stats()["pings_sent"] >= 60, seconds=20)
        stats = server.stats()
        assert stats["pings_sent"] >= 60
        assert (stats["idle_dropped"], stats["connections"]) == (0, 20)
        assert client.status()["open"] == 20
    finally:
        client.close()


def test_the_load_client_answers_a_close_frame_and_lets_the_server_hold_time_wait():
    with closed_by_the_server(hang_up=True) as (server, client):
        step_until(client, server.eof.is_set)
        assert server.answered.is_set() and server.eof.is_set()
        assert (client.connections, client.lost, client.close_frames) == (0, 1, 1)
        # the server closed first, so the TIME_WAIT is on its port, none on the client's
        assert time_wait_local_ports(server.port, server.client_port) == {server.port}


def test_the_load_client_closes_a_socket_whose_server_never_hangs_up(monkeypatch):
    monkeypatch.setattr(loadclient, "CLOSE_WAIT", 0.3)
    with closed_by_the_server(hang_up=False) as (server, client):
        step_until(client, server.answered.is_set)
        assert server.answered.is_set() and not server.eof.is_set()
        step_until(client, server.eof.is_set)  # after CLOSE_WAIT, our EOF
        assert server.eof.is_set()
        assert (client.connections, client.lost, client.close_frames) == (0, 1, 1)


def test_closing_the_load_client_closes_sockets_still_waiting_for_the_servers_eof():
    with closed_by_the_server(hang_up=False) as (server, client):
        step_until(client, server.answered.is_set)
        assert server.answered.is_set() and not server.eof.is_set()
        assert client.close() == 0  # no connection open: the one left was closing
        server.thread.join(10)
        assert server.eof.is_set()


# -- reconnect storms ---------------------------------------------------------------------

def test_the_bench_reconnects_with_the_web_pages_backoff_constants():
    page = (ROOT / "chat" / "static" / "index.html").read_text()
    low = int(re.search(r"BACKOFF_MIN_MS = (\d+);", page).group(1))
    high = int(re.search(r"BACKOFF_MAX_MS = (\d+);", page).group(1))
    assert (BACKOFF_MIN_S, BACKOFF_MAX_S) == (low / 1000, high / 1000)
    rng = random.Random(3)
    for failures in range(1, 12):
        ceiling = min(high / 1000, low / 1000 * 2 ** (failures - 1))
        delays = [reconnect_delay(failures, rng) for _ in range(200)]
        assert ceiling / 2 <= min(delays) and max(delays) <= ceiling, failures
        assert max(delays) - min(delays) > ceiling / 4  # jittered, not one instant


def test_times_to_reconnect_count_against_every_client_not_only_those_back():
    back = LogHistogram()
    for seconds in (0.5, 1.0, 2.0, 4.0):
        back.record(int(seconds * 1e9))
    assert time_to(back, 1.0, 4) == 4.0  # the last one, exactly
    assert time_to(back, 0.5, 4) == pytest.approx(1.0, rel=0.01)
    assert time_to(back, 1.0, 5) is None  # one of five never came back
    assert time_to(back, 0.5, 5) == pytest.approx(2.0, rel=0.01)  # 3 of 5 by 2 s
    assert is_refusal("connect: ECONNREFUSED") and is_refusal("handshake: HTTP/1.1 503 x")
    assert not is_refusal("handshake: timeout")


def test_a_storm_needs_the_master_pid_and_one_line_says_so():
    result = run_bench("ws://127.0.0.1:1/", "--storm", "hup")
    assert result.returncode == 2
    assert result.stderr.strip() == ("greenchat bench: --storm needs --master-pid, and goes "
                                     "with neither --compare nor --step-clients")


def run_script(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / name), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("trigger", ["hup", "kill"])
def test_every_client_comes_back_after_a_gunicorn_restart_and_gets_a_broadcast(trigger,
                                                                                tmp_path):
    done = run_script("storm.py", "300", "--trigger", trigger, "--storm-timeout", "90",
                      "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = read_report(next(tmp_path.glob("*.summary.json")))
    run = summary["runs"][0]
    assert run["ok"] and run["outcome"] == "all back", run
    assert run["established"] == 300
    assert run["drops"] >= 300  # each client lost once (or more: a reload can race)
    assert run["attempts"] >= 300
    assert 0 < run["time_to_50_s"] <= run["time_to_99_s"] <= run["time_to_100_s"]
    assert run["broadcast_after"]["received"] == run["broadcast_after"]["expected"] == 300
    assert set(summary["median"]) >= {"time_to_50_s", "time_to_99_s", "time_to_100_s",
                                      "refused", "errors"}
    storm = read_report(Path(run["json"]))["runs"][0]["storm"]
    assert storm["trigger"] == trigger
    assert storm["timeline"]["open"][-1] == 300
    png = next(tmp_path.glob("*.png")).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000


# -- the other scripts at a small size -----------------------------------------------------

@pytest.mark.slow
def test_step_mode_on_two_workers_finds_each_servers_most_clients(tmp_path):
    done = run_script("steps.py", "-n", "400", "--step-clients", "200", "--step-broadcasts",
                      "2", "--probe-rate", "10", "--max-p95-ms", "10000", "--peers",
                      "websockets,picows", "--out", str(tmp_path), timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = read_report(next(tmp_path.glob("*.summary.json")))
    assert summary["workers"] == 2
    assert summary["median_most_clients_within"] == {"greenchat": 400, "websockets": 400,
                                                     "picows": 400}
    steps = summary["runs"][0]["servers"]["greenchat"]["steps"]
    assert [step["clients"] for step in steps] == [200, 400]
    assert all(step["missing"] == 0 for step in steps)


@pytest.mark.slow
def test_idle_broadcast_measures_the_peers_and_reads_them_against_the_floor(tmp_path):
    out = tmp_path / "idle.json"
    done = run_script("idle_broadcast.py", "-n", "200", "--variants", "ours,picows,floor",
                      "--broadcasts", "2", "--idle", "0.2", "--json", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = read_report(out)["summary"]
    assert list(summary) == ["ours", "picows", "floor"]
    assert summary["floor"]["ratio_to_floor"]["cpu_us_per_delivery"] == 1.0
    for variant in ("ours", "picows"):
        ratios = summary[variant]["ratio_to_floor"]
        # (RSS per connection too, but 200 of the floor's sockets can grow its RSS by less
        # than a page: a ratio to 0 KB is left out rather than reported)
        assert {"cpu_us_per_handshake", "cpu_us_per_delivery", "burst_cpu_ms"} <= set(ratios)
        assert set(ratios) <= {"kb_per_connection", "cpu_us_per_handshake",
                               "cpu_us_per_delivery", "burst_cpu_ms"}
        assert all(value > 0 for value in ratios.values()), (variant, ratios)


@pytest.mark.slow
def test_the_generator_cost_script_gives_both_sides_cpu_per_connection_and_message(tmp_path):
    out = tmp_path / "cost.json"
    done = run_script("generator_cost.py", "-n", "200", "--hold", "1", "--probe-rate", "5",
                      "--idle", "0.5", "--runs", "1", "--servers", "ours,floor", "--json",
                      str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = read_report(out)
    for server in ("ours", "floor"):
        run = report["runs"][server][0]
        assert run["ok"] and run["connections"] == 200 and run["messages"] == 5 * 200
        for key in ("server_us_per_connection", "generator_us_per_connection",
                    "server_us_per_delivery", "generator_us_per_message"):
            assert report["median"][server][key] > 0, (server, key)


@pytest.mark.slow
def test_one_box_reports_the_servers_pss_below_its_rss_and_what_idle_costs(tmp_path):
    # As root (CI) it runs in a network namespace of its own, whose TCP table has a bucket
    # for each of its 800 sockets, and leaves the host's setting as it found it.
    netns = os.geteuid() == 0
    child_buckets = Path("/proc/sys/net/ipv4/tcp_child_ehash_entries")
    host_setting = child_buckets.read_text() if netns else None
    done = run_script("one_box.py", "400", "--idle", "1", "--hold", "1", "--probe-rate", "1",
                      "--out", str(tmp_path), *(["--netns"] if netns else []))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = read_report(next(tmp_path.glob("*.summary.json")))
    if netns:
        assert summary["tcp_ehash_entries"] == "1024"
        assert child_buckets.read_text() == host_setting
    peak = summary["server_memory_at_peak"]
    # two workers forked from one master share their interpreter's pages
    assert 0 < peak["pss_bytes"] < peak["rss_bytes"]
    assert summary["idle"]["ping_interval_s"] == 60.0
    assert summary["idle"]["server_cpu_cores"] is not None
    assert summary["peak_connections"] == 400
    # the two workers' counters, summed from their reports, count the whole run
    run = read_report(Path(summary["bench_json"]))["runs"][0]
    assert run["server"]["counters"]["deliveries"] == run["probes"]["deliveries_received"] > 0
    assert run["server"]["counters"]["handshakes"] >= 400


def test_a_stats_answer_for_several_workers_counts_up_to_its_oldest_report_only():
    assert covers({"connections": 3}, time.time())  # one process answers live
    assert not covers(None, 0.0)
    stats = {"connections": 3, "per_worker": [{"pid": 7, "reported": 100.0},
                                              {"pid": 8, "reported": 98.5}]}
    assert covers(stats, 98.5)
    assert not covers(stats, 99.0)  # worker 8's latest report is older than that
    assert not covers(stats, 98.5, workers=3)  # a third worker is missing, not idle
    assert not covers({"connections": 0, "per_worker": []}, 0.0)  # no report read yet
