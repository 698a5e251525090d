"""The chat page in headless Chromium (Debian's `chromium`), driven over the DevTools
protocol with aiohttp's websocket client: type a question, watch the answer stream in,
reload, and the conversation is still there. Screenshots land in the test's tmp dir.

Skipped, with the reason shown, where Chromium is not installed (`.ci/run` installs it
with apt-get where it can)."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bot.service import ChatService
from bot.store import Store
from bot.web_chat import make_app
from engine.serve_config import ServeConfig
from engine.server import create_app, start_server
from engine.types import SamplingParams

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium is not installed (apt-get install chromium): page test skipped",
)

ANSWER = "Paris is the capital of France. It is known for the Eiffel Tower."
QUESTION = "What is the capital of France?"
GREEDY = SamplingParams(max_new_tokens=100, temperature=0.0)
PHONE = {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True}


class Page:
    """One browser tab over the DevTools protocol (a flat session on the browser socket)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, session: str) -> None:
        self.ws = ws
        self.session = session
        self.requests: list[str] = []

    @classmethod
    async def open(cls, ws: aiohttp.ClientWebSocketResponse, ids: Any) -> Page:
        page = cls(ws, "")
        page._ids = ids
        target = await page.send("Target.createTarget", url="about:blank", browser=True)
        attached = await page.send(
            "Target.attachToTarget", targetId=target["targetId"], flatten=True, browser=True
        )
        page.session = attached["sessionId"]
        for method in ("Page.enable", "Runtime.enable", "Network.enable"):
            await page.send(method)
        await page.send("Emulation.setDeviceMetricsOverride", **PHONE)
        return page

    async def send(self, method: str, browser: bool = False, **params: Any) -> dict[str, Any]:
        message_id = next(self._ids)
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params}
        if not browser:
            message["sessionId"] = self.session
        await self.ws.send_str(json.dumps(message))
        while True:
            reply = json.loads((await asyncio.wait_for(self.ws.receive(), 30)).data)
            if reply.get("method") == "Network.requestWillBeSent":
                self.requests.append(reply["params"]["request"]["url"])
            if reply.get("id") == message_id:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply.get("result", {})

    async def js(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        while not (value := await self.js(expression)):
            assert time.monotonic() < deadline, f"never true: {expression}"
            await asyncio.sleep(0.05)
        return value

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_for("document.body && document.body.dataset.ready === '1'")

    async def reload(self) -> None:
        await self.js("delete document.body.dataset.ready")
        await self.send("Page.reload")
        await self.wait_for("document.body && document.body.dataset.ready === '1'")

    async def type_and_send(self, text: str) -> None:
        await self.js("document.getElementById('input').focus()")
        await self.send("Input.insertText", text=text)
        for kind in ("keyDown", "keyUp"):
            await self.send(
                "Input.dispatchKeyEvent",
                type=kind,
                key="Enter",
                code="Enter",
                windowsVirtualKeyCode=13,
            )

    async def bubbles(self) -> list[tuple[str, str]]:
        shown = await self.js(
            "[...document.querySelectorAll('.msg')].map(m => [m.classList[1], m.textContent])"
        )
        return [(kind, text) for kind, text in shown]

    async def screenshot(self, path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        shot = await self.send("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))
        with capsys.disabled():  # in the test output even when it passes
            print(f"\nscreenshot of the chat page: {path}")


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Page]:
    profile = tmp_path / "profile"
    assert CHROMIUM is not None
    process = subprocess.Popen(
        [
            CHROMIUM,
            "--headless=new",
            "--no-sandbox",  # CI runs as root
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            assert process.poll() is None, "chromium exited at start"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            await asyncio.sleep(0.1)
        port, path = port_file.read_text().splitlines()[:2]
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=0) as ws:
                yield await Page.open(ws, itertools.count(1))
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, 9)
            process.wait()


async def watch_streaming(page: Page) -> None:
    """Record every text the newest bot bubble shows while the answer arrives."""
    await page.js(
        """
        window.seen = [];
        new MutationObserver(() => {
          const bots = document.querySelectorAll('.msg.bot');
          const text = bots.length ? bots[bots.length - 1].textContent : '';
          if (text && text !== window.seen[window.seen.length - 1]) window.seen.push(text);
        }).observe(document.getElementById('log'),
                   {subtree: true, childList: true, characterData: true});
        """
    )


async def ask_and_check_stream(page: Page) -> None:
    await watch_streaming(page)
    await page.type_and_send(QUESTION)
    await page.wait_for(
        "[...document.querySelectorAll('.msg.bot')].some(m => m.textContent === "
        f"{json.dumps(ANSWER)} && !m.classList.contains('pending'))"
    )
    seen = await page.js("window.seen")
    assert len(seen) >= 3, f"the answer did not stream: {seen}"
    assert all(ANSWER.startswith(text) for text in seen)
    assert await page.js("document.getElementById('input').value") == ""


async def test_page_with_stored_conversation(
    browser: Page, tmp_path: Path, scripted_engine: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    engine, _model = scripted_engine(ANSWER, delay_s=0.02)
    store = await Store.open(tmp_path / "bot.db")
    service = ChatService(store, engine, system_prompt="Be brief.", sampling=GREEDY)
    runner, port = await start_server(
        make_app(service, engine, ServeConfig(), GREEDY), "127.0.0.1", 0
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        await browser.goto(url)
        assert "stored on this server" in await browser.js(
            "document.getElementById('note').textContent"
        )
        await ask_and_check_stream(browser)
        await browser.screenshot(tmp_path / "chat-stored.png", capsys)
        await browser.reload()
        assert await browser.bubbles() == [("user", QUESTION), ("bot", ANSWER)]
        with sqlite3.connect(tmp_path / "bot.db") as db:
            rows = db.execute("SELECT platform, role, text FROM messages ORDER BY id").fetchall()
        assert rows == [("web", "user", QUESTION), ("web", "assistant", ANSWER)]
        await browser.js("document.getElementById('reset').click()")
        await browser.wait_for("document.querySelectorAll('.msg.user').length === 0")
        await browser.reload()
        assert await browser.bubbles() == []
        assert all(u.startswith(url) or u.startswith("data:") for u in browser.requests), (
            f"requests left the server: {browser.requests}"
        )
    finally:
        await runner.cleanup()
        await store.close()


async def test_engine_page_keeps_the_conversation_in_the_browser(
    browser: Page, tmp_path: Path, scripted_engine: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    engine, _model = scripted_engine(ANSWER, delay_s=0.02)
    runner, port = await start_server(create_app(engine, ServeConfig(), GREEDY), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{port}/"
    try:
        await browser.goto(url)
        assert "only in this browser" in await browser.js(
            "document.getElementById('note').textContent"
        )
        assert await browser.js("!document.getElementById('model').hidden")  # model + adapter
        await ask_and_check_stream(browser)
        await browser.screenshot(tmp_path / "chat-browser.png", capsys)
        await browser.reload()
        assert await browser.bubbles() == [("user", QUESTION), ("bot", ANSWER)]
        kept = json.loads(await browser.js("localStorage.getItem('lorabot.history')"))
        assert kept == [
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": ANSWER},
        ]
    finally:
        await runner.cleanup()
