"""Opens a page in headless Debian chromium and watches it through the DevTools protocol (test helper).

Collected: console errors, uncaught exceptions, log-domain errors and every network request the page makes
(``file:`` and ``data:`` URLs are local, everything else is a network request).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from websockets.sync.client import connect

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--remote-debugging-port=0",
    "--window-size=1500,1000",
]


@dataclass
class PageReport:
    """What the page did: errors, requests, and the values of the evaluated expressions."""

    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    values: dict = field(default_factory=dict)


def chromium_available() -> bool:
    return Path(CHROMIUM).is_file() or shutil.which("chromium") is not None


def _send(ws, counter: list[int], method: str, params: dict | None = None) -> dict:
    counter[0] += 1
    ws.send(json.dumps({"id": counter[0], "method": method, "params": params or {}}))
    return {"id": counter[0]}


def _pump(ws, report: PageReport, until_id: int | None, until_event: str | None, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            report.errors.append(
                "console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
            )
        elif method == "Runtime.exceptionThrown":
            report.errors.append("exception: " + json.dumps(params["exceptionDetails"])[:500])
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            report.errors.append("log: " + params["entry"]["text"])
        elif method == "Network.requestWillBeSent":
            url = params["request"]["url"]
            if not url.startswith(("file:", "data:")):
                report.requests.append(url)
        if until_id is not None and message.get("id") == until_id:
            return message
        if until_event is not None and method == until_event:
            return message
    raise TimeoutError(f"no {until_event or until_id} from chromium within {timeout} s")


def open_page(
    path: Path, expressions: dict[str, str], screenshot: Path | None = None, timeout: float = 60
) -> PageReport:
    """Loads ``path`` and evaluates each JavaScript expression after the load event (and 0.5 s of settling)."""
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    proc = subprocess.Popen(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"], stderr=subprocess.PIPE, text=True
    )
    report = PageReport()
    try:
        port = None
        deadline = time.monotonic() + timeout
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            match = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            port = match and int(match[1])
            if not line and proc.poll() is not None:
                raise RuntimeError("chromium exited before listening")
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(t for t in targets if t["type"] == "page")
        counter = [0]
        with connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
            for domain in ("Runtime", "Log", "Network", "Page"):
                _pump(ws, report, _send(ws, counter, f"{domain}.enable")["id"], None, timeout)
            _send(ws, counter, "Page.navigate", {"url": path.resolve().as_uri()})
            _pump(ws, report, None, "Page.loadEventFired", timeout)
            end = time.monotonic() + 0.5
            while time.monotonic() < end:
                try:
                    _pump(ws, report, None, "never", end - time.monotonic())
                except TimeoutError:
                    break
                except Exception:  # recv timeout of the websocket
                    break
            for name, expression in expressions.items():
                sent = _send(ws, counter, "Runtime.evaluate", {"expression": expression, "returnByValue": True})
                reply = _pump(ws, report, sent["id"], None, timeout)
                report.values[name] = reply["result"]["result"].get("value")
            if screenshot is not None:
                sent = _send(ws, counter, "Page.captureScreenshot", {"format": "png"})
                reply = _pump(ws, report, sent["id"], None, timeout)
                screenshot.write_bytes(base64.b64decode(reply["result"]["data"]))
    finally:
        proc.kill()
        proc.wait(30)
        proc.stderr.close()
        shutil.rmtree(profile, ignore_errors=True)
    return report
