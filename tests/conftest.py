"""Shared fixtures: real servers in subprocesses on ephemeral ports, stopped by PID.

The classes and functions behind them live in helpers.py, which tests import directly.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from helpers import ROOT, RedisCluster, RedisServer, Server, greenchat_argv


@pytest.fixture
def start_server() -> Iterator:
    """Start servers from argv lists; every one is stopped at teardown."""
    started: list[Server] = []

    def start(argv: list[str], env: dict[str, str] | None = None, ready: bool = True,
              cwd: Path = ROOT) -> Server:
        server = Server(argv, env=env, cwd=cwd)
        started.append(server)
        return server.wait_ready() if ready else server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def greenchat(start_server) -> Server:
    """One embedded-default server (`greenchat serve`) on an ephemeral port."""
    return start_server(greenchat_argv())


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def redis_cluster(tmp_path) -> Iterator[RedisCluster]:
    """A 3-master Redis Cluster (no replicas) of our own on free loopback ports."""
    cluster = RedisCluster(tmp_path)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, PEM."""
    if shutil.which("openssl") is None:
        if os.environ.get("CI"):
            raise RuntimeError("openssl is missing in CI: apt-get install openssl")
        pytest.skip("openssl is not installed (apt-get install openssl)")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key
