// AgentMesh example web app: one page, no framework. It talks to the edge (services/edge):
//   GET  /v1/tasks/{id}/events  Server-Sent Events, read with fetch() so the token travels in a header
//   POST /v1/tasks              the submission (after the event stream is open: nothing is missed)
//   POST /v1/tasks/{id}/cancel
// The person's token (a JWT from the organisation's identity provider; `meshctl edge url` for a
// local mesh) arrives in the URL's fragment, which no server sees, and is kept for this tab only.

const $ = (id) => document.getElementById(id);
const stats = (window.meshStats = { runs: [] });

function token() {
  const hash = new URLSearchParams(location.hash.slice(1));
  if (hash.get("token")) {
    sessionStorage.setItem("mesh-token", hash.get("token"));
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem("mesh-token");
}

function claims(jwt) {
  try {
    return JSON.parse(atob(jwt.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
  } catch {
    return {};
  }
}

const auth = () => ({ authorization: `Bearer ${token()}` });

function say(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

// Parse a text/event-stream body as it arrives: one callback per event (id, event, data).
async function readEvents(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let ev = { id: "", event: "message", data: [] };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let nl;
    while ((nl = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, nl).replace(/\r$/, "");
      buffer = buffer.slice(nl + 1);
      if (line === "") {
        if (ev.data.length) onEvent(ev.id, ev.event, JSON.parse(ev.data.join("\n")));
        ev = { id: "", event: "message", data: [] };
      } else if (!line.startsWith(":")) {
        const at = line.indexOf(":");
        const field = at < 0 ? line : line.slice(0, at);
        const val = at < 0 ? "" : line.slice(at + 1).replace(/^ /, "");
        if (field === "data") ev.data.push(val);
        else if (field === "id") ev.id = val;
        else if (field === "event") ev.event = val;
      }
    }
  }
}

class Run {
  constructor(goal) {
    this.goal = goal;
    this.taskId = "w-" + crypto.getRandomValues(new Uint8Array(8)).reduce((s, b) => s + b.toString(16).padStart(2, "0"), "");
    this.lastId = "";
    this.calls = new Map(); // call_id -> {el, text}
    this.done = false;
    this.stat = { taskId: this.taskId, submittedAt: 0, firstTokenAt: 0, ttftMs: null, tokens: 0, outcomeAt: 0, outcome: null, resumed: 0 };
    stats.runs.push(this.stat);
    stats.last = this.stat;
  }

  call(delta) {
    let c = this.calls.get(delta.call_id);
    if (!c) {
      const box = document.createElement("div");
      box.className = "step";
      box.innerHTML = '<div class="label"></div><div class="text"></div>';
      box.querySelector(".label").textContent = `${delta.step_id} · ${delta.call_id}`;
      $("steps").append(box);
      c = { el: box.querySelector(".text"), text: "" };
      this.calls.set(delta.call_id, c);
    }
    return c;
  }

  onEvent(id, kind, data) {
    if (id) this.lastId = id;
    if (kind === "progress") {
      const li = document.createElement("li");
      li.innerHTML = '<span class="src"></span><span class="msg"></span>';
      li.querySelector(".src").textContent = data.source;
      li.querySelector(".msg").textContent = `${data.stage} ${data.message}`;
      $("progress").append(li);
    } else if (kind === "token") {
      const c = this.call(data);
      if (data.kind === "reset") c.text = ""; // a retry or a fallback model takes over this call
      else if (data.kind === "delta") {
        if (!this.stat.firstTokenAt) {
          this.stat.firstTokenAt = performance.timeOrigin + performance.now();
          this.stat.ttftMs = this.stat.firstTokenAt - this.stat.submittedAt;
        }
        this.stat.tokens += 1;
        c.text += data.text;
      }
      c.el.textContent = c.text;
      $("answer").textContent = c.text; // the answer as it is written: the latest call's text
      $("answer").insertAdjacentHTML("beforeend", '<span class="cursor">&nbsp;</span>');
    } else if (kind === "approval") {
      this.approval(data);
    } else if (kind === "decision") {
      const box = document.getElementById(`approval-${data.approval_id}`);
      if (box) box.querySelector(".state").textContent = `${data.approved ? "approved" : "denied"} by ${data.decided_by}`;
      box?.querySelectorAll("button").forEach((b) => (b.disabled = true));
    } else if (kind === "outcome") {
      this.done = true;
      this.stat.outcomeAt = performance.timeOrigin + performance.now();
      this.stat.outcome = data.type;
      this.stat.answer = data.answer || "";
      $("answer").textContent = data.answer || "";
      const u = data.usage;
      const spent = u ? ` · ${u.input_tokens + u.output_tokens} tokens, $${u.cost_usd.toFixed(4)}, ${u.calls} model calls` : "";
      if (data.type === "task.completed") say(`completed${spent}`);
      else say(`${data.type}: ${data.reason || data.code || ""}`, true);
      document.body.dataset.state = "done";
    }
  }

  // A tool call waits for a person: what it would do, and approve / deny (the edge decides with the
  // signed-in person's own approver key, if the tenant named them and gave the edge their key).
  approval(data) {
    if (document.getElementById(`approval-${data.approval_id}`)) return;
    const box = document.createElement("div");
    box.className = "approval";
    box.id = `approval-${data.approval_id}`;
    box.innerHTML = '<div><b class="tool"></b> waits for a decision: <span class="why"></span></div>' +
      '<pre class="args"></pre><button class="yes">Approve</button> <button class="no">Deny</button> <span class="state"></span>';
    box.querySelector(".tool").textContent = data.tool;
    box.querySelector(".why").textContent = data.reason || data.risk || "";
    box.querySelector(".args").textContent = JSON.stringify(data.arguments, null, 2);
    const decide = async (approve) => {
      const res = await fetch(`/v1/tasks/${this.taskId}/approvals/${data.approval_id}`, {
        method: "POST",
        headers: { ...auth(), "content-type": "application/json" },
        body: JSON.stringify({ approve }),
      });
      const body = await res.json();
      box.querySelector(".state").textContent = res.ok ? `${body.status} by ${body.decided_by}` : body.message;
    };
    box.querySelector(".yes").addEventListener("click", () => decide(true));
    box.querySelector(".no").addEventListener("click", () => decide(false));
    $("approvals").append(box);
  }

  async follow() {
    // Resumes after a dropped connection where it was (Last-Event-ID): stored events are sent again after it.
    for (let attempt = 0; !this.done && attempt < 20; attempt++) {
      const headers = { ...auth(), accept: "text/event-stream" };
      if (this.lastId) headers["last-event-id"] = this.lastId;
      if (attempt) this.stat.resumed += 1;
      try {
        const res = await fetch(`/v1/tasks/${this.taskId}/events`, { headers, signal: this.abort?.signal });
        if (!res.ok) throw new Error((await res.json()).message);
        if (!this.opened) { this.opened = true; this.onOpen(); }
        await readEvents(res.body, (id, kind, data) => this.onEvent(id, kind, data));
      } catch (err) {
        if (this.abort?.signal.aborted) return;
        if (!this.opened) { say(String(err.message || err), true); return; }
      }
      if (!this.done) await new Promise((r) => setTimeout(r, 500));
    }
  }

  async start() {
    this.abort = new AbortController();
    const opened = new Promise((resolve) => (this.onOpen = resolve));
    const following = this.follow();
    await Promise.race([opened, following]);
    if (!this.opened) return following;
    this.stat.submittedAt = performance.timeOrigin + performance.now();
    const res = await fetch("/v1/tasks", {
      method: "POST",
      headers: { ...auth(), "content-type": "application/json", "idempotency-key": this.taskId },
      body: JSON.stringify({ goal: this.goal, task_id: this.taskId }),
    });
    const body = await res.json();
    if (!res.ok) {
      this.done = true;
      this.abort.abort();
      const wait = body.retry_after_s ? ` (try again in ${Math.ceil(body.retry_after_s)} s)` : "";
      say(`${body.error}: ${body.message}${wait}`, true);
      document.body.dataset.state = "refused";
      this.stat.outcome = body.error;
      return;
    }
    say(`running: ${this.taskId}`);
    return following;
  }
}

function main() {
  const jwt = token();
  if (!jwt) {
    $("who").textContent = "not signed in: open the link `meshctl edge url --tenant <t> --user <name>` prints";
    $("send").disabled = true;
    return;
  }
  const c = claims(jwt);
  $("who").textContent = `${c.sub} · tenant ${c.tenant}`;
  let run = null;
  $("ask").addEventListener("submit", async (e) => {
    e.preventDefault();
    $("steps").replaceChildren();
    $("progress").replaceChildren();
    $("approvals").replaceChildren();
    $("answer").textContent = "";
    $("stats").textContent = "";
    document.body.dataset.state = "running";
    $("send").disabled = true;
    $("cancel").disabled = false;
    run = new Run($("goal").value);
    await run.start();
    if (run.stat.ttftMs !== null) {
      $("stats").textContent = `first token after ${run.stat.ttftMs.toFixed(0)} ms · ${run.stat.tokens} deltas`;
    }
    $("send").disabled = false;
    $("cancel").disabled = true;
  });
  $("cancel").addEventListener("click", async () => {
    if (!run) return;
    await fetch(`/v1/tasks/${run.taskId}/cancel`, { method: "POST", headers: { ...auth(), "content-type": "application/json" }, body: "{}" });
  });
}

main();
