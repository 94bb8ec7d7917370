"""A CI-sized scale run: 20,000 connections over two gunicorn workers with the Redis
backplane, measured by greenchat bench; every broadcast reaches every one of them."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, free_port

CONNECTIONS = 20_000


def test_twenty_thousand_clients_over_two_workers_all_get_every_broadcast(start_server,
                                                                         redis_server, tmp_path):
    port = free_port()  # a fixed port: each worker gets its own SO_REUSEPORT socket
    server = start_server([sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py")],
                          env={"CHAT_REDIS_URL": redis_server.url, "GUNICORN_WORKERS": "2",
                               "GUNICORN_BIND": f"127.0.0.1:{port}"}, ready=False)
    server.port = port
    server.wait_stats(lambda s: s.get("cluster", {}).get("workers") == 2, timeout=60)
    report = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "chat", "bench", f"ws://127.0.0.1:{port}/", "-n", str(CONNECTIONS),
         "--hold", "3", "--probe-rate", "1", "--json", str(report)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    run = json.loads(report.read_text())["runs"][0]
    assert run["connections"]["established"] == CONNECTIONS
    assert run["connections"]["failed"] == run["connections"]["lost"] == 0
    probes = run["probes"]
    assert probes["sent"] >= 1
    assert probes["deliveries_received"] == probes["deliveries_expected"] == probes["sent"] * CONNECTIONS
    assert probes["missing"] == probes["duplicated"] == 0
    # The server side agrees: the two workers together handed out every delivery.
    cluster = server.stats()["cluster"]
    assert cluster["deliveries"] == probes["deliveries_expected"]
