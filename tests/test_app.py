"""The Flask side: the extension in an existing app, the page, /stats, configuration."""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

import pytest
import websocket
from flask import Flask

from chat import Chat, create_app
from chat.app import hub_of
from chat.config import ConfigError
from helpers import ROOT


@pytest.fixture
def example(start_server):
    return start_server([sys.executable, str(ROOT / "examples" / "embed.py"), "--port", "0"])


def test_the_embedding_example_serves_its_own_routes_and_the_chat(example):
    assert example.get("/") == (200, "An existing app. Its chat is at /chat.\n")
    status, page = example.get("/chat")
    assert status == 200 and "<html" in page.lower()
    a = websocket.create_connection(f"ws://127.0.0.1:{example.port}/chat", timeout=10)
    b = websocket.create_connection(f"ws://127.0.0.1:{example.port}/chat", timeout=10)
    a.send("from a")
    assert (a.recv(), b.recv()) == ("from a", "from a")
    # Server code publishes to the same clients.
    request = urllib.request.Request(example.url + "/announce", data=b"from the server")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 204
    assert (a.recv(), b.recv()) == ("from the server", "from the server")
    assert example.stats()["connections"] == 2


def test_the_example_keeps_the_classic_blocking_handler_working(example):
    ws = websocket.create_connection(f"ws://127.0.0.1:{example.port}/echo", timeout=10)
    for text in ("one", "two"):
        ws.send(text)
        assert ws.recv() == text
    ws.close()


def test_stats_reports_the_documented_fields(greenchat):
    stats = greenchat.stats()
    for field in ("connections", "messages_received", "deliveries", "slow_consumers_closed",
                  "rss_bytes", "pid", "uptime_s"):
        assert isinstance(stats[field], (int, float)), field
    assert stats["pid"] == greenchat.pid
    assert stats["rss_bytes"] > 1_000_000


def test_a_plain_get_of_the_chat_path_serves_the_web_page(greenchat):
    status, page = greenchat.get("/")
    assert status == 200
    assert "WebSocket" in page


def test_a_plain_get_of_an_unknown_path_is_404(greenchat):
    with pytest.raises(urllib.error.HTTPError) as error:
        greenchat.get("/nowhere")
    assert error.value.code == 404


def test_the_extension_keeps_its_state_per_app():
    first, second = Flask("first"), Flask("second")
    chat = Chat()
    chat.init_app(first)
    chat.init_app(second)
    assert hub_of(first) is not hub_of(second)
    assert first.config["CHAT_PATH"] == "/"


def test_create_app_reads_chat_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("CHAT_MAX_MESSAGE_SIZE", "4096")
    monkeypatch.setenv("CHAT_PATH", "/ws")
    app = create_app()
    assert app.config["CHAT_MAX_MESSAGE_SIZE"] == 4096
    assert app.url_map.bind("localhost").match("/ws", websocket=True)[0] == "chat.websocket"


@pytest.mark.parametrize("name, value, message", [
    ("CHAT_MAX_BACKLOG", "-1", "CHAT_MAX_BACKLOG must be positive"),
    ("CHAT_MAX_MESSAGE_SIZE", "big", "CHAT_MAX_MESSAGE_SIZE must be int"),
    ("CHAT_PATH", "chat", "CHAT_PATH must start with '/'"),
    ("CHAT_MAX_MESAGE_SIZE", "10", "unknown setting CHAT_MAX_MESAGE_SIZE"),
    ("CHAT_RATE_LIMIT_ACTION", "kick", "CHAT_RATE_LIMIT_ACTION must be one of close, drop"),
    ("CHAT_ROOMS_PATH", "rooms", "CHAT_ROOMS_PATH must start with '/'"),
])
def test_a_bad_setting_is_refused_with_its_name(monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        create_app()
