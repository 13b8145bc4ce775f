// agentflow web page: start workflows, list sessions, follow one live over SSE.
// The examples mirror examples/events/*.json.
"use strict";

const TYPES = [
  "session.started", "node.started", "node.completed", "node.failed", "step.started",
  "step.completed", "agent.message", "session.interrupted", "session.answered", "session.waiting",
  "session.completed", "session.failed", "session.rejected", "session.superseded",
  "session.rolled_back", "event.refused", "event.parked",
];
const ENDED = new Set(["session.completed", "session.failed", "session.rejected"]);
const START = "__start__";
const END = "__end__";
const EXAMPLES = {
  "claim submitted": {
    type: "claim.submitted", subject: "C-2001",
    data: { claim_id: "C-2001", veteran_id: "V-1001", benefit: "disability" },
  },
  "claim needs review (escalates)": {
    type: "claim.submitted", subject: "C-2002",
    data: { claim_id: "C-2002", veteran_id: "V-1002", benefit: "education" },
  },
  "document uploaded": {
    type: "document.uploaded", subject: "C-2001",
    data: { claim_id: "C-2001", document: "medical_report", pages: 4 },
  },
  "status requested": {
    type: "claim.status_requested", subject: "C-2001",
    data: { claim_id: "C-2001", veteran_id: "V-1001", channel: "email" },
  },
};

const $ = (id) => document.getElementById(id);
// The token lives as long as the tab (sessionStorage), never on disk for the origin.
// Pages before it kept it in localStorage: remove what they left there.
localStorage.removeItem("agentflow.token");
let token = sessionStorage.getItem("agentflow.token") || "";
let graphSvg = null;
let view = null; // the open session: {id, source, lastSeq, path, refresh}
let opened = 0; // counts openings, so an opening that awaited can see it was overtaken

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, { method = "GET", json } = {}) {
  const headers = {};
  if (token) headers.Authorization = `Bearer ${token}`;
  if (json !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, {
    method, headers, body: json === undefined ? undefined : JSON.stringify(json),
  });
  const type = res.headers.get("content-type") || "";
  const body = type.includes("json") ? await res.json() : await res.text();
  if (res.status === 401) notice("This gateway needs an API token: enter it above.", true);
  if (!res.ok) throw new ApiError(res.status, (body && body.detail) || res.statusText);
  return body;
}

function notice(text, isError = false) {
  const el = $("notice");
  el.textContent = text;
  el.className = isError ? "error" : "muted";
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child ?? "");
  return node;
}

// --- starting workflows and listing sessions -------------------------------------------

function fillExample(name) {
  const ex = EXAMPLES[name];
  $("event-type").value = ex.type;
  $("event-subject").value = ex.subject || "";
  $("event-data").value = JSON.stringify(ex.data, null, 2);
}

async function sendEvent(e) {
  e.preventDefault();
  $("form-error").textContent = "";
  let data;
  try {
    data = $("event-data").value.trim() ? JSON.parse($("event-data").value) : null;
  } catch (err) {
    $("form-error").textContent = `Data is not valid JSON: ${err.message}`;
    return;
  }
  const body = { type: $("event-type").value.trim(), data };
  if ($("event-subject").value.trim()) body.subject = $("event-subject").value.trim();
  try {
    const accepted = await api("/events", { method: "POST", json: body });
    location.hash = `#/sessions/${encodeURIComponent(accepted.session_id)}`;
  } catch (err) {
    $("form-error").textContent = err.message;
  }
}

async function loadSessions() {
  const status = $("status-filter").value;
  const query = new URLSearchParams({ limit: "20" });
  if (status) query.set("status", status);
  let page;
  try {
    page = await api(`/sessions?${query}`);
  } catch (err) {
    return;
  }
  const list = $("session-list");
  list.replaceChildren(...page.sessions.map((s) => {
    const link = el("a", { href: `#/sessions/${encodeURIComponent(s.session_id)}` },
      el("span", { class: `badge ${s.status}` }, s.status), " ",
      el("span", { class: "sid" }, s.session_id),
      el("small", { class: "muted" }, ` ${s.event_type || ""} ${s.subject || ""}`));
    const item = el("li", { "data-session": s.session_id }, link);
    if (view && view.id === s.session_id) item.classList.add("open");
    return item;
  }));
  if (!page.sessions.length) list.replaceChildren(el("li", { class: "muted" }, "none yet"));
}

// --- the session view --------------------------------------------------------------------

function newPath() {
  return {
    previous: [START], finished: [], running: new Map(), nodes: new Set(),
    edges: new Set(), failed: new Set(),
  };
}

// The same walk as service/drawing.py:session_path, one transition at a time.
function advance(p, t) {
  if (t.type === "node.started" && t.node) {
    if (p.finished.length) { p.previous = [...new Set(p.finished)]; p.finished = []; }
    const key = `${t.node}|${t.step_id || ""}`;
    if (p.running.get(key)) return;
    p.running.set(key, 1);
    p.nodes.add(t.node);
    for (const src of p.previous) { p.nodes.add(src); p.edges.add(`${src}-${t.node}`); }
  } else if ((t.type === "node.completed" || t.type === "node.failed") && t.node) {
    const key = `${t.node}|${t.step_id || ""}`;
    if (p.running.get(key)) p.running.set(key, p.running.get(key) - 1);
    p.nodes.add(t.node);
    p.finished.push(t.node);
    if (t.type === "node.failed") p.failed.add(t.node);
  } else if (t.type === "session.completed") {
    const last = p.finished.length ? [...new Set(p.finished)] : p.previous;
    for (const src of last) p.edges.add(`${src}-${END}`);
    p.nodes.add(END);
    p.running.clear();
  } else if (t.type === "session.failed" || t.type === "session.rejected") {
    p.running.clear();
  }
}

function paint(p) {
  const current = new Set();
  for (const [key, n] of p.running) if (n > 0) current.add(key.split("|")[0]);
  for (const node of document.querySelectorAll("#graph g.node")) {
    const name = node.id.slice("node-".length);
    node.classList.toggle("visited", p.nodes.has(name));
    node.classList.toggle("current", current.has(name));
    node.classList.toggle("failed", p.failed.has(name));
  }
  for (const edge of document.querySelectorAll("#graph path.edge")) {
    edge.classList.toggle("visited", p.edges.has(edge.id.slice("edge-".length)));
  }
  $("current-node").textContent = current.size ? `in ${[...current].join(", ")}` : "";
}

function detail(t) {
  const d = t.data || {};
  if (t.type === "agent.message") {
    return d.tool_calls && d.tool_calls.length ? `calls ${d.tool_calls.join(", ")}` : d.content || "";
  }
  if (t.type === "node.completed" && t.node === "plan") {
    return `${(d.steps || []).length} steps: ${d.intent || ""}`;
  }
  if (t.type === "node.completed" && t.node === "assign") {
    return Object.entries(d.agents || {}).map(([k, v]) => `${k}→${v.join("+")}`).join(", ");
  }
  if (t.type === "node.completed" && t.node === "review") return `${d.verdict}: ${d.feedback || ""}`;
  if (t.type === "node.completed" && t.node === "discover") {
    return d.note || `${(d.similar || []).length} similar workflow(s)`;
  }
  if (t.type === "node.failed" || t.type === "session.failed" ||
      t.type === "session.rejected") return d.error || "";
  if (t.type === "session.answered") {
    const by = d.who ? ` by ${d.who}` : "";
    return `${d.decision}${by} (${d.source || "?"})${d.feedback ? `: ${d.feedback}` : ""}`;
  }
  if (t.type.startsWith("event.") || t.type === "session.superseded" ||
      t.type === "session.rolled_back") return d.error || d.reason || "";
  if (t.type === "session.interrupted") return `asks: ${d.question || ""}`;
  if (t.type === "session.waiting") {
    const on = (d.result && d.result.waiting_on) || [];
    return `waits for ${on.map((w) => `${w.agent} on ${w.step_id}`).join(", ") || "remote agents"}`;
  }
  if (t.type === "step.completed") return d.status || "";
  if (t.type === "session.started") return `event ${d.event_id}${d.resumed ? " (resumed)" : ""}`;
  return "";
}

function logRow(t) {
  let where = t.node || "";
  if (t.step_id) where += `[${t.step_id}]`;
  if (t.agent) where += ` ${t.agent}`;
  const time = new Date(t.ts).toISOString().slice(11, 23);
  const row = el("tr", { class: t.type.replace(".", "-"), "data-seq": String(t.seq) },
    el("td", {}, String(t.seq)), el("td", {}, time), el("td", {}, t.type), el("td", {}, where),
    el("td", { class: "num" }, t.duration_ms ?? ""), el("td", {}, detail(t).slice(0, 200)));
  $("log").tBodies[0].append(row);
}

function setStatus(status) {
  const badge = $("session-status");
  badge.textContent = status;
  badge.className = `badge ${status}`;
  $("cancel").hidden = !["running", "interrupted", "waiting"].includes(status);
}

function renderResult(result) {
  if (!result) return;
  const box = $("result");
  box.className = "";
  const usage = result.usage || {};
  box.replaceChildren(
    el("p", {}, el("span", { class: `badge ${result.status}` }, result.status), " ",
      (result.status === "rejected" ? result.error : result.summary)
        || result.error || result.question || ""),
    el("p", { class: "muted" },
      `${usage.llm_calls || 0} model calls, ${usage.input_tokens || 0} input + `
      + `${usage.output_tokens || 0} output tokens · model ${result.model || "?"}`));
}

function renderDetail(s) {
  setStatus(s.status);
  $("intent").textContent = s.workflow.intent || "planning…";
  $("steps").tBodies[0].replaceChildren(...s.workflow.steps.map((step) => el("tr",
    { "data-step": step.id, class: step.status },
    el("td", {}, el("b", {}, step.id), ` ${step.title}`),
    el("td", {}, step.agents.join(", ")),
    el("td", {}, el("span", { class: `badge ${step.status}` }, step.status)),
    el("td", { class: "output" }, step.output || step.error || ""))));
  const r = s.review;
  $("review").textContent = r.verdict ? `${r.verdict}: ${r.feedback}` : "not yet";
  $("review").className = r.verdict ? `verdict ${r.verdict}` : "muted";
  if (s.result) renderResult(s.result);
  const asking = s.status === "interrupted";
  $("escalation").hidden = !asking;
  if (asking) showQuestion(s.question || (s.result && s.result.question) || "");
}

// What a human is asked: the reviewer's question, or a tool call to approve, edit or reject.
// The first pending interrupt is shown; an answer names it, so parallel ones stay apart.
async function showQuestion(fallback) {
  const id = view.id;
  let first = null;
  try {
    const listed = await api(`/sessions/${encodeURIComponent(id)}/interrupts`);
    first = listed.interrupts[0] || null;
  } catch (err) {
    if (err.status !== 404) notice(err.message, true);
  }
  if (!view || view.id !== id) return;
  const tool = first && first.kind === "tool_approval";
  const p = first ? first.payload : {};
  view.interrupt = first && first.id;
  $("asker").textContent = tool
    ? `${p.agent} asks to call ${p.tool} (step ${p.step_id})`
    : "The reviewer asks a human";
  $("question").textContent = tool ? p.problem || p.description || "" : p.question || fallback;
  $("args").hidden = $("edit").hidden = !tool;
  $("revise").hidden = tool;
  if (tool) $("args").value = JSON.stringify(p.args, null, 2);
}

function scheduleRefresh() {
  if (!view || view.refresh) return;
  const id = view.id;
  view.refresh = setTimeout(async () => {
    if (!view || view.id !== id) return;
    view.refresh = null;
    try {
      renderDetail(await api(`/sessions/${encodeURIComponent(id)}`));
    } catch (err) {
      if (err.status !== 404) notice(err.message, true);
    }
  }, 200);
}

function onTransition(t) {
  if (!view || t.session_id !== view.id || t.seq <= view.lastSeq) return;
  view.lastSeq = t.seq;
  logRow(t);
  advance(view.path, t);
  paint(view.path);
  if (t.type === "session.started") {
    setStatus("running");
    $("escalation").hidden = true;
  } else if (t.type === "session.waiting") {
    setStatus("waiting"); // for remote agents, not for a human: no question to answer
    $("escalation").hidden = true;
  } else if (t.type === "session.interrupted") {
    setStatus("interrupted");
    renderResult(t.data.result);
    showQuestion(t.data.question || "");
    $("escalation").hidden = false;
  } else if (ENDED.has(t.type)) {
    setStatus(t.data.error === "cancelled" ? "cancelled" : t.data.status);
    renderResult(t.data.result);
    $("escalation").hidden = true;
    view.source.close(); // the stream ends here; do not reconnect
    $("session").dataset.ended = "true";
    loadSessions();
  }
  if (t.type !== "agent.message" && t.type !== "node.started") scheduleRefresh();
}

async function openSession(id) {
  closeSession();
  const opening = opened;
  $("empty").hidden = true;
  $("session").hidden = false;
  delete $("session").dataset.ended;
  $("session-title").textContent = id;
  $("log").tBodies[0].replaceChildren();
  $("steps").tBodies[0].replaceChildren();
  $("intent").textContent = "";
  $("review").textContent = "not yet";
  $("result").textContent = "not yet";
  $("escalation").hidden = true;
  setStatus("waiting");
  markOpen(id);
  if (graphSvg === null) {
    try {
      graphSvg = await api("/graph?format=svg");
    } catch (err) {
      graphSvg = null; // asked again when the session opens again, e.g. once the token is in
      // Without a valid token the stream would be refused too: keep the token notice up.
      if (err instanceof ApiError && err.status === 401) return;
      notice(`cannot draw the graph: ${err.message}`, true);
    }
    if (opening !== opened) return; // the back button (or a click) went elsewhere meanwhile
  }
  $("graph").innerHTML = graphSvg || ""; // our own SVG, from this gateway
  const query = token ? `?access_token=${encodeURIComponent(token)}` : "";
  const source = new EventSource(`/sessions/${encodeURIComponent(id)}/stream${query}`);
  view = { id, source, lastSeq: 0, path: newPath(), refresh: null };
  for (const type of TYPES) {
    source.addEventListener(type, (e) => onTransition(JSON.parse(e.data)));
  }
  source.onerror = (e) => {
    if (e.data) {
      // The gateway's own `error` event: no such session (none started within 30 s).
      source.close();
      $("session").dataset.ended = "true";
      const problem = JSON.parse(e.data);
      setStatus("unknown");
      notice(`${problem.error}: ${problem.session_id}`, true);
    } else if (source.readyState === EventSource.CLOSED && !$("session").dataset.ended) {
      notice("the stream closed; reload to retry", true);
    }
  };
  // The details are fetched once transitions arrive: before its first one the worker
  // may not have opened the session yet (a 404).
}

function closeSession() {
  opened += 1;
  if (view) {
    view.source.close();
    clearTimeout(view.refresh);
  }
  view = null;
}

function markOpen(id) {
  for (const item of document.querySelectorAll("#session-list li")) {
    item.classList.toggle("open", item.dataset.session === id);
  }
}

// The human's decision is data: the button pressed, and the feedback box beside it.
async function answer(e) {
  e.preventDefault();
  const decision = e.submitter && e.submitter.value;
  if (!decision) return;
  const json = { decision, feedback: $("feedback").value.trim() };
  if (view.interrupt) json.interrupt_id = view.interrupt;
  try {
    if (decision === "edit") json.args = JSON.parse($("args").value);
    await api(`/sessions/${encodeURIComponent(view.id)}/resume`, { method: "POST", json });
    $("feedback").value = "";
    $("escalation").hidden = true;
    notice(`${decision} sent`);
  } catch (err) {
    notice(err.message, true);
  }
}

async function cancel() {
  try {
    await api(`/sessions/${encodeURIComponent(view.id)}/cancel`, { method: "POST" });
    notice("cancel sent");
  } catch (err) {
    notice(err.message, true);
  }
}

// A session's address is `#/sessions/{id}`: the list's links and a sent event set it,
// loading it opens the session, and the back button walks the sessions opened before.
function route() {
  const match = location.hash.match(/^#\/sessions\/(.+)$/);
  if (match) {
    openSession(decodeURIComponent(match[1]));
  } else {
    closeSession();
    markOpen(null);
    $("session").hidden = true;
    $("empty").hidden = false;
  }
}

function init() {
  $("token").value = token;
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    token = $("token").value.trim();
    sessionStorage.setItem("agentflow.token", token);
    notice(token ? "token saved" : "token cleared");
    loadSessions();
    route(); // the session in the address opens again, now with the token
  });
  const select = $("example");
  for (const name of Object.keys(EXAMPLES)) select.append(el("option", {}, name));
  select.addEventListener("change", () => fillExample(select.value));
  fillExample(select.value);
  $("event-form").addEventListener("submit", sendEvent);
  $("answer-form").addEventListener("submit", answer);
  $("cancel").addEventListener("click", cancel);
  $("status-filter").addEventListener("change", loadSessions);
  window.addEventListener("hashchange", route);
  loadSessions();
  setInterval(() => { if (!document.hidden) loadSessions(); }, 5000);
  route();
}

document.addEventListener("DOMContentLoaded", init);
