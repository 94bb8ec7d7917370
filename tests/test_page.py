"""The web chat page (chat/static/index.html) in headless Chromium, against real servers:
messaging, reconnecting, and rooms (the selector, the ``#room=`` hash, the presence count).

Needs the `playwright` package and Debian's Chromium at /usr/bin/chromium (never
`playwright install`). Without them the module is skipped, except in CI (``CI`` set),
where a missing browser is a failure.
"""

from __future__ import annotations

import os
import re
import socket

import pytest
import websocket  # websocket-client

from chat.protocol import Opcode, TextMessage
from helpers import Server, greenchat_argv
from raw_clients import connect, masked_frame, read_frame
from test_tls import COMMANDS, tls_client, wait_https_port, wait_stats

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # checked below, with a clear reason
    sync_playwright = None

CHROMIUM = "/usr/bin/chromium"
# Why each flag: docs/design.md, "Traps".
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-quic", "--ignore-certificate-errors"]
TIMEOUT_MS = 10_000
RECONNECT_TIMEOUT_MS = 20_000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _missing_browser() -> str | None:
    if sync_playwright is None:
        return ("the playwright package is not installed "
                "(PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 pip install -e '.[test]')")
    if not os.access(CHROMIUM, os.X_OK):
        return f"Chromium not found at {CHROMIUM} (apt-get install chromium, or .ci/install-system-deps)"
    return None


MISSING = _missing_browser()
if MISSING and not os.environ.get("CI"):
    pytest.skip(f"browser tests need a browser: {MISSING}", allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    if MISSING:  # only reached in CI, where a missing browser must fail, not skip
        pytest.fail(f"browser tests cannot run in CI: {MISSING}", pytrace=False)
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def open_chat(browser):
    """Open the chat page at a URL, each in its own browser context (its own "user").

    Uncaught JavaScript errors on any page fail the test at teardown.
    """
    contexts = []
    errors: list[str] = []

    def open_page(url: str):
        context = browser.new_context(viewport={"width": 720, "height": 540})
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url)
        return page

    yield open_page
    for context in contexts:
        context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def expect_connected(page, timeout: float = TIMEOUT_MS) -> None:
    status = page.get_by_test_id("status")
    expect(status).to_have_attribute("data-state", "open", timeout=timeout)
    expect(status).to_have_text("connected")
    expect(page.get_by_test_id("input")).to_be_enabled()
    expect(page.get_by_test_id("send")).to_be_enabled()


def send(page, text: str, *, with_enter: bool = False) -> None:
    page.get_by_test_id("input").fill(text)
    if with_enter:
        page.get_by_test_id("input").press("Enter")
    else:
        page.get_by_test_id("send").click()
    expect(page.get_by_test_id("input")).to_have_value("")


def message_texts(page):
    return page.get_by_test_id("messages").get_by_test_id("message-text")


def same_port_argv(port: int) -> list[str]:
    argv = greenchat_argv()
    argv[argv.index("--port") + 1] = str(port)
    return argv


@pytest.mark.slow
def test_two_pages_exchange_messages_through_the_server(greenchat, open_chat, tmp_path):
    page_a = open_chat(greenchat.url + "/")
    # Query and fragment belong to the page: the socket URL must drop them.
    page_b = open_chat(greenchat.url + "/?from=test#bottom")
    for page in (page_a, page_b):
        expect_connected(page)
    greenchat.wait_stats(lambda s: s["connections"] == 2)

    send(page_a, "hello from A")
    for page in (page_a, page_b):
        expect(message_texts(page)).to_have_text(["hello from A"])

    send(page_b, "hello from B", with_enter=True)
    for page in (page_a, page_b):
        expect(message_texts(page)).to_have_text(["hello from A", "hello from B"])

    stats = greenchat.stats()
    assert stats["connections"] == 2
    assert stats["messages_received"] == 4  # each page's join of the lobby, and its message
    assert stats["deliveries"] == 4

    for name, page in (("a", page_a), ("b", page_b)):
        path = tmp_path / f"page-{name}.png"
        page.screenshot(path=path)
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE), f"{path} is not a PNG"
        assert len(data) > 5_000, f"{path} is only {len(data)} bytes: a blank page?"


@pytest.mark.slow
def test_pages_served_over_https_chat_over_wss_with_a_raw_tls_client(start_server, open_chat,
                                                                    certificate):
    """The page derives wss:// from https:// by itself. The server speaks only TLS on its
    port, so a ws:// attempt (or a browser refusing the certificate) would be counted as a
    tls_handshake refusal, not as a connection."""
    cert, key = certificate
    server = start_server(COMMANDS["greenchat serve"](cert, key), ready=False)
    port = wait_https_port(server)
    page_a = open_chat(f"https://127.0.0.1:{port}/")
    page_b = open_chat(f"https://127.0.0.1:{port}/")
    for page in (page_a, page_b):
        expect_connected(page)
    raw = tls_client(port, cert)
    wait_stats(port, cert, lambda s: s["connections"] == 3)

    send(page_a, "from page A")
    assert raw.receive() == TextMessage("from page A")
    raw.send(b"from the raw TLS client")
    assert raw.receive() == TextMessage("from the raw TLS client")
    send(page_b, "from page B")
    assert raw.receive() == TextMessage("from page B")
    for page in (page_a, page_b):
        expect(message_texts(page)).to_have_text(
            ["from page A", "from the raw TLS client", "from page B"])

    stats = wait_stats(port, cert, lambda s: s["deliveries"] == 9)
    assert stats["connections"] == 3 and stats["handshakes"] == 3
    assert stats["messages_received"] == 5  # two pages' joins, three messages
    assert stats["refused"] == {}, server.output


def test_chromium_chats_compressed_and_a_plain_client_in_the_room_reads_the_same_text(
        greenchat, open_chat):
    """Chromium offers permessage-deflate: the server agrees, inflates what the page sends
    and sends it back compressed; a client that did not offer it gets the same text plain."""
    page = open_chat(greenchat.url + "/")
    expect_connected(page)
    plain = connect(greenchat.port)  # offers nothing
    greenchat.wait_stats(lambda s: s["connections"] == 2 and s["deflate_connections"] == 1)
    text = " ".join(["compress me, Chromium!"] * 150)

    send(page, text)

    expect(message_texts(page)).to_have_text([text])
    # read_frame's codec agreed to nothing: a compressed frame would fail it.
    assert read_frame(plain) == (Opcode.TEXT, text.encode())
    stats = greenchat.stats()
    assert stats["messages_received"] == 2 and stats["protocol_errors"] == 0  # join, message
    # The plain frame, and the page's compressed one: a few dozen bytes, not 3,449 again.
    assert stats["bytes_out"] < len(text) + 4 + len(text) // 10, stats["bytes_out"]
    plain.close()


def test_empty_input_is_not_sent(greenchat, open_chat):
    page = open_chat(greenchat.url + "/")
    expect_connected(page)
    page.get_by_test_id("input").fill("   ")
    page.get_by_test_id("input").press("Enter")
    page.get_by_test_id("send").click()
    send(page, "only this one")
    expect(message_texts(page)).to_have_text(["only this one"])
    assert greenchat.stats()["messages_received"] == 2  # the page's join, its message


@pytest.mark.slow
def test_the_page_reconnects_by_itself_when_the_server_returns_on_the_same_port(
        start_server, open_chat):
    first = start_server(greenchat_argv())
    page = open_chat(first.url + "/")
    expect_connected(page)
    status = page.get_by_test_id("status")

    first.stop()
    expect(status).to_have_text(re.compile(r"^reconnecting in \d+s$"))
    expect(status).to_have_attribute("data-state", "waiting")
    expect(page.get_by_test_id("input")).to_be_disabled()
    expect(page.get_by_test_id("send")).to_be_disabled()

    second = start_server(same_port_argv(first.port))
    assert second.port == first.port
    expect_connected(page, timeout=RECONNECT_TIMEOUT_MS)
    second.wait_stats(lambda s: s["connections"] == 1)

    send(page, "back again")
    expect(message_texts(page)).to_have_text(["back again"])
    assert second.stats()["messages_received"] == 2  # the page's join, its message


def test_a_message_containing_html_is_shown_as_text_not_rendered(greenchat, open_chat):
    page = open_chat(greenchat.url + "/")
    expect_connected(page)
    payload = '<img src=x onerror="window.__xss = true"><b>bold</b>'

    send(page, payload)

    expect(message_texts(page)).to_have_text([payload])
    messages = page.get_by_test_id("messages")
    assert messages.locator("img").count() == 0
    assert messages.locator("b").count() == 0
    assert page.evaluate("window.__xss") is None


def test_the_page_keeps_only_the_newest_500_messages(greenchat, open_chat):
    page = open_chat(greenchat.url + "/")
    expect_connected(page)
    sender = websocket.create_connection(greenchat.ws_url, timeout=10)
    try:
        for i in range(520):
            sender.send(f"message {i}")
    finally:
        sender.close()

    texts = message_texts(page)
    expect(texts.last).to_have_text("message 519")
    expect(texts).to_have_count(500)
    expect(texts.first).to_have_text("message 20")


def test_the_page_connects_wherever_the_app_mounts_the_endpoint(start_server, open_chat):
    server = start_server(greenchat_argv(), env={"CHAT_PATH": "/rooms/lobby"})
    page = open_chat(server.url + "/rooms/lobby?x=1")
    expect_connected(page)
    server.wait_stats(lambda s: s["connections"] == 1)
    send(page, "mounted elsewhere")
    expect(message_texts(page)).to_have_text(["mounted elsewhere"])


# --- Rooms -------------------------------------------------------------------------------


def room_name(page):
    return page.get_by_test_id("room-name")


def expect_in_room(page, room: str) -> None:
    """The page shows ``room``, names it in the URL hash, and its socket is open."""
    expect(room_name(page)).to_have_text(room)
    expect(page).to_have_url(re.compile(rf"#room={re.escape(room)}$"))
    expect_connected(page)


def join_by_typing(page, room: str) -> None:
    page.get_by_test_id("room-input").fill(room)
    page.get_by_test_id("room-input").press("Enter")


def expect_presence(page, count: int) -> None:
    presence = page.get_by_test_id("presence")
    expect(presence).to_have_text(f"{count} online")
    expect(presence).to_have_attribute("data-count", str(count))


def raw_send(sock: socket.socket, text: str) -> None:
    sock.sendall(masked_frame(text.encode()))


def expect_only_message_from_raw(page, sock: socket.socket, text: str) -> None:
    """A raw client's message is the one message the page shows."""
    raw_send(sock, text)
    expect(message_texts(page)).to_have_text([text])


def raw_receive_text(sock: socket.socket) -> str:
    opcode, payload = read_frame(sock)
    assert opcode == 0x1, f"expected a text frame, got opcode {opcode}"
    return payload.decode()


def test_a_message_in_one_room_is_shown_in_that_room_only(greenchat, open_chat):
    page_a = open_chat(greenchat.url + "/#room=alpha")
    page_b = open_chat(greenchat.url + "/#room=beta")
    expect_in_room(page_a, "alpha")
    expect_in_room(page_b, "beta")
    greenchat.wait_stats(lambda s: s["connections"] == 2)

    send(page_a, "for alpha only")
    expect(message_texts(page_a)).to_have_text(["for alpha only"])
    # B's own message reaches B after A's was delivered: had A's been sent to B too, it
    # would be ahead of this one in B's stream.
    send(page_b, "beta's own")
    expect(message_texts(page_b)).to_have_text(["beta's own"])
    expect(message_texts(page_a)).to_have_text(["for alpha only"])
    assert greenchat.stats()["deliveries"] == 2


@pytest.mark.slow
def test_clicking_a_listed_room_moves_the_page_there_and_counts_both_members(
        greenchat, open_chat):
    page_a = open_chat(greenchat.url + "/#room=alpha")
    page_b = open_chat(greenchat.url + "/#room=beta")
    expect_in_room(page_a, "alpha")
    expect_in_room(page_b, "beta")
    expect_presence(page_a, 1)
    expect_presence(page_b, 1)
    send(page_b, "said in beta")
    expect(message_texts(page_b)).to_have_text(["said in beta"])

    # The list comes from GET /rooms: alpha is there because A is in it.
    alpha = page_b.get_by_test_id("rooms").locator('[data-room="alpha"]')
    expect(alpha).to_have_attribute("aria-label", "alpha, 1 online")
    alpha.click()

    expect_in_room(page_b, "alpha")
    expect(alpha).to_have_attribute("aria-current", "true")
    expect(message_texts(page_b)).to_have_count(0)  # beta's messages stay in beta
    # B's beta socket was closed, not left behind: two clients in all, both in alpha.
    greenchat.wait_stats(lambda s: s["connections"] == 2)
    expect_presence(page_a, 2)
    expect_presence(page_b, 2)

    send(page_a, "welcome to alpha")
    for page in (page_a, page_b):
        expect(message_texts(page)).to_have_text(["welcome to alpha"])


# (server environment, the page's path = the lobby's, the rooms prefix)
PATHS = [
    pytest.param({}, "/", "/rooms", id="default-paths"),
    pytest.param({"CHAT_PATH": "/chat", "CHAT_ROOMS_PATH": "/chat/rooms"}, "/chat",
                 "/chat/rooms", id="paths-the-app-configures"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("env", "page_path", "rooms_path"), PATHS)
def test_the_presence_count_follows_a_raw_client_joining_and_leaving_the_room(
        start_server, open_chat, env, page_path, rooms_path):
    server: Server = start_server(greenchat_argv(), env=env)
    page = open_chat(server.url + page_path + "#room=gamma")
    expect_in_room(page, "gamma")
    expect_presence(page, 1)

    with connect(server.port, rooms_path + "/gamma") as raw:
        expect_presence(page, 2)
        expect_only_message_from_raw(page, raw, "from a raw client")
        assert raw_receive_text(raw) == "from a raw client"
        send(page, "from the page")
        assert raw_receive_text(raw) == "from the page"
    expect_presence(page, 1)

    page.get_by_test_id("rooms").locator('[data-room="lobby"]').click()
    expect_in_room(page, "lobby")
    with connect(server.port, page_path) as lobby:
        expect_only_message_from_raw(page, lobby, "back in the lobby")


def test_a_room_typed_in_stays_across_a_reload_and_the_lobby_is_not_heard(
        greenchat, open_chat):
    page = open_chat(greenchat.url + "/")
    expect(room_name(page)).to_have_text("lobby")
    expect_connected(page)
    join_by_typing(page, "delta")
    expect_in_room(page, "delta")
    expect(page.get_by_test_id("room-input")).to_have_value("")

    page.reload()
    expect_in_room(page, "delta")
    greenchat.wait_stats(lambda s: s["connections"] == 1)
    with connect(greenchat.port, "/") as lobby, connect(greenchat.port, "/rooms/delta") as delta:
        raw_send(lobby, "lobby chatter")
        assert raw_receive_text(lobby) == "lobby chatter"
        expect_only_message_from_raw(page, delta, "hello delta")


def test_the_back_button_returns_to_the_previous_room(greenchat, open_chat):
    page = open_chat(greenchat.url + "/#room=one")
    expect_in_room(page, "one")
    join_by_typing(page, "two")
    expect_in_room(page, "two")
    page.go_back()
    expect_in_room(page, "one")
    greenchat.wait_stats(lambda s: s["connections"] == 1)


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["has space", "slash/inside", "x" * 65, "caf\u00e9", ""])
def test_an_invalid_room_name_is_refused_on_the_page_with_a_message(
        greenchat, open_chat, bad):
    page = open_chat(greenchat.url + "/#room=kept")
    expect_in_room(page, "kept")
    error = page.get_by_test_id("room-error")
    expect(error).to_be_hidden()

    join_by_typing(page, bad)

    expect(error).to_be_visible()
    expect(error).to_contain_text("1 to 64 letters, digits or _ . ~ -")
    expect(page.get_by_test_id("room-input")).to_have_attribute("aria-invalid", "true")
    expect_in_room(page, "kept")
    assert greenchat.stats()["connections"] == 1

    join_by_typing(page, "fine_name.v2~x-y")
    expect(error).to_be_hidden()
    expect_in_room(page, "fine_name.v2~x-y")


def test_an_invalid_room_in_the_url_hash_lands_in_the_lobby_with_a_message(
        greenchat, open_chat):
    page = open_chat(greenchat.url + "/#room=no%20spaces")
    expect(page.get_by_test_id("room-error")).to_contain_text("\u201cno spaces\u201d")
    expect(room_name(page)).to_have_text("lobby")
    expect_connected(page)
    with connect(greenchat.port, "/") as lobby:
        expect_only_message_from_raw(page, lobby, "lobby hello")


@pytest.mark.slow
def test_what_is_said_while_the_server_restarts_reaches_the_page_once_and_a_reload_shows_it(
        start_server, open_chat, redis_server):
    """The page joins its room again with the id of the last message it showed: what was
    said meanwhile (here, published into the history while no server ran) comes first,
    nothing twice. A reload starts afresh: the room's history, each message once."""
    from chat.backplane import publish

    env = {"CHAT_REDIS_URL": redis_server.url, "CHAT_HISTORY": "100"}
    first = start_server(greenchat_argv(), env=env)
    page = open_chat(first.url + "/#room=ops")
    expect_connected(page)
    send(page, "before the restart")
    expect(message_texts(page)).to_have_text(["before the restart"])

    first.stop()
    expect(page.get_by_test_id("status")).to_have_attribute("data-state", "waiting")
    for text in ("said while down 1", "said while down 2"):
        publish(redis_server.url, text, "ops", history=100)
    second = start_server(same_port_argv(first.port), env=env)
    expect_connected(page, timeout=RECONNECT_TIMEOUT_MS)
    expected = ["before the restart", "said while down 1", "said while down 2"]
    expect(message_texts(page)).to_have_text(expected)
    send(page, "after")
    expect(message_texts(page)).to_have_text(expected + ["after"])

    page.reload()
    expect_connected(page)
    expect(message_texts(page)).to_have_text(expected + ["after"])
    assert second.stats()["connections"] == 1
