"""gunicorn.conf.py: its settings, the refusal of a setup that would lose messages, the
graceful stop, and the workers' clients coming back after a crash."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import pytest

from broadcast_clients import expected_messages, with_websocket_client
from chat.bench.storm import workers_of
from chat.system import free_port
from helpers import ROOT
from raw_clients import connect
from test_connection import close_code, read_until_closed

GUNICORN = [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py")]


def gunicorn_config(*args: str, env: dict[str, str] | None = None) -> dict[str, str]:
    result = subprocess.run([*GUNICORN, *args, "--print-config"], capture_output=True,
                            text=True, timeout=60, env=dict(os.environ, **(env or {})), cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return {name.strip(): value.strip() for name, _, value in
            (line.partition("=") for line in result.stdout.splitlines()) if value}


def test_the_config_sizes_worker_connections_to_open_files_not_gunicorns_1000():
    import resource

    config = gunicorn_config()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert int(config["worker_connections"]) > 1000
    assert int(config["worker_connections"]) <= hard
    assert config["control_socket_disable"] == "True"
    assert config["worker_class"] == "chat.worker.GreenchatWorker"
    somaxconn = int(open("/proc/sys/net/core/somaxconn").read())
    assert int(config["backlog"]) == somaxconn


def test_environment_overrides_reach_the_config():
    config = gunicorn_config(env={"GUNICORN_WORKER_CONNECTIONS": "1234",
                                  "GUNICORN_BIND": "127.0.0.1:9999"})
    assert config["worker_connections"] == "1234"
    assert "127.0.0.1:9999" in config["bind"]


def test_two_workers_without_a_backplane_are_refused_with_one_line():
    result = subprocess.run([*GUNICORN, "--bind", "127.0.0.1:0", "--workers", "2"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode != 0
    assert "2 workers need CHAT_REDIS_URL" in result.stderr


def test_sigterm_gives_every_client_1001_before_the_worker_exits(start_server):
    server = start_server([*GUNICORN, "--bind", "127.0.0.1:0"])
    clients = [connect(server.port) for _ in range(3)]
    server.wait_stats(lambda s: s["connections"] == 3)
    os.killpg(server.pid, signal.SIGTERM)
    for sock in clients:
        assert close_code(read_until_closed(sock)[-1]) == 1001
    assert server.proc.wait(30) == 0


def test_the_configured_worker_refuses_an_upgrade_to_a_wrong_path_with_404(start_server):
    server = start_server([*GUNICORN, "--bind", "127.0.0.1:0"])
    with pytest.raises(ConnectionError, match="handshake refused: b'HTTP/1.1 404"):
        connect(server.port, path="/nowhere")
    connect(server.port).close()  # the right path still upgrades


# --- After a crash: a full worker must not keep refusing the clients the kernel sends it

WORKERS, PER_WORKER = 3, 5
# Each client comes back from its own address and port every time. The kernel picks a
# worker's SO_REUSEPORT socket by a hash of the connection's addresses and ports, so
# such a client meets the same worker at every retry, as the load generator's clients
# did once their source address had no other port free (bench/storm.py 100000 --trigger
# kill: 1,643 of them refused by one full worker for 600 s). Unless a full worker leaves
# the group, a client whose worker is full is refused for ever.
CLIENTS = [(f"127.0.3.{i + 1}", 21000) for i in range(WORKERS * PER_WORKER)]
ATTEMPTS = 30  # per client: the backoff below is then ~25 s, a handshake wait 10 s each


def come_back(port: int, client: tuple[str, int]) -> tuple[socket.socket, Counter]:
    """Connect from ``client`` (address, port) with a backoff, 0.1 s doubling to 1 s,
    until a 101: the socket and the failed attempts by kind. Fails after ATTEMPTS."""
    failures: Counter = Counter()
    for attempt in range(ATTEMPTS):
        try:
            return connect(port, source=client[0], source_port=client[1]), failures
        except ConnectionRefusedError:
            failures["nobody listening"] += 1
        except OSError as error:
            failures["503" if " 503 " in str(error) else type(error).__name__] += 1
        time.sleep(min(1.0, 0.1 * 2 ** attempt))
    raise AssertionError(f"{client} still out after {ATTEMPTS} attempts: {dict(failures)}")


def test_after_kill_9_every_client_is_back_though_one_full_worker_is_the_kernels_pick(
        start_server, redis_server):
    port = free_port()  # fixed: SO_REUSEPORT, a socket per worker (gunicorn.conf.py)
    server = start_server(GUNICORN + ["--bind", f"127.0.0.1:{port}", "--workers", str(WORKERS)],
                          env={"CHAT_REDIS_URL": redis_server.url,
                               "CHAT_MAX_CONNECTIONS": str(PER_WORKER)}, ready=False)
    server.port = port  # the master listens on nothing, so it prints no address
    server.wait_stats(lambda s: s["cluster"]["workers"] == WORKERS, timeout=60)
    clients: dict[tuple[str, int], socket.socket] = {}
    try:
        for crash in (False, True):
            if crash:
                for pid in workers_of(server.pid):
                    os.kill(pid, signal.SIGKILL)
                for sock in clients.values():
                    sock.settimeout(10)
                    read_until_closed(sock)
                    sock.close()
            failures: Counter = Counter()
            for client in CLIENTS:
                clients[client], tried = come_back(port, client)
                failures += tried
            # One client at a time: a worker refuses one at most, then it is out of the
            # group, and it does not come back since no client leaves during the fill.
            assert failures["503"] <= WORKERS, failures
        assert "stopped listening" in server.output

        # Every worker full: once each has refused its client, nobody listens at all.
        extra = ("127.0.3.200", 21000)
        answers = []
        for _ in range(WORKERS + 1):
            with pytest.raises(ConnectionError) as refusal:
                connect(port, source=extra[0], source_port=extra[1])
            answers.append("nobody listening" if refusal.type is ConnectionRefusedError
                           else "503" if " 503 " in str(refusal.value) else str(refusal.value))
            if answers[-1] != "503":
                break
        assert answers[-1] == "nobody listening", answers

        # One client goes: its worker is below 95% of its limit and listens again.
        clients.pop(CLIENTS[0]).close()
        clients[extra], _ = come_back(port, extra)
    finally:
        for sock in clients.values():
            sock.close()


def private_bytes(pid: int) -> int:
    """The pages of ``pid`` no other process shares (smaps_rollup's Private_* lines)."""
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        return sum(int(line.split()[1]) * 1024 for line in rollup
                   if line.startswith(("Private_Clean:", "Private_Dirty:")))


def new_workers(server, old: set[int], count: int, timeout: float = 60.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = set(workers_of(server.pid))
        if len(workers) == count and not workers & old:
            return workers
        time.sleep(0.2)
    raise AssertionError(f"no {count} new workers within {timeout}s:\n{server.output}")


@pytest.mark.slow
def test_preloaded_workers_share_the_apps_memory_and_still_broadcast_after_a_reload(
        start_server, redis_server):
    """GUNICORN_PRELOAD=1: the workers are forked from a master that loaded the app (and
    let gevent patch first), so most of each worker's memory is shared, not its own."""
    private: dict[str, float] = {}
    for preload in ("0", "1"):
        server = start_server(GUNICORN + ["--bind", "127.0.0.1:0", "--workers", "2"],
                              env={"CHAT_REDIS_URL": redis_server.url,
                                   "GUNICORN_PRELOAD": preload})
        server.wait_stats(lambda s: s["cluster"]["workers"] == 2, timeout=60)
        private[preload] = sum(map(private_bytes, workers_of(server.pid))) / 2
        if preload == "0":
            server.stop()
    # Measured: 29 MB of a worker's own against 11 MB preloaded.
    assert private["1"] < 0.6 * private["0"], private

    for reload in (False, True):
        if reload:
            old = set(workers_of(server.pid))
            os.kill(server.pid, signal.SIGHUP)
            new = new_workers(server, old, 2)
            # Both new workers on the backplane (the old ones' reports may linger).
            server.wait_stats(lambda s: new <= {w["pid"] for w in s["cluster"]["per_worker"]},
                              timeout=60)
        received = with_websocket_client(server.ws_url, 10, 20)
        # Once each (two workers on Redis make no one order for all: see the backplane).
        assert all(sorted(got) == sorted(expected_messages(10, 20)) for got in received), (
            [len(got) for got in received])
    assert "MonkeyPatchWarning" not in server.output
    assert "Traceback" not in server.output
