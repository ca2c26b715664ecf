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

const SVG = "http://www.w3.org/2000/svg";
const NODE_W = 190, NODE_H = 46, GAP_X = 60, GAP_Y = 18;

function svg(tag, attrs, parent) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (parent) parent.appendChild(el);
  return el;
}

// The task's plan as a graph: a column per depth, each node coloured by its state (class state-*),
// its id and state as data attributes (what the browser check reads). Text is set as text.
function drawDag(dag) {
  const box = document.getElementById("dag");
  const summary = document.getElementById("dag-summary");
  box.replaceChildren();
  if (!dag) { summary.textContent = "no plan yet"; box.setAttribute("width", 0); box.setAttribute("height", 0); return; }
  const rows = {};
  const at = {};
  for (const n of dag.nodes) {
    const row = rows[n.depth] = (rows[n.depth] || 0) + 1;
    at[n.id] = { x: 10 + n.depth * (NODE_W + GAP_X), y: 10 + (row - 1) * (NODE_H + GAP_Y) };
  }
  const depth = Math.max(0, ...dag.nodes.map((n) => n.depth));
  const height = Math.max(1, ...Object.values(rows));
  box.setAttribute("width", 20 + (depth + 1) * (NODE_W + GAP_X));
  box.setAttribute("height", 20 + height * (NODE_H + GAP_Y));
  const defs = svg("defs", {}, box);
  const marker = svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 7, markerHeight: 7,
                                 orient: "auto-start-reverse" }, defs);
  svg("path", { d: "M 0 0 L 10 5 L 0 10 z", class: "arrow" }, marker);
  for (const [from, to] of dag.edges) {
    const a = at[from], b = at[to];
    if (!a || !b) continue;
    svg("path", { d: `M ${a.x + NODE_W} ${a.y + NODE_H / 2} C ${a.x + NODE_W + GAP_X / 2} ${a.y + NODE_H / 2}, ` +
                     `${b.x - GAP_X / 2} ${b.y + NODE_H / 2}, ${b.x} ${b.y + NODE_H / 2}`,
                  class: "edge", "marker-end": "url(#arrow)" }, box);
  }
  for (const n of dag.nodes) {
    const p = at[n.id];
    const g = svg("g", { class: `node state-${n.state}`, "data-node": n.id, "data-state": n.state,
                         transform: `translate(${p.x},${p.y})` }, box);
    svg("rect", { width: NODE_W, height: NODE_H, rx: 8 }, g);
    const title = svg("text", { x: 10, y: 18, class: "node-id" }, g);
    title.textContent = n.id + (n.attempt > 1 ? ` (try ${n.attempt})` : "");
    const state = svg("text", { x: NODE_W - 10, y: 18, class: "node-state", "text-anchor": "end" }, g);
    state.textContent = n.state;
    const label = svg("text", { x: 10, y: 36, class: "node-label" }, g);
    label.textContent = n.label.length > 27 ? n.label.slice(0, 26) + "…" : n.label;
  }
  const counts = {};
  for (const n of dag.nodes) counts[n.state] = (counts[n.state] || 0) + 1;
  summary.textContent = (dag.workflow ? `workflow ${dag.workflow}` : "the model's plan") +
    (dag.draft ? ": a draft waiting for review" : "") + (dag.reviewed ? `, approved (${dag.reviewed})` : "") + ": " +
    Object.entries(counts).map(([s, k]) => `${k} ${s}`).join(", ");
  document.body.dataset.dag = dag.nodes.map((n) => `${n.id}=${n.state}`).join(" ");
}

let following = null;
let reviewing = null;  // {tenant, task} the review panel decides for

// What of the task waits for a reviewer (body.review): who may decide it here (the dashboard's
// --as person), approve / reject; the answer is what the decision did (or why it was refused).
function drawReview(tenant, task, review) {
  const panel = document.getElementById("review");
  reviewing = review ? { tenant, task } : null;
  panel.hidden = !review;
  document.body.dataset.review = review ? `${review.kind}:${review.id}` : "";
  if (!review) return;
  const what = review.kind === "approval"
    ? `approval node ${review.node} (${review.id}) asks: ${review.request}`
    : `draft ${review.id} (revision ${review.revision}, ${review.steps} steps${review.edited_by ? ", edited by " + review.edited_by : ""})`;
  document.getElementById("review-what").textContent = `Waits for a reviewer: ${what}. ` +
    (review.reviewer ? `You decide as ${review.reviewer}.` : "This dashboard is read-only (meshctl dashboard --as approver.<tenant>.<person> decides from here).");
  for (const id of ["review-approve", "review-reject", "review-comment", "review-plan", "review-save"]) {
    document.getElementById(id).disabled = !review.reviewer;
  }
  // A draft's steps, to edit as JSON: filled in once per draft (never over what is being typed).
  const edit = document.getElementById("review-edit"), plan = document.getElementById("review-plan");
  edit.hidden = review.kind !== "draft";
  if (review.kind === "draft" && plan.dataset.draft !== review.id) {
    plan.value = JSON.stringify({ steps: review.plan }, null, 1);
    plan.dataset.draft = review.id;
  }
}

async function decide(decision) {
  if (!reviewing) return;
  const said = document.getElementById("review-said");
  const asked = { ...reviewing, decision, comment: document.getElementById("review-comment").value };
  if (decision === "edit") {
    try { asked.steps = JSON.parse(document.getElementById("review-plan").value); }
    catch (e) { said.textContent = `the edited plan is not JSON: ${e.message}`; return; }
  }
  said.textContent = `${decision}: sent, waiting for the planner…`;
  const r = await fetch("/api/review", {
    method: "POST", credentials: "same-origin", headers: { "Content-Type": "application/json" },
    body: JSON.stringify(asked),
  });
  const body = await r.json();
  said.textContent = body.message || body.error;
  document.body.dataset.reviewed = r.ok ? decision : "refused";
  timeline(reviewing.tenant, reviewing.task);
}

async function timeline(tenant, task) {
  const summary = document.getElementById("task-summary");
  const r = await fetch(`/api/task?tenant=${encodeURIComponent(tenant)}&task=${encodeURIComponent(task)}`,
                        { credentials: "same-origin" });
  const body = await r.json();
  if (!r.ok) { summary.textContent = body.error; fill("timeline", []); drawDag(null); drawReview(tenant, task, null); return; }
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
  drawDag(body.dag);
  drawReview(tenant, task, body.review);
  document.body.dataset.timeline = `${tenant}/${task}`;
  // Live until the task ends: its graph and timeline again every two seconds.
  clearTimeout(following);
  if (!totals.outcome) following = setTimeout(() => timeline(tenant, task), 2000);
}

document.addEventListener("DOMContentLoaded", () => {
  refresh();
  setInterval(refresh, 2000);
  document.getElementById("review-approve").addEventListener("click", () => decide("approve"));
  document.getElementById("review-reject").addEventListener("click", () => decide("reject"));
  document.getElementById("review-save").addEventListener("click", () => decide("edit"));
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
