"""``make dashboard-check``: ``meshctl dashboard`` in a real headless Chromium, showing live data.

A local mesh (``meshctl up`` on free ports) runs the demo's task; the dashboard serves it; Chromium
opens the sign-in URL with the task's timeline in the fragment, runs the page's script, and
(1) dumps the DOM it built: the tenant's row with its completed task, every service, frames
refreshed more than once, the task's timeline down to ``task.completed``; (2) takes a screenshot,
which must be a real picture (many colours, most of the page drawn on). Then (3) a governed
workflow (examples/workflows/follow-up.yaml, mode review) is published and run with meshctl, and
its graph is drawn live at each stage: every node a draft; the draft approved from the page itself
(the dashboard runs ``--as approver.demo.dana``: Chromium, driven over the DevTools protocol,
types a comment and clicks approve as a person would, and the page shows what the decision did);
the timer and the signal node waiting while the rest completed or pending (a second screenshot,
``<out>-dag.png``); the signal sent, every node completed. Then (4) a release of the demo tenant's
behaviour whose worker system prompt is careless (``#careless``: the scripted model answers every
step off-topic, the checker rejects it) is drafted by alice and forced into a 50% canary by dana;
tasks run (alternately the current version's and the canary's, by the planner's sticky share
hash) until the canary's sequential test rolls it back; the page's releases panel, opened in
Chromium, must draw that record: the LLR polyline with the origin and a point per canary task
of the trail, both boundaries labelled with the values alpha and beta give, the decision labelled
"rolled back", the arms table with the canary's task count, a bad-rate series per version (a
screenshot of the panel: ``<out>-releases.png``). Exit 0 when all hold.

    .venv/bin/python tests/browser/check_dashboard.py --out .mesh/dashboard.png
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import html.parser
import json
import math
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
from cdp import Browser, chromium

from mesh_agent import prompts
from mesh_contracts.v1.records import ReleaseChannel
from mesh_planner.releases import share_point
from meshctl.client import TenantClient
from meshctl.identity import Identities
from meshctl.local import MeshState
from meshctl.release import load_bundle

ROOT = Path(__file__).resolve().parents[2]
MESHCTL = Path(sys.executable).with_name("meshctl")
GOAL = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23."
TASK = "dash-1"


class Cells(html.parser.HTMLParser):
    """Each table's rows as lists of cell texts, by table id; and the body's data attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.body: dict[str, str] = {}
        self.nodes: dict[str, str] = {}
        """The task graph's nodes as drawn (``data-node`` -> ``data-state``)."""
        self.texts: dict[str, str] = {}
        self._table = self._id = ""
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.body = {k: v for k, v in a.items() if k.startswith("data-")}
        elif tag == "g" and "data-node" in a:
            self.nodes[a["data-node"]] = a.get("data-state", "")
        elif tag == "table":
            self._table = a.get("id", "")
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        if "id" in a:
            self._id = a["id"]

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._row and self._table:
                self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = ""

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._id:
            self.texts[self._id] = self.texts.get(self._id, "") + data


def png_pixels(path: Path) -> tuple[int, int, list[bytes], int]:
    """Width, height, the unfiltered rows and bytes per pixel of an 8-bit, non-interlaced RGB(A)
    PNG (what Chromium writes)."""
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat, width, height, bpp = 8, b"", 0, 0, 3
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunk)
            if depth != 8 or colour not in (2, 6) or interlace:
                raise ValueError(f"unexpected PNG format (depth {depth}, colour type {colour})")
            bpp = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw, stride, rows, prev = zlib.decompress(idat), width * bpp, [], bytearray(width * bpp)
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, rows, bpp


def picture_facts(path: Path) -> dict[str, float]:
    width, height, rows, bpp = png_pixels(path)
    colours: set[bytes] = set()
    background = rows[-1][:3]
    drawn = 0
    for r in rows[::2]:
        for i in range(0, len(r), bpp * 2):
            px = r[i : i + 3]
            colours.add(px)
            drawn += px != background
    sampled = (len(rows[::2])) * (width // 2 + width % 2)
    return {"width": width, "height": height, "colours": len(colours), "drawn": drawn / max(1, sampled)}


def browse(browser: str, url: str, *args: str) -> str:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           "--virtual-time-budget=8000", "--window-size=1400,1100", *args, url]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise SystemExit(f"dashboard-check: chromium failed ({done.returncode}): {done.stderr.strip()[-400:]}")
    return done.stdout


def api_dag(url: str, task: str) -> dict:
    """The dashboard's own answer for ``task`` (what the page draws), signed in as the page is."""
    parts = urlsplit(url)
    token = parse_qs(parts.query)["token"][0]
    r = httpx.get(f"{parts.scheme}://{parts.netloc}/api/task", params={"tenant": "demo", "task": task},
                  headers={"Authorization": f"Bearer {token}"}, timeout=10)  # fmt: skip
    return r.json() if r.status_code == 200 else {}


def until_dag(url: str, task: str, done: Callable[[dict], object], what: str, within_s: float = 60) -> dict:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        body = api_dag(url, task)
        if body.get("dag") and done(body):
            return body
        time.sleep(0.3)
    raise SystemExit(f"dashboard-check: {task} never reached: {what} (last: {api_dag(url, task).get('dag')})")


def states(body: dict) -> dict[str, str]:
    return {n["id"]: n["state"] for n in body["dag"]["nodes"]}


def check_workflow_dag(browser: str, ctl: list[str], board_url: str, out: Path) -> list[str]:
    """The governed example, run with meshctl, drawn at each stage (draft, waiting, done)."""
    task, problems = "fu-1", []
    example = ROOT / "examples" / "workflows" / "follow-up.yaml"
    for cmd in (["workflow", "publish", str(example), "--as", "author.demo.alice"],
                ["submit", "Follow up on the late delivery", "--workflow", "follow-up", "--input",
                 "topic=the late delivery of order 1042", "--task-id", task, "--deadline", "600"]):  # fmt: skip
        subprocess.run([*ctl, *cmd], check=True, stdout=subprocess.DEVNULL)
    url = board_url + f"#task=demo/{task}"

    def drawn() -> dict[str, str]:
        dom = Cells()
        dom.feed(browse(browser, url, "--dump-dom"))
        return dom.nodes

    until_dag(board_url, task, lambda b: b["dag"]["draft"], "a draft waiting for review")
    if set(drawn().values()) != {"draft"} or len(drawn()) != 4:
        problems.append(f"the draft is not drawn as four draft nodes: {drawn()}")
    problems += approve_in_the_page(browser, url)
    until_dag(board_url, task, lambda b: states(b).get("ok") == "waiting", "the signal node waiting")
    seen = drawn()
    if seen.get("draft") != "completed" or seen.get("ok") != "waiting" or seen.get("send") != "pending":
        problems.append(f"approved and waiting for its signal, the graph is drawn as {seen}")
    shot = out.with_name(out.stem + "-dag.png")
    browse(browser, url, f"--screenshot={shot}")
    facts = picture_facts(shot)
    if facts["colours"] < 12 or facts["drawn"] < 0.02:
        problems.append(f"the graph's screenshot is nearly blank: {facts}")
    subprocess.run([*ctl, "signal", task, "manager_ok", "--tenant", "demo", "--payload", '{"approved": true}'],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    until_dag(board_url, task, lambda b: b["totals"].get("outcome"), "its end")
    seen = drawn()
    if set(seen.values()) != {"completed"}:
        problems.append(f"the task ended, yet its graph is drawn as {seen}")
    print(f"dashboard-check: workflow {task} drawn as a draft, then waiting, then {seen}; screenshot {shot}")
    return problems


def approve_in_the_page(binary: str, url: str) -> list[str]:
    """The draft approved from the dashboard's page, by mouse: the review panel offers it to
    dana (the dashboard's --as), a comment typed, approve clicked; the page says what it did."""
    page = Browser(binary)
    try:
        page.open(url)
        waiting = page.until("document.body.dataset.review || ''")
        if not waiting.startswith("draft:"):
            return [f"the review panel does not offer the draft: {waiting!r}"]
        offered = page.value("document.getElementById('review-what').textContent")
        if "You decide as approver.demo.dana" not in offered or page.value(
            "document.getElementById('review-approve').disabled"
        ):  # fmt: skip
            return [f"the page does not let dana decide: {offered!r}"]
        # An edit first: what the draft node is told, changed in the page's JSON (select all, paste).
        plan = json.loads(page.value("document.getElementById('review-plan').value"))
        plan["steps"][0]["instruction"] += " Keep it under 100 words."
        page.value("(() => { const t = document.getElementById('review-plan'); t.focus(); t.select(); return 1; })()")
        page.type_into("#review-plan", json.dumps(plan, indent=1), select=False)
        page.click("#review-save")
        page.until("document.body.dataset.reviewed || ''", within_s=60)
        edited = page.value("document.getElementById('review-said').textContent")
        if "revision 2, edited by approver.demo.dana" not in edited:
            return [f"editing the draft in the page did not make a new draft: {edited!r}"]
        page.value("delete document.body.dataset.reviewed")
        page.until(
            "(document.body.dataset.review || '').startsWith('draft:') && "
            f"document.body.dataset.review !== {json.dumps(waiting)}"
        )  # the new draft, offered in turn
        page.type_into("#review-comment", "looks right")
        page.click("#review-approve")
        page.until("document.body.dataset.reviewed || ''", within_s=60)
        said = page.value("document.getElementById('review-said').textContent")
        if page.value("document.body.dataset.reviewed") != "approve" or "approved: the plan runs as draft" not in said:
            return [f"approving from the page did not apply: {said!r}"]
        print(f"dashboard-check: approved from the page by mouse: {said}")
        return []
    finally:
        page.close()


RELEASE_GOAL = GOAL  # its words are what the judge holds a careless answer to (an arithmetic-only goal has none)
CANARY_SHARE = 0.5
MAX_RELEASE_TASKS = 40


def release_task_ids(n: int) -> list[tuple[str, bool]]:
    """``n`` task ids, alternately one the current version serves and one the canary does (the
    planner's sticky pick: its share point under the canary's share), the current's first."""
    ids = [f"rel-{i}" for i in range(20 * n)]
    current = [t for t in ids if share_point("demo", t) >= CANARY_SHARE]
    canary = [t for t in ids if share_point("demo", t) < CANARY_SHARE]
    out = [pair for c, k in zip(current, canary, strict=False) for pair in ((c, False), (k, True))]
    return out[:n]


async def run_canary(home: Path, version: str) -> tuple[ReleaseChannel, list[str]]:
    """Tasks of the demo tenant, one at a time, until its channel shows the canary decided (at
    most ``MAX_RELEASE_TASKS``); the channel then, and what went unexpectedly."""
    state = MeshState.load(home)
    assert state is not None
    problems: list[str] = []
    async with TenantClient.of(Identities(home), state.nats_url, "demo") as client:

        async def channel() -> ReleaseChannel:
            return ReleaseChannel.model_validate(
                await client.registry("channel", bucket="releases") or {"tenant": "demo"}
            )

        ch = await channel()
        for task, on_canary in release_task_ids(MAX_RELEASE_TASKS):
            seen = await client.submit(RELEASE_GOAL, task_id=task, timeout=120, progress=False)
            ran = getattr(seen.outcome, "release", None)
            if ran != (version if on_canary else ""):
                problems.append(f"task {task} ran release {ran!r}, not the {'canary' if on_canary else 'current'} one "
                                f"({type(seen.outcome).__name__})")  # fmt: skip
            for _ in range(20):  # its end is observed as the planner writes it: a moment at most
                ch = await channel()
                if task in ch.seen or not ch.canary:
                    break
                await asyncio.sleep(0.25)
            if not ch.canary:
                break
        return ch, problems


def check_releases(binary: str, ctl: list[str], home: Path, board_url: str, out: Path) -> list[str]:
    """A careless release forced into a 50% canary and rolled back by its sequential test, drawn
    by the page's releases panel as the channel records it."""
    system = prompts.load("mesh_worker", "system").text
    bundle = home / "careless-release.json"
    bundle.write_text(json.dumps({"description": "dashboard-check: a careless worker system prompt",
                                  "prompts": {"worker.system": {"version": "careless-1",
                                                                "text": system + "\n#careless"}}}))  # fmt: skip
    version = load_bundle(bundle).digest()
    started = time.monotonic()
    for cmd in (["release", "draft", str(bundle), "--as", "author.demo.alice"],
                ["release", "canary", version, "--share", str(CANARY_SHARE), "--as", "approver.demo.dana", "--force",
                 "--reason", "dashboard-check: a careless prompt for the sequential test to roll back"]):  # fmt: skip
        subprocess.run([*ctl, *cmd], check=True, stdout=subprocess.DEVNULL)
    ch, problems = asyncio.run(run_canary(home, version))
    last = ch.history[-1] if ch.history else None
    if ch.canary or last is None or last.action != "rolled_back" or last.version != version:
        return [*problems, f"the careless canary was not rolled back by its test within {MAX_RELEASE_TASKS} tasks: "
                           f"canary {ch.canary!r}, latest event {last}"]  # fmt: skip
    observed = [p for p in ch.trail if p.version == version]
    arm = ch.arms[version]
    lower = math.log(ch.test.beta / (1 - ch.test.alpha))
    upper = math.log((1 - ch.test.beta) / ch.test.alpha)
    print(f"dashboard-check: release {version} rolled back by {last.by} after {last.tasks} canary tasks "
          f"({len(ch.trail)} observed in all, {time.monotonic() - started:.0f} s): llr {last.llr:+.2f} >= {upper:.2f}")  # fmt: skip

    page = Browser(binary)
    try:
        page.open(board_url + "#releases=demo")
        page.until("document.body.dataset.releases === 'demo'")
        drawn = page.value("""JSON.stringify({
          llr: (document.querySelector('#release-llr polyline.release-llr')?.getAttribute('points') || '')
                 .trim().split(/\\s+/).filter(Boolean).length,
          bounds: Object.fromEntries([...document.querySelectorAll('#release-llr text.release-boundary-label')]
                                     .map((e) => [e.dataset.bound, e.textContent])),
          lines: document.querySelectorAll('#release-llr line.release-boundary').length,
          decision: document.querySelector('#release-llr .release-decision')?.textContent || '',
          marker: document.querySelectorAll('#release-llr .release-decision-marker').length,
          arms: [...document.querySelectorAll('#release-arms tbody tr')]
                  .map((r) => [...r.cells].map((c) => c.textContent)),
          series: Object.fromEntries([...document.querySelectorAll('#release-bad polyline.release-series')]
                                     .map((e) => [e.dataset.version, Number(e.dataset.points)])),
          legend: document.querySelectorAll('#release-bad g.legend').length,
          summary: document.getElementById('release-summary').textContent,
        })""")
        shot = out.with_name(out.stem + "-releases.png")
        box = json.loads(page.value("JSON.stringify((() => { const r = document.getElementById('releases')"
                                    ".getBoundingClientRect(); return {x: r.x + scrollX, y: r.y + scrollY, "
                                    "width: r.width, height: r.height, scale: 1}; })())"))  # fmt: skip
        png = page.send("Page.captureScreenshot", {"format": "png", "clip": box, "captureBeyondViewport": True})
        shot.write_bytes(base64.b64decode(png["data"]))
    finally:
        page.close()
    seen = json.loads(drawn)
    origin = 1 if arm.tasks == len(observed) else 0  # the origin is drawn when the trail holds the first canary task
    if seen["llr"] != len(observed) + origin or not observed:
        problems.append(f"the LLR polyline has {seen['llr']} points; the trail holds {len(observed)} canary "
                        f"observations (+{origin} origin)")  # fmt: skip
    want = {"upper": f"roll back ≥ {upper:.2f}", "lower": f"promote ≤ {lower:.2f}"}
    if seen["bounds"] != want or seen["lines"] != 2:
        problems.append(f"the boundaries are labelled {seen['bounds']} ({seen['lines']} lines), not {want}")
    if not seen["decision"].startswith("rolled back") or f"after {last.tasks} canary task" not in seen["decision"] \
            or not seen["marker"]:  # fmt: skip
        problems.append(f"the decision is labelled {seen['decision']!r} ({seen['marker']} marker)")
    rows = {r[1]: r for r in seen["arms"]}
    if version not in rows or rows[version][0] != "canary" or rows[version][2] != str(arm.tasks):
        problems.append(f"the arms table does not list canary {version} with its {arm.tasks} tasks: {seen['arms']}")
    trail_counts = {v: sum(p.version == v for p in ch.trail) for v in ch.arms}
    if seen["series"] != trail_counts or seen["legend"] != len(trail_counts):
        problems.append(
            f"the bad-rate series are {seen['series']} ({seen['legend']} in the legend); the trail: {trail_counts}"
        )
    facts = picture_facts(shot)
    if facts["colours"] < 12 or facts["drawn"] < 0.02:
        problems.append(f"the releases panel's screenshot is nearly blank: {facts}")
    print(f"dashboard-check: releases panel: LLR polyline of {seen['llr']} points, {seen['bounds']}, "
          f"{seen['decision']!r}, arms {[r[:3] for r in seen['arms']]}, series {seen['series']}; screenshot {shot} "
          f"{facts['width']}x{facts['height']}, {facts['colours']} colours")  # fmt: skip
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / ".mesh" / "dashboard.png", help="where the screenshot goes")
    args = ap.parse_args()
    browser = chromium("dashboard-check")
    home = Path(tempfile.mkdtemp(prefix="agentmesh-dashboard-"))
    ctl = [str(MESHCTL), "--home", str(home)]
    board = None
    try:
        subprocess.run([*ctl, "up", "--nats-port", "0", "--http-port", "0", "--redis-port", "0"], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        subprocess.run([*ctl, "submit", GOAL, "--task-id", TASK, "--follow", "--timeout", "60"], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        for people in (
            ["authors", "add", "alice", "--tenant", "demo"],
            ["approvers", "add", "dana", "--tenant", "demo"],
        ):
            subprocess.run([*ctl, *people], check=True, stdout=subprocess.DEVNULL)
        url_file = home / "dashboard.url"
        board = subprocess.Popen([*ctl, "dashboard", "--port", "0", "--interval", "1", "--url-file", str(url_file),
                                  "--as", "approver.demo.dana"], stdout=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 30
        while not url_file.exists():
            if time.monotonic() > deadline or board.poll() is not None:
                raise SystemExit("dashboard-check: the dashboard did not start")
            time.sleep(0.1)
        url = url_file.read_text().strip() + f"#task=demo/{TASK}"

        dom = Cells()
        dom.feed(browse(browser, url, "--dump-dom"))
        head = dom.tables.get("tenants", [[]])[0]
        tenants = {r[0]: dict(zip(head, r, strict=False)) for r in dom.tables.get("tenants", [])[1:]}
        spend = [r for r in dom.tables.get("models", [])[1:] if r and r[0] == "demo"]
        services = {r[0] for r in dom.tables.get("services", [])[1:]}
        timeline = [r[3].strip() for r in dom.tables.get("timeline", [])[1:]]
        problems = []
        if "demo" not in tenants or tenants["demo"].get("completed") != "1":
            problems.append(f"the demo tenant's row does not show its completed task: {tenants.get('demo')}")
        if "demo" in tenants and (tenants["demo"].get("running"), tenants["demo"].get("queued")) != ("0", "0"):
            problems.append(f"the budget's view of the demo tenant is missing or wrong: {tenants['demo']}")
        if not spend or not any(r[2] not in ("", "0") for r in spend):
            problems.append(f"no model calls of the demo tenant in today's spend by tenant and model: {spend}")
        if not {"planner", "worker", "checker", "rag", "tool-executor", "budget"} <= services:
            problems.append(f"services missing: {sorted(services)}")
        if int(dom.body.get("data-frames", "0")) < 2:
            problems.append(f"the page rendered {dom.body.get('data-frames', '0')} frame(s): not refreshing")
        if "task.submitted" not in timeline or "task.completed" not in timeline:
            problems.append(f"the timeline lacks the task's start or end: {timeline[:3]}...")
        if "live: frame of" not in dom.texts.get("status", ""):
            problems.append(f"status line: {dom.texts.get('status')!r}")

        args.out.parent.mkdir(parents=True, exist_ok=True)
        browse(browser, url, f"--screenshot={args.out}")
        facts = picture_facts(args.out)
        if facts["colours"] < 12 or facts["drawn"] < 0.02:
            problems.append(f"the screenshot is nearly blank: {facts}")
        print(f"dashboard-check: tenants {sorted(tenants)}, {len(services)} services, {dom.body.get('data-frames')} "
              f"frames, timeline of {len(timeline)} messages; screenshot {args.out} {facts['width']}x{facts['height']}, "
              f"{facts['colours']} colours, {facts['drawn']:.0%} drawn")  # fmt: skip
        problems += check_workflow_dag(browser, ctl, url_file.read_text().strip(), args.out)
        problems += check_releases(browser, ctl, home, url_file.read_text().strip(), args.out)
        for p in problems:
            print(f"dashboard-check: FAILED: {p}", file=sys.stderr)
        return 1 if problems else 0
    finally:
        if board is not None:
            board.terminate()
            board.wait(10)
        subprocess.run([*ctl, "down"], stdout=subprocess.DEVNULL)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
