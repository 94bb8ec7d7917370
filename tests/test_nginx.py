"""deploy/nginx: Debian's nginx, run with the deploy files, in front of real greenchat servers.

Each test starts its own nginx (master and workers, ``daemon off``) on a free loopback
port, from deploy/nginx/nginx.conf and greenchat.conf rendered into a temporary folder:
only the listening port, greenchat's port and the paths of the pid file, logs and
temporary files change. nginx is stopped by PID; its error log must stay free of errors.

Needs nginx (Debian's package; .ci/install-system-deps installs it). Without it the
module is skipped, except in CI (``CI`` set), where it fails.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from chat.config import DEFAULTS
from chat.protocol import Opcode
from helpers import ROOT, Server, free_port, greenchat_argv
from raw_clients import HANDSHAKE, connect, masked_frame, read_frame, read_response_head
from test_page import (browser, expect, expect_connected, message_texts,  # noqa: F401
                       open_chat, send)

DEPLOY = ROOT / "deploy" / "nginx"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
GUNICORN = [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"),
            "--bind", "127.0.0.1:0"]
KEY = "dGhlIHNhbXBsZSBub25jZQ=="
# Where an nginx error log line says how bad it is: "2026/11/30 01:02:03 [error] 12#12: ..."
LEVEL = re.compile(r"^\S+ \S+ \[(\w+)\]")
BAD_LEVELS = {"error", "crit", "alert", "emerg"}

if not os.access(NGINX, os.X_OK) and not os.environ.get("CI"):
    pytest.skip("nginx is not installed (apt-get install nginx; .ci/install-system-deps does)",
                allow_module_level=True)


def replace_once(text: str, old: str, new: str) -> str:
    """``text`` with ``old`` replaced, failing when the deploy file no longer has it."""
    assert text.count(old) == 1, f"expected {old!r} once in the deploy file"
    return text.replace(old, new)


def directive(text: str, name: str) -> str:
    """The value of the one ``name`` directive in a config file."""
    values = re.findall(rf"^\s*{name}\s+([^;]*);", text, re.M)
    assert len(values) == 1, (name, values)
    return values[0]


def seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m)?", value).groups()
    return int(number) * {"ms": 0.001, "s": 1, None: 1, "m": 60}[unit]


class Nginx:
    """nginx with the deploy files, listening on 127.0.0.1:``port``, proxying to
    greenchat on ``upstream_port``; ``site`` edits the rendered greenchat.conf further."""

    def __init__(self, directory: Path, upstream_port: int, site=lambda text: text,
                 port: int = 0) -> None:
        self.directory = directory
        self.port = port or free_port()
        main = (DEPLOY / "nginx.conf").read_text()
        main = replace_once(main, "pid /run/nginx.pid;", f"pid {directory}/nginx.pid;")
        main = replace_once(main, "error_log /var/log/nginx/error.log",
                            f"error_log {directory}/error.log")
        temporary = "".join(f"    {kind}_temp_path {directory}/{kind};\n"
                            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        main = replace_once(main, "    include greenchat.conf;\n",
                            temporary + "    include greenchat.conf;\n")
        conf = (DEPLOY / "greenchat.conf").read_text()
        conf = replace_once(conf, "listen 80 ", f"listen 127.0.0.1:{self.port} ")
        conf = replace_once(conf, "server 127.0.0.1:8080;", f"server 127.0.0.1:{upstream_port};")
        (directory / "nginx.conf").write_text(main)
        (directory / "greenchat.conf").write_text(site(conf))
        self.log = directory / "error.log"
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(directory), "-c", str(directory / "nginx.conf"),
             "-e", str(self.log), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self._wait_listening()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _wait_listening(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nginx did not listen within {timeout}s:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def errors(self) -> list[str]:
        """Error log lines at [error] or worse, but for the one a machine that cannot raise
        nginx's open-files limit gives."""
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        wanted = int(directive((DEPLOY / "nginx.conf").read_text(), "worker_rlimit_nofile"))
        bad = []
        for line in self.log_text().splitlines():
            level = LEVEL.match(line)
            if not level or level.group(1) not in BAD_LEVELS:
                continue
            if "setrlimit(RLIMIT_NOFILE" in line and hard != resource.RLIM_INFINITY \
                    and hard < wanted:
                continue  # a hard limit only CAP_SYS_RESOURCE could raise (these machines)
            bad.append(line)
        return bad

    def stop(self) -> None:
        """SIGTERM, nginx's fast stop (a graceful one would wait for open websockets), to
        the master we started; SIGKILL to its process group if it lingers."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@pytest.fixture
def start_nginx():
    """Start nginx in front of a greenchat port, in a temporary folder of its own (0755:
    as root, nginx's workers run as www-data and write their temporary files there)."""
    started: list[Nginx] = []
    directory = Path(tempfile.mkdtemp(prefix="greenchat-nginx-"))
    directory.chmod(0o755)

    def start(upstream_port: int, site=lambda text: text, port: int = 0) -> Nginx:
        folder = directory / str(len(started))
        folder.mkdir(mode=0o755)
        started.append(Nginx(folder, upstream_port, site, port))
        return started[-1]

    yield start
    for nginx in started:
        nginx.stop()
    shutil.rmtree(directory, ignore_errors=True)


def upgrade(port: int, extra: str = "", source: str = "127.0.0.1") -> bytes:
    """A websocket upgrade request to ``port`` with ``extra`` headers; the response head."""
    request = HANDSHAKE.format(path="/", port=port, key=KEY).replace(
        "\r\n\r\n", f"\r\n{extra}\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10,
                                  source_address=(source, 0)) as sock:
        sock.sendall(request.encode())
        return read_response_head(sock)


def refusal_lines(server: Server) -> list[str]:
    return [line for line in server.lines if "refused a client" in line]


# -- the deploy files as they are ---------------------------------------------------


def test_nginx_waits_longer_than_two_ping_intervals_and_has_files_for_its_connections():
    site = (DEPLOY / "greenchat.conf").read_text()
    main = (DEPLOY / "nginx.conf").read_text()
    quiet = 2 * DEFAULTS["CHAT_PING_INTERVAL"]  # the longest a pinged websocket is silent
    assert seconds(directive(site, "proxy_read_timeout")) > quiet
    assert seconds(directive(site, "proxy_send_timeout")) > quiet
    # Two connections per proxied client: nginx's default of 512 would carry 256 clients.
    connections = int(directive(main, "worker_connections"))
    assert int(directive(main, "worker_rlimit_nofile")) >= connections >= 2 * 10_000
    assert directive(site, "proxy_set_header Host") == "$http_host"


# -- through nginx ---------------------------------------------------------------------


@pytest.mark.parametrize("argv", [greenchat_argv(), GUNICORN],
                         ids=["greenchat serve", "gunicorn -c gunicorn.conf.py"])
def test_clients_through_nginx_chat_with_each_other(start_server, start_nginx, argv):
    server = start_server(argv)
    nginx = start_nginx(server.port)
    clients = [connect(nginx.port), connect(nginx.port, path="/rooms/lobby")]
    try:
        clients[0].sendall(masked_frame(b"hello through nginx"))
        for sock in clients:
            assert read_frame(sock) == (Opcode.TEXT, b"hello through nginx")
        stats = server.wait_stats(lambda s: s["connections"] == 2)
        assert stats["messages_received"] == 1 and stats["refused"] == {}
    finally:
        for sock in clients:
            sock.close()
    server.wait_stats(lambda s: s["connections"] == 0)
    assert nginx.errors() == []


@pytest.mark.slow
def test_the_page_served_through_nginx_passes_the_origin_check_and_a_foreign_one_does_not(
        greenchat, start_nginx, open_chat):  # noqa: F811
    nginx = start_nginx(greenchat.port)
    page = open_chat(nginx.url + "/")
    expect_connected(page)
    send(page, "hello from behind nginx")
    expect(message_texts(page)).to_have_text(["hello from behind nginx"])
    assert upgrade(nginx.port, "Origin: https://evil.example\r\n").startswith(b"HTTP/1.1 403")
    stats = greenchat.stats()
    assert stats["refused"] == {"origin": 1}
    # the page's join of the lobby on the JSON endpoint, and its message
    assert stats["messages_received"] == 2 and stats["connections"] == 1
    assert nginx.errors() == []


def without_host(site: str) -> str:
    """greenchat.conf without its Host line: nginx then sends the upstream's address as
    Host (its default, ``$proxy_host``), as a proxy that rewrites Host does."""
    return replace_once(site, "proxy_set_header Host $http_host;", "")


def test_behind_a_proxy_that_rewrites_host_the_public_origin_must_be_listed(start_server,
                                                                            start_nginx):
    default = start_server(greenchat_argv())
    nginx = start_nginx(default.port, without_host)
    assert upgrade(nginx.port, f"Origin: {nginx.url}\r\n").startswith(b"HTTP/1.1 403")
    assert default.stats()["refused"] == {"origin": 1}

    public = f"http://127.0.0.1:{free_port()}"  # where nginx will listen: the page's origin
    listed = start_server(greenchat_argv(), env={"CHAT_ALLOWED_ORIGINS": public})
    nginx = start_nginx(listed.port, without_host, port=int(public.rsplit(":", 1)[1]))
    assert upgrade(nginx.port, f"Origin: {public}\r\n").startswith(b"HTTP/1.1 101")
    assert upgrade(nginx.port, "Origin: https://evil.example\r\n").startswith(b"HTTP/1.1 403")


@pytest.mark.parametrize("trusted, logged", [("127.0.0.1", "127.0.0.5"), ("", "127.0.0.1")],
                         ids=["nginx trusted", "nobody trusted"])
def test_a_refusal_through_nginx_names_the_client_only_when_nginx_is_trusted(
        start_server, start_nginx, trusted, logged):
    server = start_server(greenchat_argv(), env={"CHAT_TRUSTED_PROXIES": trusted})
    nginx = start_nginx(server.port)
    # The client (127.0.0.5) writes an X-Forwarded-For of its own; nginx appends its address.
    head = upgrade(nginx.port, "Origin: https://evil.example\r\nX-Forwarded-For: 6.6.6.6\r\n",
                   source="127.0.0.5")
    assert head.startswith(b"HTTP/1.1 403")
    server.wait_stats(lambda s: s["refused"] == {"origin": 1})
    lines = refusal_lines(server)
    assert len(lines) == 1 and lines[0].rstrip().endswith(f"from {logged})"), server.output
    assert "6.6.6.6" not in lines[0]


def pong_until(sock: socket.socket, until: float) -> int:
    """Read frames until ``until`` (time.monotonic()), answering each ping; the pings seen.
    Raises ConnectionError if the connection ends first."""
    pings = 0
    while (left := until - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            opcode, payload = read_frame(sock)
        except socket.timeout:
            break
        if opcode == Opcode.PING:
            pings += 1
            sock.sendall(masked_frame(payload, Opcode.PONG))
        elif opcode == Opcode.CLOSE:
            raise ConnectionError(f"closed: {payload!r}")
    return pings


@pytest.mark.slow
def test_greenchats_pings_keep_a_quiet_websocket_open_past_nginxs_read_timeout(start_server,
                                                                              start_nginx):
    """The deploy file's timeouts are 3 ping intervals (180 s against 60 s); scaled down
    here to 2 s and 6 s. Without pings, nginx closes the quiet websocket after 6 s."""
    interval = 2

    def scaled(site: str) -> str:
        for name in ("proxy_read_timeout", "proxy_send_timeout"):
            site = replace_once(site, f"{name} 180s;", f"{name} {3 * interval}s;")
        return site

    pinged = start_server(greenchat_argv(), env={"CHAT_PING_INTERVAL": str(interval)})
    unpinged = start_server(greenchat_argv(), env={"CHAT_PING_INTERVAL": "0"})
    through_pinged = start_nginx(pinged.port, scaled)
    through_unpinged = start_nginx(unpinged.port, scaled)
    quiet = connect(through_pinged.port)
    control = connect(through_unpinged.port)
    try:
        until = time.monotonic() + 2 * 3 * interval + 1  # past two of nginx's timeouts
        assert pong_until(quiet, until) >= 2
        quiet.sendall(masked_frame(b"still here"))
        assert pong_until_text(quiet) == b"still here"
        control.settimeout(1)
        with pytest.raises(ConnectionError):  # nginx closed it long ago: EOF at once
            read_frame(control)
    finally:
        quiet.close()
        control.close()
    unpinged.wait_stats(lambda s: s["connections"] == 0)  # nginx closed greenchat's side too
    assert pinged.stats()["idle_dropped"] == 0
    assert through_pinged.errors() == [] and through_unpinged.errors() == []


def pong_until_text(sock: socket.socket) -> bytes:
    """The next text message, answering pings on the way (bounded by the socket's timeout)."""
    sock.settimeout(10)
    for _ in range(10):
        opcode, payload = read_frame(sock)
        if opcode == Opcode.TEXT:
            return payload
        if opcode == Opcode.PING:
            sock.sendall(masked_frame(payload, Opcode.PONG))
    raise AssertionError("no text message among 10 frames")
