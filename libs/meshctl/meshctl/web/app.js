"use strict";
// The dashboard page: renders /api/frame every few seconds and a task's timeline from /api/task.
// Every value is set as text (never as HTML): message summaries are tenants' data.

function cell(row, value, cls) {
  const td = document.createElement("td");
  td.textContent = value;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function fill(id, rows) {
  const body = document.querySelector(`#${id} tbody`);
  body.replaceChildren(...rows);
}

function money(x) { return "$" + Number(x || 0).toFixed(4); }

function render(f) {
  fill("tenants", Object.entries(f.tenants).sort().map(([name, t]) => {
    const r = document.createElement("tr");
    cell(r, name);
    cell(r, t.in_flight, "num"); cell(r, t.running, "num"); cell(r, t.queued, "num" + (t.queued ? " warn" : ""));
    cell(r, t.completed, "num");
    cell(r, t.failed, "num" + (t.failed ? " bad" : "")); cell(r, t.refused, "num");
    cell(r, t.approvals_waiting, "num"); cell(r, t.tokens, "num"); cell(r, money(t.cost_usd), "num");
    return r;
  }));
  fill("services", Object.entries(f.services).sort().map(([name, s]) => {
    const r = document.createElement("tr");
    cell(r, name);
    const ready = s.ready === undefined ? "?" : (s.ready ? "yes" : "NO");
    cell(r, ready, s.ready === false ? "bad" : (s.ready ? "ok" : ""));
    cell(r, s.pending, "num"); cell(r, s.in_flight, "num"); cell(r, s.redelivered, "num");
    cell(r, Number(s.per_s || 0).toFixed(1), "num");
    return r;
  }));
  fill("models", Object.entries(f.models).sort().flatMap(([tenant, models]) =>
    Object.entries(models).sort().map(([name, m]) => {
      const r = document.createElement("tr");
      cell(r, tenant); cell(r, name); cell(r, m.calls, "num"); cell(r, m.tokens, "num"); cell(r, money(m.cost_usd), "num");
      return r;
    })));
  fill("trips", Object.entries(f.trips).sort().map(([kind, n]) => {
    const r = document.createElement("tr");
    cell(r, kind, "bad"); cell(r, n, "num");
    return r;
  }));
  document.getElementById("dlq").textContent = f.dlq;
  const notes = document.getElementById("notes");
  notes.replaceChildren(...f.notes.map((n) => { const li = document.createElement("li"); li.textContent = n; return li; }));
  const at = new Date(f.at * 1000).toISOString().replace("T", " ").slice(0, 19);
  document.getElementById("status").textContent =
    `live: frame of ${at} UTC, every ${f.interval_s} s` + (f.age_s > 3 * f.interval_s ? ` (STALE: ${f.age_s} s old)` : "");
  document.body.dataset.frames = String(Number(document.body.dataset.frames || 0) + 1);
}

async function refresh() {
  try {
    const r = await fetch("/api/frame", { credentials: "same-origin" });
    if (r.status === 401) { document.getElementById("status").textContent = "signed out: open the URL meshctl dashboard prints"; return; }
    render(await r.json());
  } catch (e) {
    document.getElementById("status").textContent = "the dashboard process is not answering";
  }
}

async function timeline(tenant, task) {
  const summary = document.getElementById("task-summary");
  const r = await fetch(`/api/task?tenant=${encodeURIComponent(tenant)}&task=${encodeURIComponent(task)}`,
                        { credentials: "same-origin" });
  const body = await r.json();
  if (!r.ok) { summary.textContent = body.error; fill("timeline", []); return; }
  const spans = body.trace.spans, totals = body.totals;
  const t0 = spans.length ? spans[0].time : 0;
  const widest = Math.max(0.001, ...spans.map((s) => s.after_cause_s || 0));
  summary.textContent = `${tenant}/${task}: ${totals.outcome || "not ended"}, ${spans.length} messages in trace ` +
    `${body.trace.trace_ids.join(", ")}, ${totals.tokens} tokens, ${money(totals.cost_usd)}`;
  fill("timeline", spans.map((s) => {
    const r = document.createElement("tr");
    cell(r, (s.time - t0).toFixed(3), "num");
    cell(r, s.after_cause_s === null ? "" : (s.after_cause_s * 1000).toFixed(1) + " ms", "num");
    cell(r, s.service);
    cell(r, "\u00a0".repeat(2 * Math.min(s.depth, 8)) + s.type);
    cell(r, s.summary, "what");
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${Math.round(200 * (s.after_cause_s || 0) / widest)}px`;
    cell(r, "").appendChild(bar);
    return r;
  }));
  document.body.dataset.timeline = `${tenant}/${task}`;
}

document.addEventListener("DOMContentLoaded", () => {
  refresh();
  setInterval(refresh, 2000);
  document.getElementById("lookup").addEventListener("submit", (e) => {
    e.preventDefault();
    const tenant = document.getElementById("tenant").value, task = document.getElementById("task").value;
    location.hash = `task=${tenant}/${task}`;
    timeline(tenant, task);
  });
  const m = /^#task=([^/]+)\/(.+)$/.exec(location.hash);
  if (m) {
    document.getElementById("tenant").value = m[1];
    document.getElementById("task").value = m[2];
    timeline(m[1], m[2]);
  }
});
