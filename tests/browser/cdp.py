"""A headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``):
open a page, read values the page computed, and click an element as a person would (mouse
events at its place on the screen, not a script calling ``click()``). Standard library only: the
protocol is JSON messages separated by NUL bytes, commands on the browser's fd 3, answers and
events on its fd 4.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from typing import Any


def chromium(check: str) -> str:
    """The Chromium here, or exit saying how to get one (``check`` names the caller)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit(f"{check}: no chromium here (Debian: apt-get install chromium)")


class CdpError(Exception):
    pass


class Browser:
    def __init__(self, binary: str, *flags: str) -> None:
        to_child_r, self._to_child = os.pipe()  # we write commands; the browser reads fd 3
        self._from_child, from_child_w = os.pipe()  # the browser writes fd 4; we read

        def fds() -> None:
            # In the child: the pipe ends at fds 3 and 4, where Chromium expects them (moved out of
            # the way first, in case either is 3 or 4 already). Only these two are inherited: every
            # other descriptor Python opens is close-on-exec.
            r = fcntl.fcntl(to_child_r, fcntl.F_DUPFD_CLOEXEC, 10)
            w = fcntl.fcntl(from_child_w, fcntl.F_DUPFD_CLOEXEC, 10)
            os.dup2(r, 3)
            os.dup2(w, 4)

        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
             "--remote-debugging-pipe", "--window-size=1400,1100", *flags, "about:blank"],
            preexec_fn=fds, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._id = 0
        self.session = ""

    def send(self, method: str, params: dict[str, Any] | None = None, *, timeout: float = 30.0) -> dict[str, Any]:
        """One command (on the attached page's session once there is one); its result."""
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if self.session and not method.startswith(("Target.", "Browser.")):
            msg["sessionId"] = self.session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            for answer in self._read(deadline):
                if answer.get("id") == self._id:
                    if "error" in answer:
                        raise CdpError(f"{method}: {answer['error']}")
                    return answer.get("result", {})

    def _read(self, deadline: float) -> list[dict[str, Any]]:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([self._from_child], [], [], left)[0]:
            raise CdpError("the browser did not answer in time")
        chunk = os.read(self._from_child, 1 << 20)
        if not chunk:
            raise CdpError("the browser went away")
        self._buf += chunk
        *done, self._buf = self._buf.split(b"\0")
        return [json.loads(d) for d in done if d]

    def open(self, url: str) -> None:
        """Attach to the first page and navigate it to ``url``."""
        page = next(t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True})["sessionId"]
        self.send("Page.enable")
        self.send("Page.navigate", {"url": url})

    def value(self, expression: str) -> Any:
        """What ``expression`` evaluates to in the page (JSON values)."""
        got = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in got:
            detail = got["exceptionDetails"]
            raise CdpError(f"{expression}: {(detail.get('exception') or {}).get('description') or detail.get('text')}")
        return got["result"].get("value")

    def until(self, expression: str, within_s: float = 30.0) -> Any:
        """Wait until ``expression`` is truthy in the page; its value."""
        deadline, last = time.monotonic() + within_s, ""
        while time.monotonic() < deadline:
            try:
                got = self.value(expression)
            except CdpError as exc:  # the page is still loading (no body yet, a navigation)
                got, last = None, str(exc)
            if got:
                return got
            time.sleep(0.2)
        raise CdpError(f"never true within {within_s:g} s: {expression}" + (f" (last: {last})" if last else ""))

    def click(self, selector: str) -> None:
        """Press and release the left button at the middle of the element ``selector``."""
        box = self.value(f"JSON.stringify(document.querySelector({json.dumps(selector)}).getBoundingClientRect())")
        r = json.loads(box)
        x, y = r["x"] + r["width"] / 2, r["y"] + r["height"] / 2
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1})

    def type_into(self, selector: str, text: str, *, select: bool = True) -> None:
        """Click into the field, then type ``text`` (over what is selected: ``select=False`` keeps
        a selection made before, the click would undo it)."""
        if select:
            self.click(selector)
        self.send("Input.insertText", {"text": text})

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (CdpError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._to_child)
        os.close(self._from_child)
