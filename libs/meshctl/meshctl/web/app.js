"use strict";
// The dashboard page: renders /api/frame every few seconds, a task's timeline from /api/task and
// a tenant's releases from /api/releases. Every value is set as text (never as HTML): message
// summaries, versions, names and reasons are tenants' data.

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
    const link = document.createElement("a");
    link.href = "#releases=" + encodeURIComponent(name);
    link.title = `${name}'s releases`;
    link.textContent = name;
    link.addEventListener("click", (e) => { e.preventDefault(); openReleases(name); });
    cell(r, "").appendChild(link);
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
  fill("endpoints", (f.endpoints || []).map((e) => {
    const r = document.createElement("tr");
    cell(r, `${e.tenant}/${e.server}`); cell(r, e.url);
    cell(r, e.healthy ? "up" : "DOWN", e.healthy ? "ok" : "bad");
    cell(r, e.breaker, e.breaker === "closed" ? "" : "warn");
    cell(r, e.in_flight, "num"); cell(r, e.calls, "num"); cell(r, e.failures, "num" + (e.failures ? " warn" : ""));
    cell(r, e.failovers, "num"); cell(r, Number(e.latency_ms || 0).toFixed(0) + " ms", "num");
    cell(r, e.last_error || "");
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

// --- releases (issue 41) -------------------------------------------------------------------------
// A tenant's release channel: what runs (current, canary and its share, who started it, when),
// the canary's sequential test (its log-likelihood ratio after each canary task against the two
// boundaries, and the decision that ended it), and both versions' live signals (a table, and the
// cumulative bad-task rate over time). Live while a canary runs.

function setHash(key, value) {
  const h = new URLSearchParams(location.hash.slice(1));
  h.set(key, value);
  history.replaceState(null, "", "#" + h.toString());
}

function versionName(v) { return v ? v : "packaged"; }
function pct(x) { return x === null || x === undefined ? "-" : (100 * x).toFixed(0) + "%"; }
function signed(x) { return (x >= 0 ? "+" : "") + Number(x).toFixed(2); }
function utc(at) { return at ? new Date(at * 1000).toISOString().replace("T", " ").slice(0, 19) : "-"; }

const CHART_W = 640, CHART_H = 260, PAD = { l: 52, r: 150, t: 18, b: 42 };
let showingReleases = null;
let releaseTimer = null;

function openReleases(tenant, scroll = true) {
  if (!/^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/.test(tenant || "")) return;
  document.getElementById("release-tenant").value = tenant;
  setHash("releases", tenant);
  showingReleases = tenant;
  releases(tenant).then(() => { if (scroll) document.getElementById("releases").scrollIntoView(); });
}

async function releases(tenant) {
  clearTimeout(releaseTimer);
  const summary = document.getElementById("release-summary");
  let r, body;
  try {
    r = await fetch(`/api/releases?tenant=${encodeURIComponent(tenant)}`, { credentials: "same-origin" });
    body = await r.json();
  } catch (e) {
    summary.textContent = "the dashboard process is not answering";
    return;
  }
  if (tenant !== showingReleases) return;  // another tenant was asked for meanwhile
  if (!r.ok) { summary.textContent = body.error; return; }
  drawReleases(body);
  document.body.dataset.releases = tenant;
  document.body.dataset.releaseDecision = body.decision ? body.decision.action : "";
  if (body.running) releaseTimer = setTimeout(() => releases(tenant), 2000);
}

function drawReleases(v) {
  const ch = v.channel, t = v.test, b = v.boundaries;
  let said = `Tenant ${v.tenant}: current ${versionName(ch.current)}`;
  if (v.running) {
    said += `; canary ${ch.canary} serves ${pct(ch.share)} of new tasks, started by ${ch.canary_by} at ${utc(ch.canary_since)} UTC.`;
  } else if (v.canary) {
    said += `; no canary running. The last: ${v.canary}, started by ${ch.canary_by || "?"} at ${utc(ch.canary_since)} UTC` +
      (v.decision ? `, ${v.decision.label} at ${utc(v.decision.at)} UTC.` : ".");
  } else {
    said += `; no canary yet (${ch.versions.length} version${ch.versions.length === 1 ? "" : "s"} drafted).`;
  }
  document.getElementById("release-summary").textContent = said;
  document.getElementById("release-test").textContent = v.canary
    ? `Sequential test (Wald's SPRT on bad tasks): alpha ${t.alpha}, beta ${t.beta}, min effect ${t.min_effect}, ` +
      `baseline bad rate ${t.baseline_bad}, a canary task over ${t.max_cost_ratio}× the current mean cost counts as bad; ` +
      `log-likelihood ratio ${signed(ch.llr)} (promote ≤ ${b.lower.toFixed(2)}, roll back ≥ ${b.upper.toFixed(2)}).`
    : "";
  const order = { canary: 0, current: 1, other: 2 };
  fill("release-arms", Object.entries(v.arms).sort((x, y) => order[x[1].role] - order[y[1].role]).map(([version, a]) => {
    const r = document.createElement("tr");
    r.dataset.version = version;
    r.dataset.role = a.role;
    cell(r, a.role, a.role === "canary" ? "role-canary" : "");
    cell(r, versionName(version));
    cell(r, a.tasks, "num"); cell(r, a.bad, "num" + (a.bad ? " bad" : ""));
    cell(r, pct(a.bad_rate), "num"); cell(r, pct(a.checks_passed_rate), "num");
    cell(r, a.judge_mean === null ? "-" : a.judge_mean.toFixed(2), "num");
    cell(r, "$" + a.mean_cost_usd.toFixed(5), "num");
    cell(r, a.p95_latency_s.toFixed(2) + " s", "num");
    cell(r, a.tool_denials, "num" + (a.tool_denials ? " bad" : ""));
    return r;
  }));
  drawLlr(v);
  drawBadRates(v);
  fill("release-history", ch.history.slice(-8).reverse().map((e) => {
    const r = document.createElement("tr");
    cell(r, utc(e.at)); cell(r, e.action); cell(r, versionName(e.version)); cell(r, e.by);
    cell(r, e.reason, "what");
    return r;
  }));
}

function scale(lo, hi, from, to) {
  const span = hi - lo || 1;
  return (x) => from + (x - lo) * (to - from) / span;
}

function frame(box, cls) {
  box.replaceChildren();
  box.setAttribute("width", CHART_W);
  box.setAttribute("height", CHART_H);
  box.setAttribute("class", cls);
  svg("rect", { x: PAD.l, y: PAD.t, width: CHART_W - PAD.l - PAD.r, height: CHART_H - PAD.t - PAD.b, class: "plot-frame" }, box);
}

function label(box, x, y, text, attrs) {
  const el = svg("text", { x, y, ...attrs }, box);
  el.textContent = text;
  return el;
}

function ticks(lo, hi, most) {
  const raw = (hi - lo) / most, mag = Math.pow(10, Math.floor(Math.log10(raw || 1)));
  const step = [1, 2, 5, 10].map((k) => k * mag).find((s) => s >= raw) || raw;
  const out = [];
  for (let x = Math.ceil(lo / step) * step; x <= hi + 1e-9; x += step) out.push(Number(x.toFixed(6)));
  return out;
}

// The canary's log-likelihood ratio against the canary task count: a polyline (.release-llr, one
// point per canary observation in the trail, and the origin), the boundaries as horizontal lines
// (.release-boundary, labelled), and the decision marked where the test crossed.
function drawLlr(v) {
  const box = document.getElementById("release-llr");
  frame(box, "chart");
  const b = v.boundaries, pts = v.llr;
  const nMax = Math.max(1, ...pts.map((p) => p.n)), nMin = pts.length ? Math.min(...pts.map((p) => p.n)) : 0;
  const ys = [b.lower, b.upper, 0, ...pts.map((p) => p.llr)];
  const sx = scale(nMin, nMax, PAD.l, CHART_W - PAD.r);
  const sy = scale(Math.min(...ys) - 0.5, Math.max(...ys) + 0.5, CHART_H - PAD.b, PAD.t);
  for (const n of ticks(nMin, nMax, 8).filter((n) => Number.isInteger(n))) {
    svg("line", { x1: sx(n), x2: sx(n), y1: CHART_H - PAD.b, y2: CHART_H - PAD.b + 4, class: "tick" }, box);
    label(box, sx(n), CHART_H - PAD.b + 16, String(n), { class: "tick-label", "text-anchor": "middle" });
  }
  for (const y of ticks(Math.min(...ys) - 0.5, Math.max(...ys) + 0.5, 6)) {
    label(box, PAD.l - 6, sy(y) + 4, String(y), { class: "tick-label", "text-anchor": "end" });
  }
  label(box, (PAD.l + CHART_W - PAD.r) / 2, CHART_H - 6, "canary tasks observed", { class: "axis-label", "text-anchor": "middle" });
  label(box, 14, (PAD.t + CHART_H - PAD.b) / 2, "log-likelihood ratio",
        { class: "axis-label", "text-anchor": "middle", transform: `rotate(-90 14 ${(PAD.t + CHART_H - PAD.b) / 2})` });
  svg("line", { x1: PAD.l, x2: CHART_W - PAD.r, y1: sy(0), y2: sy(0), class: "zero" }, box);
  for (const [bound, value, text] of [["upper", b.upper, `roll back ≥ ${b.upper.toFixed(2)}`],
                                      ["lower", b.lower, `promote ≤ ${b.lower.toFixed(2)}`]]) {
    svg("line", { x1: PAD.l, x2: CHART_W - PAD.r, y1: sy(value), y2: sy(value), class: `release-boundary boundary-${bound}`,
                  "data-bound": bound, "data-value": value }, box);
    label(box, CHART_W - PAD.r + 6, sy(value) + 4, text, { class: `release-boundary-label boundary-${bound}`, "data-bound": bound });
  }
  box.dataset.points = String(pts.length);
  if (!pts.length) {
    label(box, (PAD.l + CHART_W - PAD.r) / 2, (PAD.t + CHART_H - PAD.b) / 2, v.canary ? "no canary task observed yet" : "no canary yet",
          { class: "empty", "text-anchor": "middle" });
    return;
  }
  svg("polyline", { points: pts.map((p) => `${sx(p.n).toFixed(1)},${sy(p.llr).toFixed(1)}`).join(" "), class: "release-llr" }, box);
  for (const p of pts) {
    const dot = svg("circle", { cx: sx(p.n), cy: sy(p.llr), r: 3.5, class: "release-llr-point" + (p.bad ? " bad-task" : "") }, box);
    const tip = svg("title", {}, dot);
    tip.textContent = `canary task ${p.n}: log-likelihood ratio ${signed(p.llr)}${p.bad ? " (went badly)" : ""}`;
  }
  const d = v.decision;
  if (d) {
    const last = pts[pts.length - 1], x = sx(last.n), y = sy(last.llr);
    svg("circle", { cx: x, cy: y, r: 8, class: `release-decision-marker decision-${d.action}` }, box);
    const high = y < (PAD.t + CHART_H - PAD.b) / 2;
    label(box, x - 12, high ? y + 30 : y - 18, d.label, { class: `release-decision decision-${d.action}`, "text-anchor": "end" });
  }
}

// Each version's cumulative bad-task rate after each of its tasks, against seconds since the
// canary began: one polyline a version (.release-series, data-version), with a legend.
function drawBadRates(v) {
  const box = document.getElementById("release-bad");
  frame(box, "chart");
  const order = { canary: 0, current: 1, other: 2 };
  const versions = Object.keys(v.series).sort((x, y) =>
    order[(v.arms[x] || {}).role || "other"] - order[(v.arms[y] || {}).role || "other"]);
  const all = versions.flatMap((k) => v.series[k]);
  const tMax = Math.max(1, ...all.map((p) => p.t_s));
  const sx = scale(0, tMax, PAD.l, CHART_W - PAD.r), sy = scale(0, 1, CHART_H - PAD.b, PAD.t);
  for (const y of [0, 0.25, 0.5, 0.75, 1]) {
    svg("line", { x1: PAD.l, x2: CHART_W - PAD.r, y1: sy(y), y2: sy(y), class: "grid" }, box);
    label(box, PAD.l - 6, sy(y) + 4, pct(y), { class: "tick-label", "text-anchor": "end" });
  }
  for (const s of ticks(0, tMax, 8)) {
    label(box, sx(s), CHART_H - PAD.b + 16, String(s), { class: "tick-label", "text-anchor": "middle" });
  }
  label(box, (PAD.l + CHART_W - PAD.r) / 2, CHART_H - 6, "seconds since the canary began", { class: "axis-label", "text-anchor": "middle" });
  label(box, 14, (PAD.t + CHART_H - PAD.b) / 2, "bad tasks so far",
        { class: "axis-label", "text-anchor": "middle", transform: `rotate(-90 14 ${(PAD.t + CHART_H - PAD.b) / 2})` });
  if (!versions.length) {
    label(box, (PAD.l + CHART_W - PAD.r) / 2, (PAD.t + CHART_H - PAD.b) / 2, "no task observed during a canary yet",
          { class: "empty", "text-anchor": "middle" });
  }
  versions.forEach((version, i) => {
    const role = (v.arms[version] || {}).role || "other", pts = v.series[version];
    svg("polyline", { points: pts.map((p) => `${sx(p.t_s).toFixed(1)},${sy(p.bad_rate).toFixed(1)}`).join(" "),
                      class: `release-series series-${role}`, "data-version": version, "data-points": pts.length }, box);
    for (const p of pts) {
      const dot = svg("circle", { cx: sx(p.t_s), cy: sy(p.bad_rate), r: 2.5, class: `series-point series-${role}` }, box);
      const tip = svg("title", {}, dot);
      tip.textContent = `${versionName(version)} after ${p.n} task(s): ${pct(p.bad_rate)} bad, ` +
        `mean cost $${p.mean_cost_usd.toFixed(5)}, p95 ${p.p95_latency_s.toFixed(2)} s`;
    }
    const y = PAD.t + 8 + i * 50, last = pts[pts.length - 1];
    const g = svg("g", { class: "legend", "data-version": version }, box);
    svg("rect", { x: CHART_W - PAD.r + 8, y: y - 6, width: 14, height: 4, class: `swatch series-${role}` }, g);
    label(g, CHART_W - PAD.r + 26, y, role, { class: "legend-label legend-role" });
    label(g, CHART_W - PAD.r + 26, y + 14, versionName(version), { class: "legend-label" });
    label(g, CHART_W - PAD.r + 26, y + 28, `${last.n} tasks, ${pct(last.bad_rate)} bad`, { class: "legend-label muted-svg" });
  });
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
    setHash("task", `${tenant}/${task}`);
    timeline(tenant, task);
  });
  document.getElementById("release-lookup").addEventListener("submit", (e) => {
    e.preventDefault();
    openReleases(document.getElementById("release-tenant").value);
  });
  // The fragment says what to show: #task=<tenant>/<task>, #releases=<tenant>, or both (&).
  const wanted = new URLSearchParams(location.hash.slice(1));
  const m = /^([^/]+)\/(.+)$/.exec(wanted.get("task") || "");
  if (m) {
    document.getElementById("tenant").value = m[1];
    document.getElementById("task").value = m[2];
    timeline(m[1], m[2]);
  }
  if (wanted.get("releases")) openReleases(wanted.get("releases"), !m);
});
