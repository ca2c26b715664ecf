"""``make web-check``: the example web app (``examples/web``) in a real headless Chromium, against
a real local mesh through the edge (``services/edge``).

A local mesh (``meshctl up`` on free ports; every model call takes 100 ms, as a small hosted
model's first token might) and its edge serve the page; Chromium opens the signed-in URL that
``meshctl edge url`` prints and, as a person would, clicks "Ask" (1) five times: each answer is
written token by token before the outcome arrives, and ends completed with "391" in it. Time to
first token is measured twice for each task: in the browser (the click's submission to the first
token drawn) and on the bus itself (the submission stored to the first ``live.token`` published,
seen by an admin subscriber: the mesh's own TTFT); the difference is what the edge and the
browser add. (2) Once more, the edge is killed (SIGKILL) as soon as the first token is drawn and
started again on its port: the page reconnects with ``Last-Event-ID`` and the task still ends
completed on the page, no progress line shown twice. (3) Screenshots (the first answer half
written, ``<out>-streaming.png``; the page at the end, ``<out>``), which must be real pictures. Exit 0 when all hold.

    .venv/bin/python tests/browser/check_web_app.py --out .mesh/web-app.png
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nats
from cdp import Browser, chromium

from meshctl.identity import Identities
from meshctl.local import MeshState

MESHCTL = Path(sys.executable).with_name("meshctl")
RUNS = 5
QUIET = ("--disable-background-networking", "--disable-component-update", "--no-first-run", "--disable-sync")


class Bus:
    """When each task's submission was stored and its first token published, as seen on the bus
    (an admin subscriber in a thread of its own, so the browser's waits do not delay it)."""

    def __init__(self, home: Path) -> None:
        self.ids, self.state = Identities(home), MeshState.load(home)
        self.submitted: dict[str, float] = {}
        self.first_token: dict[str, float] = {}
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._watch(), self.loop).result(30)

    async def _watch(self) -> None:
        assert self.state is not None
        self.nc = nc = await nats.connect(self.state.nats_url, **self.ids.connect_options("admin"))

        async def submitted(msg: nats.aio.msg.Msg) -> None:
            self.submitted.setdefault(msg.subject.split(".")[3], time.time())

        async def token(msg: nats.aio.msg.Msg) -> None:
            self.first_token.setdefault(msg.subject.split(".")[3], time.time())

        await nc.subscribe("task.v1.demo.*.submitted", cb=submitted)
        await nc.subscribe("live.v1.demo.*.token", cb=token)
        await nc.flush()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.nc.close(), self.loop).result(10)


def ctl(home: Path, *args: str) -> str:
    return subprocess.run([str(MESHCTL), "--home", str(home), *args], check=True, capture_output=True,
                          text=True, timeout=120).stdout.strip()  # fmt: skip


def ask(page: Browser, n: int, streaming: Path | None = None) -> dict:
    """Click "Ask" and wait for the outcome; ``streaming``: a screenshot there as soon as the first
    token is drawn (the answer half written)."""
    page.click("#send")
    if streaming is not None:
        page.until(f"window.meshStats.runs.length === {n} && window.meshStats.last.tokens > 0", 60)
        streaming.write_bytes(base64.b64decode(page.send("Page.captureScreenshot", {"format": "png"})["data"]))
    page.until(f"window.meshStats.runs.length === {n} && document.body.dataset.state !== 'running'", 60)
    return page.value("window.meshStats.last")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(".mesh") / "web-app.png", help="where the screenshot goes")
    args = ap.parse_args()
    binary = chromium("web-check")
    home = Path(tempfile.mkdtemp(prefix="agentmesh-web-"))
    models = home / "models.json"
    models.write_text(json.dumps({
        "providers": {"hosted": {"kind": "scripted", "latency_ms": 100}},
        "models": {"m": {"provider": "hosted", "id": "scripted-1"}}, "routes": {"default": ["m"]},
    }))  # fmt: skip
    os.environ["MESH_MODEL_CONFIG"] = str(models)
    problems: list[str] = []
    page, bus = None, None
    try:
        ctl(home, "up", "--nats-port", "0", "--http-port", "0", "--redis-port", "0")
        ctl(home, "edge", "start")
        url = ctl(home, "edge", "url", "--tenant", "demo", "--user", "alice")
        bus = Bus(home)
        page = Browser(binary, *QUIET)
        page.open(url)
        page.until("document.getElementById('who').textContent.includes('alice')")
        browser_ms, bus_ms = [], []
        args.out.parent.mkdir(parents=True, exist_ok=True)
        streaming = args.out.with_name(f"{args.out.stem}-streaming.png")
        for n in range(1, RUNS + 1):
            run = ask(page, n, streaming if n == 1 else None)
            task = run["taskId"]
            if run["outcome"] != "task.completed" or "391" not in (run.get("answer") or ""):
                problems.append(f"run {n}: {run['outcome']}: {run.get('answer')!r}")
            if not run["tokens"] or not run["firstTokenAt"] or run["firstTokenAt"] > run["outcomeAt"]:
                problems.append(f"run {n}: the answer was not written token by token before the outcome: {run}")
                continue
            deadline = time.monotonic() + 5
            while task not in bus.first_token and time.monotonic() < deadline:
                time.sleep(0.05)
            if task not in bus.first_token or task not in bus.submitted:
                problems.append(f"run {n}: the bus saw no submission or token of {task}")
                continue
            browser_ms.append(run["ttftMs"])
            bus_ms.append((bus.first_token[task] - bus.submitted[task]) * 1000)

        # (2) the edge dies as the first token is drawn; the page resumes where it was
        port = MeshState.load(home).services["edge"].http_port
        page.click("#send")
        page.until(f"window.meshStats.runs.length === {RUNS + 1} && window.meshStats.last.tokens > 0", 60)
        os.kill(MeshState.load(home).services["edge"].pid, signal.SIGKILL)
        ctl(home, "edge", "start", "--port", str(port))
        page.until(f"window.meshStats.runs.length === {RUNS + 1} && document.body.dataset.state !== 'running'", 60)
        resumed = page.value("window.meshStats.last")
        lines = page.value("[...document.querySelectorAll('#progress li')].map((li) => li.textContent)")
        if resumed["outcome"] != "task.completed" or resumed["resumed"] < 1:
            problems.append(f"after the edge was killed the page did not resume to the outcome: {resumed}")
        if len(lines) != len(set(lines)):
            problems.append(
                f"a progress line was shown twice after resuming: {len(lines)} lines, {len(set(lines))} distinct"
            )

        # (3) a real picture
        shot = base64.b64decode(page.send("Page.captureScreenshot", {"format": "png"})["data"])
        args.out.write_bytes(shot)
        if len(shot) < 20_000:
            problems.append(f"the screenshot is nearly blank ({len(shot)} bytes)")
        if browser_ms:
            b50, m50 = statistics.median(browser_ms), statistics.median(bus_ms)
            print(f"web-check: time to first token over {len(browser_ms)} tasks, p50 (max): in the browser "
                  f"{b50:.0f} ms ({max(browser_ms):.0f}), on the bus {m50:.0f} ms ({max(bus_ms):.0f}); the edge "
                  f"and the browser add {b50 - m50:.0f} ms")  # fmt: skip
        print(f"web-check: resumed after an edge restart ({resumed['resumed']} reconnect(s)), {len(lines)} progress "
              f"lines, none twice; screenshot {args.out} ({len(shot)} bytes)")  # fmt: skip
    finally:
        if page is not None:
            page.close()
        if bus is not None:
            bus.close()
        subprocess.run([str(MESHCTL), "--home", str(home), "down"], capture_output=True, timeout=60)
        shutil.rmtree(home, ignore_errors=True)
    for p in problems:
        print(f"web-check: FAILED: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
