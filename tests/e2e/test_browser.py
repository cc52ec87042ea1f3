"""The demo page in headless Chromium, against the whole stack (`roomcast dev`).

Needs /usr/bin/chromium (`apt-get install -y --no-install-recommends chromium
chromium-driver`) and the `playwright` Python package; never `playwright
install`. Without Chromium the tests skip, unless ROOMCAST_REQUIRE_BROWSER=1,
where they fail.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Error, Page, expect, sync_playwright

from tests.support import scaled

if TYPE_CHECKING:
    from tests.e2e.conftest import DevStack

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
INSTALL = "apt-get install -y --no-install-recommends chromium chromium-driver"
# PLATFORM-NOTES.md, browsers.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = scaled(15.0) * 1000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Chromium. Skips (fails under ROOMCAST_REQUIRE_BROWSER=1) where it is not installed."""
    if not os.path.exists(CHROMIUM):
        message = f"headless Chromium is not installed ({CHROMIUM} is missing); install it as root with: {INSTALL}"
        if os.environ.get("ROOMCAST_REQUIRE_BROWSER") == "1":
            pytest.fail(message + " (ROOMCAST_REQUIRE_BROWSER=1 makes this a failure)", pytrace=False)
        pytest.skip(message)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


class ChatPage:
    """One user's tab on the demo page; collects the page's JS errors."""

    def __init__(self, browser: Browser, stack: DevStack, name: str) -> None:
        self.name = name
        self.context = browser.new_context()
        self.context.set_default_timeout(TIMEOUT_MS)
        self.page: Page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(f"{name}: uncaught {exc}"))
        self.page.on("console", self._on_console)
        self.page.goto(stack.page)
        # The chat service put the gateway's URL in the page (else it would guess /ws on its own port).
        expect(self.page.locator('meta[name="roomcast-ws"]')).to_have_attribute("content", stack.ws)

    def _on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(f"{self.name}: console: {message.text}")

    def join(self, room: str) -> None:
        self.page.fill("#room", room)
        self.page.fill("#name", self.name)
        self.page.click("#connect")
        expect(self.page.locator("#status")).to_contain_text("joined", timeout=TIMEOUT_MS)

    def say(self, body: str) -> None:
        self.page.fill("#message", body)
        self.page.click("#send")
        expect(self.page.locator("#message")).to_have_value("")

    def expect_bodies(self, bodies: list[str]) -> None:
        """Exactly these messages, each once, in seq order 1..n (the room is new)."""
        messages = self.page.locator("#messages .message")
        expect(messages).to_have_count(len(bodies), timeout=TIMEOUT_MS)
        for body in bodies:
            expect(messages.filter(has_text=body)).to_have_count(1)
        seqs = messages.evaluate_all("els => els.map(e => e.dataset.seq)")
        assert seqs == [str(n) for n in range(1, len(bodies) + 1)], f"{self.name} shows seqs {seqs}"

    def close(self) -> None:
        try:
            self.context.close()
        except Error:
            pass


def new_room() -> str:
    return "browser-" + uuid.uuid4().hex[:10]


def test_two_users_in_one_room_each_see_both_messages(browser: Browser, dev_stack: DevStack) -> None:
    room = new_room()
    alice, bob = ChatPage(browser, dev_stack, "alice"), ChatPage(browser, dev_stack, "bob")
    try:
        alice.join(room)
        bob.join(room)
        alice.say("hello from alice")
        bob.say("hi alice, bob here")
        for tab in (alice, bob):
            tab.expect_bodies(["hello from alice", "hi alice, bob here"])
            # Each message shows its author and time as well as its body.
            line = tab.page.locator("#messages .message", has_text="hello from alice")
            expect(line).to_contain_text("alice")
            expect(line.locator("time")).not_to_have_text("")
        assert alice.errors + bob.errors == []
    finally:
        alice.close()
        bob.close()


def test_a_late_joiner_sees_earlier_messages_from_history(browser: Browser, dev_stack: DevStack) -> None:
    room = new_room()
    alice = ChatPage(browser, dev_stack, "alice")
    carol = None
    try:
        alice.join(room)
        alice.say("first")
        alice.say("second")
        alice.expect_bodies(["first", "second"])
        carol = ChatPage(browser, dev_stack, "carol")
        carol.join(room)
        carol.expect_bodies(["first", "second"])
        assert alice.errors + carol.errors == []
    finally:
        alice.close()
        if carol is not None:
            carol.close()
