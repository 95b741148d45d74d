// Plait web UI: pages (workflows, one workflow, workers, login) over /api (docs/ui.md).
// Plain JavaScript, no framework, no build step. Text from a workflow (names, ids, messages,
// logs) is only ever set as textContent, never parsed as HTML.
"use strict";

const main = document.getElementById("main");
const STATES = ["RUNNING", "SUCCEEDED", "PARTIALLY_SUCCEEDED", "FAILED", "CANCELLED"];
const ORDER = ["RUNNING", "LEASED", "READY", "PENDING", "SUCCEEDED", "FAILED", "TIMED_OUT", "CANCELLED", "SKIPPED"];
const TERMINAL = new Set(["SUCCEEDED", "FAILED", "CANCELLED", "SKIPPED", "TIMED_OUT"]);
const MAX_DAG = 2000; // spec actions drawn; a larger workflow shows its table only
const MAX_LOG_CHARS = 200000; // of the followed log kept on the page
let cleanup = () => {};

// h("div", {class: "x"}, "text", child...): an element; strings become text nodes.
function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const kid of kids.flat()) {
    if (kid === undefined || kid === null || kid === false) continue;
    el.appendChild(typeof kid === "object" ? kid : document.createTextNode(String(kid)));
  }
  return el;
}

// Replaces an element's children, leaving out the ones a condition left null or false.
function fill(el, ...kids) {
  el.replaceChildren(...kids.flat().filter((k) => k !== null && k !== undefined && k !== false));
}

function badge(state) {
  return h("span", { class: "badge st-" + state }, state.toLowerCase().replace("_", " "));
}

function when(ms) {
  return ms ? new Date(ms).toISOString().replace("T", " ").slice(0, 19) + "Z" : "";
}

function took(from, to) {
  if (!from) return "";
  const s = ((to || Date.now()) - from) / 1000;
  if (s < 60) return s.toFixed(1) + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + String(Math.floor(s % 60)).padStart(2, "0") + "s";
  return Math.floor(s / 3600) + "h" + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + "m";
}

class ApiError extends Error {
  constructor(status, body) {
    super(body.error || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

async function api(path, options) {
  const resp = await fetch(path, Object.assign({ credentials: "same-origin" }, options));
  let body = {};
  try { body = await resp.json(); } catch (e) { body = { error: `HTTP ${resp.status}` }; }
  if (resp.status === 401) { showLogin(body.error); throw new ApiError(401, body); }
  if (!resp.ok) throw new ApiError(resp.status, body);
  return body;
}

function fail(where, err) {
  if (err instanceof ApiError && err.status === 401) return;
  where.replaceChildren(h("p", { class: "error" }, String(err.message || err)));
}

// ---- session ------------------------------------------------------------------------------

async function who() {
  const el = document.getElementById("who");
  try {
    const me = await api("/api/session");
    el.replaceChildren(me.authentication ? h("span", {}, me.principal, " ",
      h("button", { type: "button", onclick: logout }, "log out")) : "");
  } catch (e) { el.replaceChildren(); }
}

async function logout() {
  await fetch("/api/session", { method: "DELETE", credentials: "same-origin" });
  showLogin("");
}

function showLogin(message) {
  cleanup();
  cleanup = () => {};
  const input = h("input", { type: "password", id: "token", name: "token",
    autocomplete: "off", placeholder: "plait_…", required: true });
  const note = h("p", { class: "error", id: "login-error" }, message || "");
  const form = h("form", { class: "login", onsubmit: async (e) => {
    e.preventDefault();
    try {
      await api("/api/session", { method: "POST", body: JSON.stringify({ token: input.value }),
        headers: { "Content-Type": "application/json" } });
      route();
    } catch (err) { if (!(err instanceof ApiError && err.status === 401)) note.textContent = err.message; }
  } }, h("h2", {}, "Log in"),
  h("p", {}, "This coordinator needs a token with role read (", h("code", {}, "plait tokens create"), ")."),
  h("label", { for: "token" }, "Token "), input, " ", h("button", { type: "submit" }, "Log in"), note);
  main.replaceChildren(form);
  document.getElementById("who").replaceChildren();
  input.focus();
}

// ---- workflow list ------------------------------------------------------------------------

function listView(params) {
  const state = params.get("state") || "", name = params.get("name") || "";
  const select = h("select", { name: "state", id: "filter-state" }, h("option", { value: "" }, "any state"),
    STATES.map((s) => h("option", { value: s, selected: s === state }, s.toLowerCase())));
  const text = h("input", { name: "name", id: "filter-name", value: name, placeholder: "name contains" });
  const form = h("form", { class: "filters", onsubmit: (e) => {
    e.preventDefault();
    const q = new URLSearchParams();
    if (select.value) q.set("state", select.value);
    if (text.value) q.set("name", text.value);
    location.hash = "#/" + (q.toString() ? "?" + q : "");
  } }, select, " ", text, " ", h("button", { type: "submit" }, "Filter"));
  const table = h("div", { id: "workflows" });
  main.replaceChildren(h("h2", {}, "Workflows"), form, table);
  const load = async () => {
    const q = new URLSearchParams({ limit: "200" });
    if (state) q.set("state", state);
    if (name) q.set("name", name);
    try {
      const data = await api("/api/workflows?" + q);
      table.replaceChildren(workflowTable(data.workflows, data.more));
    } catch (err) { fail(table, err); }
  };
  load();
  const timer = setInterval(load, 3000);
  return () => clearInterval(timer);
}

function workflowTable(list, more) {
  if (!list.length) return h("p", {}, "No workflows.");
  return h("table", {}, h("thead", {}, h("tr", {}, ["name", "id", "state", "actions", "submitted", "took"]
    .map((c) => h("th", {}, c)))), h("tbody", {}, list.map((w) => {
    const total = Object.values(w.counts).reduce((a, b) => a + b, 0);
    const link = "#/workflows/" + encodeURIComponent(w.workflow_id);
    return h("tr", {}, h("td", {}, h("a", { href: link }, w.name || "(no name)")),
      h("td", { class: "mono" }, h("a", { href: link }, w.workflow_id)), h("td", {}, badge(w.state)),
      h("td", {}, `${w.counts.SUCCEEDED || 0}/${total}` + (w.counts.FAILED ? `, ${w.counts.FAILED} failed` : "")),
      h("td", {}, when(w.submitted_ms)), h("td", {}, took(w.submitted_ms, w.finished_ms)));
  })), more ? h("caption", {}, "newest shown; narrow the filter for more") : null);
}

// ---- one workflow -------------------------------------------------------------------------

function workflowView(id, params) {
  const base = "/api/workflows/" + encodeURIComponent(id);
  const st = { header: null, actions: new Map(), spec: [], specCount: 0, children: new Map(), expanded: new Set(),
    selected: null, spans: new Map(), finished: false, detail: null };
  const head = h("section", { id: "wf-head" }), dagBox = h("div", { class: "scroll", id: "dag" });
  const timeBox = h("div", { class: "scroll", id: "timeline" }), panel = h("section", { id: "action" });
  const live = h("span", { id: "live", class: "live" }, "connecting…");
  main.replaceChildren(head, h("h3", {}, "DAG ", live), dagBox, h("h3", {}, "Timeline"), timeBox,
    h("p", { class: "hint" }, "Attempts per worker, from the history."), panel);
  const on = {
    select(actionId) {
      st.selected = actionId;
      history.replaceState(null, "", `#/workflows/${encodeURIComponent(id)}?action=${encodeURIComponent(actionId)}`);
      draw();
      showAction();
    },
    toggle(actionId) { st.expanded.has(actionId) ? st.expanded.delete(actionId) : st.expanded.add(actionId); draw(); },
  };
  let frame = 0, refreshTimer = 0, loading = false, again = false, logs = null;

  // Redraws on the next frame: everything, or (the clock ticking) the head and the timeline.
  let dagToo = false;
  function draw(clockOnly) {
    dagToo = dagToo || !clockOnly;
    if (frame) return;
    frame = requestAnimationFrame(() => {
      frame = 0;
      drawHead();
      if (!dagToo) {
        // the clock only: running bars grow
      } else if (st.specCount > MAX_DAG) {
        dagBox.replaceChildren(h("p", {}, `${st.specCount} actions: too many to draw; pick one here.`),
          actionTable());
      } else {
        dagBox.replaceChildren(PlaitDag.renderDag({ spec: st.spec, status: (a) => st.actions.get(a),
          children: (a) => st.children.get(a) || [], expanded: st.expanded, selected: st.selected }, on));
      }
      dagToo = false;
      const tl = PlaitDag.renderTimeline(st.spans, Date.now(), on, st.selected);
      timeBox.replaceChildren(tl || h("p", {}, "No attempt has started yet."));
      drawActionStatus();
    });
  }

  function drawHead() {
    const w = st.header;
    if (!w) return;
    const counts = ORDER.filter((s) => w.counts[s]).map((s) => `${w.counts[s]} ${s.toLowerCase().replace("_", " ")}`);
    fill(head, h("h2", {}, h("span", { id: "wf-name" }, w.name || "(no name)"), " ",
      h("span", { id: "wf-state", "data-state": w.state }, badge(w.state))),
    h("p", { class: "mono" }, w.workflow_id),
    h("p", {}, `submitted ${when(w.submitted_ms)}`, w.finished_ms ? `, finished ${when(w.finished_ms)}` : "",
      ` (${took(w.submitted_ms, w.finished_ms)})`, " · ", counts.join(", ")),
    w.reason ? h("p", { class: "reason" }, w.reason) : null);
  }

  function actionTable() {
    return h("table", {}, h("tbody", {}, [...st.actions.values()].slice(0, 500).map((a) =>
      h("tr", { onclick: () => on.select(a.action_id) }, h("td", { class: "mono" }, a.action_id),
        h("td", {}, badge(a.state)), h("td", {}, a.reason)))));
  }

  async function refresh() {
    if (loading) { again = true; return; }
    loading = true;
    try {
      const data = await api(base);
      st.header = data.workflow;
      st.spec = data.spec;
      st.specCount = data.spec_count;
      st.actions = new Map(data.actions.map((a) => [a.action_id, a]));
      st.children = new Map();
      for (const a of data.actions) {
        if (a.parent_id) (st.children.get(a.parent_id) || st.children.set(a.parent_id, []).get(a.parent_id)).push(a);
      }
      draw();
    } catch (err) { fail(head, err); } finally {
      loading = false;
      if (again) { again = false; refresh(); }
    }
  }

  // A snapshot at most once a second while events arrive: reasons, attempts, new map items.
  function soon() {
    if (!refreshTimer) refreshTimer = setTimeout(() => { refreshTimer = 0; refresh(); }, 1000);
  }

  const events = new EventSource(base + "/events");
  events.addEventListener("open", () => { live.textContent = "live"; live.className = "live on"; });
  events.addEventListener("events", (e) => {
    const batch = JSON.parse(e.data);
    for (const ev of batch) {
      const a = ev.action_id && st.actions.get(ev.action_id);
      if (a && ev.action_state && ev.action_state !== "UNSPECIFIED" && a.state !== ev.action_state) {
        a.state = ev.action_state;
        a.reason = ""; // the next snapshot (within a second) says why, in the API's words
      }
      if (ev.workflow_state && st.header) st.header.state = ev.workflow_state;
    }
    PlaitDag.spansFrom(batch, st.spans);
    draw();
    soon();
  });
  events.addEventListener("end", () => {
    events.close();
    st.finished = true;
    live.textContent = "finished";
    live.className = "live";
    soon();
  });
  events.addEventListener("error", (e) => {
    if (e.data) {
      const body = JSON.parse(e.data);
      if (body.code !== "UNAVAILABLE") { events.close(); live.textContent = body.error; return; }
    }
    if (!st.finished) { live.textContent = "reconnecting…"; live.className = "live"; }
  });
  // Running bars grow with the clock.
  const timer = setInterval(() => { if (!st.finished) draw(true); }, 1000);
  refresh().then(() => { if (params.get("action") && !st.selected) on.select(params.get("action")); });

  // ---- the selected action ----
  function drawActionStatus() {
    const a = st.selected && st.actions.get(st.selected);
    const box = document.getElementById("action-status");
    if (!a || !box) return;
    const label = (state) => state === "PENDING" || state === "READY" ? "Why it waits: "
      : TERMINAL.has(state) ? "Reason: " : "Now: ";
    fill(box, h("p", {}, badge(a.state), a.attempt ? ` attempt ${a.attempt}` : "",
      a.worker_id ? ` on ${a.worker_id}` : "", a.started_ms ? ` · started ${when(a.started_ms)}` : "",
      a.finished_ms ? ` · finished ${when(a.finished_ms)}` : "",
      a.started_ms ? ` · ${took(a.started_ms, a.finished_ms)}` : "",
      a.exit_code ? ` · exit ${a.exit_code}` : ""),
    a.reason ? h("p", { class: "reason", id: "why" }, h("b", {}, label(a.state)), a.reason) : null,
    a.error ? h("p", { class: "error" }, h("b", {}, "Error: "), a.error.message) : null);
    if (st.detail && st.detail.state !== a.state && TERMINAL.has(a.state)) loadDetail(a.action_id);
  }

  async function loadDetail(actionId) {
    const a = st.actions.get(actionId);
    st.detail = { state: a ? a.state : "" };
    const box = document.getElementById("action-detail");
    try {
      const d = await api(base + "/actions/" + encodeURIComponent(actionId));
      if (st.selected !== actionId || !box) return;
      const rows = d.attempts.map((t) => h("tr", {}, h("td", {}, String(t.attempt)), h("td", {}, t.worker_id),
        h("td", {}, badge(t.state)), h("td", {}, tails(t))));
      const out = d.outputs !== null ? JSON.stringify(d.outputs, null, 2) : d.outputs_json;
      fill(box, h("h4", {}, "Attempts"), rows.length ? h("table", {}, h("thead", {}, h("tr", {},
        ["attempt", "worker", "state", "log tails"].map((c) => h("th", {}, c)))), h("tbody", {}, rows))
        : h("p", {}, "No attempt has reported yet."),
      h("h4", {}, "Outputs"), out ? h("pre", { id: "outputs" }, out) : h("p", {}, "None."),
      d.outputs_truncated ? h("p", {}, `(first part of ${d.outputs_bytes} bytes)`) : null);
    } catch (err) { if (box) fail(box, err); }
  }

  function tails(t) {
    if (!t.stdout_tail && !t.stderr_tail) return "";
    return h("details", {}, h("summary", {}, "show"), t.stdout_tail ? h("pre", {}, t.stdout_tail) : null,
      t.stderr_tail ? h("pre", { class: "stderr" }, t.stderr_tail) : null);
  }

  function showAction() {
    if (logs) { logs.close(); logs = null; }
    const actionId = st.selected;
    const logBox = h("pre", { id: "log", class: "log" });
    const logState = h("span", { id: "log-state", class: "live" }, "following…");
    fill(panel, h("h3", {}, "Action ", h("span", { class: "mono", id: "action-id" }, actionId)),
      h("div", { id: "action-status" }), h("h4", {}, "Log ", logState), logBox, h("div", { id: "action-detail" }));
    drawActionStatus();
    loadDetail(actionId);
    const append = (text, cls) => {
      const span = h("span", cls ? { class: cls } : {}, text);
      logBox.appendChild(span);
      while (logBox.textContent.length > MAX_LOG_CHARS && logBox.firstChild) logBox.firstChild.remove();
      logBox.scrollTop = logBox.scrollHeight;
    };
    logs = new EventSource(base + "/actions/" + encodeURIComponent(actionId) + "/logs");
    logs.addEventListener("log", (e) => {
      const c = JSON.parse(e.data);
      if (c.gap) append(`[${c.gap} bytes not kept]\n`, "note");
      append(c.text, c.stream === "stderr" ? "stderr" : "");
    });
    logs.addEventListener("attempt_ended", (e) => {
      const c = JSON.parse(e.data);
      if (!logBox.textContent && (c.stdout_tail || c.stderr_tail)) {
        append(c.stdout_tail || "");
        append(c.stderr_tail || "", "stderr");
      }
      append(`— attempt ${c.attempt} ended (action ${c.action_state.toLowerCase()}) —\n`, "note");
    });
    logs.addEventListener("end", () => { logs.close(); logs = null; logState.textContent = "ended"; });
    logs.addEventListener("error", (e) => {
      if (e.data) {
        const body = JSON.parse(e.data);
        if (body.code !== "UNAVAILABLE") { logs.close(); logs = null; logState.textContent = body.error; }
      }
    });
  }

  return () => {
    events.close();
    if (logs) logs.close();
    clearInterval(timer);
    clearTimeout(refreshTimer);
    if (frame) cancelAnimationFrame(frame);
  };
}

// ---- workers ------------------------------------------------------------------------------

function workersView() {
  const box = h("div", { id: "workers" });
  main.replaceChildren(h("h2", {}, "Workers"), box);
  const load = async () => {
    try {
      const d = await api("/api/workers");
      const cols = ["worker", "host", "slots", "free", "leases", "queued", "heartbeat", "heard",
        "clock lead", "state", "handlers", "labels", "connected"];
      fill(box, d.workers.length ? h("table", {}, h("thead", {}, h("tr", {}, cols.map((c) => h("th", {}, c)))),
        h("tbody", {}, d.workers.map((w) => h("tr", { "data-worker": w.worker_id },
          h("td", { class: "mono" }, w.worker_id), h("td", {}, w.hostname), h("td", {}, String(w.slots)),
          h("td", {}, String(w.free_slots)), h("td", {}, String(w.leases)), h("td", {}, String(w.queued)),
          h("td", {}, `${w.last_seen_s.toFixed(1)}s ago`),
          h("td", {}, w.heard_s === null ? "not yet" : `${w.heard_s.toFixed(1)}s ago`),
          h("td", {}, w.clock_lead_ms === null ? "" : `${w.clock_lead_ms} ms` +
            (w.clock_offset_rejections ? ` (${w.clock_offset_rejections} refused)` : "")),
          h("td", {}, w.held_back_s !== null ? `held back ${w.held_back_s.toFixed(1)}s` : w.draining ? "draining" : "active"),
          h("td", {}, w.handlers.join(", ") + (w.exec_enabled ? (w.handlers.length ? ", " : "") + "exec" : "")),
          h("td", {}, Object.entries(w.labels).map(([k, v]) => `${k}=${v}`).join(", ")),
          h("td", {}, when(w.connected_ms)))))) : h("p", {}, "No worker is connected."),
      d.revoked.length ? h("div", {}, h("h3", {}, "Revoked"), h("ul", {}, d.revoked.map((r) =>
        h("li", {}, `${r.worker_id} by ${r.revoked_by}: ${r.reason}`)))) : null);
    } catch (err) { fail(box, err); }
  };
  load();
  const timer = setInterval(load, 2000);
  return () => clearInterval(timer);
}

// ---- routing ------------------------------------------------------------------------------

function route() {
  cleanup();
  const hash = location.hash.slice(1) || "/";
  const [path, query] = hash.split("?");
  const params = new URLSearchParams(query || "");
  const m = path.match(/^\/workflows\/(.+)$/);
  if (m) cleanup = workflowView(decodeURIComponent(m[1]), params);
  else if (path === "/workers") cleanup = workersView();
  else cleanup = listView(params);
  who();
}

window.addEventListener("hashchange", route);
route();
