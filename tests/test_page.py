"""The web chat page (chat/static/index.html) in headless Chromium, against real servers.

Needs the `playwright` package and Debian's Chromium at /usr/bin/chromium (never
`playwright install`). Without them the module is skipped, except in CI (``CI`` set),
where a missing browser is a failure.
"""

from __future__ import annotations

import os
import re

import pytest
import websocket  # websocket-client

from conftest import greenchat_argv

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # checked below, with a clear reason
    sync_playwright = None

CHROMIUM = "/usr/bin/chromium"
# See ../shared/DESIGN.md, "Headless Chromium for browser tests".
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-quic"]
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
    assert stats["messages_received"] == 2
    assert stats["deliveries"] == 4

    for name, page in (("a", page_a), ("b", page_b)):
        path = tmp_path / f"page-{name}.png"
        page.screenshot(path=path)
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE), f"{path} is not a PNG"
        assert len(data) > 5_000, f"{path} is only {len(data)} bytes: a blank page?"


def test_empty_input_is_not_sent(greenchat, open_chat):
    page = open_chat(greenchat.url + "/")
    expect_connected(page)
    page.get_by_test_id("input").fill("   ")
    page.get_by_test_id("input").press("Enter")
    page.get_by_test_id("send").click()
    send(page, "only this one")
    expect(message_texts(page)).to_have_text(["only this one"])
    assert greenchat.stats()["messages_received"] == 1


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
    assert second.stats()["messages_received"] == 1


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
