"""gunicorn.conf.py: its settings, the refusal of a setup that would lose messages, and
the graceful stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

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
