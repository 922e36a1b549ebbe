"""Drive Debian's headless Chromium over the DevTools protocol: open a page, click, read its text, screenshot.

`--dump-dom` cannot click, and the Prefect UI shows a run's artifacts on a tab (its graph draws them on a canvas).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import websockets

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--window-size=1400,1000"]


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    """One tab of a headless Chromium started for this object; use as a context manager."""

    def __init__(self, binary: str):
        self.profile = Path(tempfile.mkdtemp(prefix="kiln-chromium-"))
        self.process = subprocess.Popen(
            [binary, *FLAGS, "--remote-debugging-port=0", f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.ids = itertools.count(1)

    def __enter__(self) -> "Page":
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.is_file() or not port_file.read_text().strip():
            if time.monotonic() > deadline:
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.2)
        port = port_file.read_text().split()[0]
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list").json()
        self.websocket_url = next(target["webSocketDebuggerUrl"] for target in targets if target["type"] == "page")
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)

    def run(self, url: str, click_text: str | None, screenshot: Path, settle_s: float = 5.0) -> str:
        """Open `url`, wait for it to render, click the first element whose text is `click_text` (if given), wait
        again, save a PNG to `screenshot`; return the page's visible text."""
        return asyncio.run(self._run(url, click_text, screenshot, settle_s))

    async def _run(self, url: str, click_text: str | None, screenshot: Path, settle_s: float) -> str:
        async with websockets.connect(self.websocket_url, max_size=64 * 1024**2) as socket:
            await self._call(socket, "Page.enable")
            await self._call(socket, "Page.navigate", url=url)
            await asyncio.sleep(settle_s)
            if click_text is not None:
                clicked = await self._evaluate(socket, f"""(() => {{
                    const match = [...document.querySelectorAll('button, a, [role=tab], li, span')]
                        .find(element => element.textContent.trim() === {json.dumps(click_text)});
                    if (!match) return false;
                    match.click();
                    return true;
                }})()""")
                if not clicked:
                    raise AssertionError(f"nothing labelled {click_text!r} to click on {url}")
                await asyncio.sleep(settle_s)
            shot = await self._call(socket, "Page.captureScreenshot", format="png")
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            return await self._evaluate(socket, "document.body.innerText")

    async def _evaluate(self, socket, expression: str):
        result = await self._call(socket, "Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def _call(self, socket, method: str, **params):
        message_id = next(self.ids)
        await socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            reply = json.loads(await socket.recv())
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
