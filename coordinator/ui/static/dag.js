// Plait web UI: the DAG (layered layout, SVG) and the timeline (attempts per worker).
// Plain JavaScript, no framework. Text from a workflow is only ever set as textContent.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const NODE_W = 152, NODE_H = 46, GAP_X = 38, GAP_Y = 14, CELL = 10, PER_ROW = 13;
const MAX_CHILDREN_SHOWN = 840, MAX_BARS = 3000;

function svg(tag, attrs, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

function clip(text, n) {
  return text.length > n ? text.slice(0, n - 1) + "…" : text;
}

// Longest-path layers: an action sits one layer right of its deepest need.
function layers(spec) {
  const byId = new Map(spec.map((a) => [a.action_id, a]));
  const layer = new Map();
  const indegree = new Map(spec.map((a) => [a.action_id, 0]));
  const users = new Map(spec.map((a) => [a.action_id, []]));
  for (const a of spec) {
    for (const n of a.needs) {
      if (!byId.has(n)) continue;
      indegree.set(a.action_id, indegree.get(a.action_id) + 1);
      users.get(n).push(a.action_id);
    }
  }
  const queue = spec.filter((a) => indegree.get(a.action_id) === 0).map((a) => a.action_id);
  for (const id of queue) layer.set(id, 0);
  for (let i = 0; i < queue.length; i++) {
    const id = queue[i];
    for (const u of users.get(id)) {
      layer.set(u, Math.max(layer.get(u) || 0, layer.get(id) + 1));
      indegree.set(u, indegree.get(u) - 1);
      if (indegree.get(u) === 0) queue.push(u);
    }
  }
  return layer;
}

// What a join needs, as "all 2/3", "any 1/3" or "≥2 1/3": M needs succeeded of N.
function joinLabel(a, states) {
  if (!a.join) return "";
  const n = a.needs.length;
  const m = a.needs.filter((id) => states(id) === "SUCCEEDED").length;
  const j = a.join;
  if (j.kind === "ANY") return `any ${m}/${n}`;
  if (j.kind === "AT_LEAST") {
    const need = j.count || Math.ceil((j.fraction || 0) * n);
    return `≥${need} ${m}/${n}`;
  }
  return `all ${m}/${n}`;
}

// model: {spec, status(id) -> action status or undefined, children(id) -> [status],
//         expanded: Set, selected: id}; on: {select(id), toggle(id)}
function renderDag(model, on) {
  const spec = model.spec;
  const layer = layers(spec);
  const columns = [];
  for (const a of spec) {
    const l = layer.get(a.action_id) || 0;
    (columns[l] = columns[l] || []).push(a);
  }
  // Order each column by where its needs sit (two sweeps of the barycentre heuristic).
  const rank = new Map();
  columns.forEach((col) => col.forEach((a, i) => rank.set(a.action_id, i)));
  for (let sweep = 0; sweep < 2; sweep++) {
    for (const col of columns.slice(1)) {
      const key = (a) => {
        const r = a.needs.filter((n) => rank.has(n)).map((n) => rank.get(n));
        return r.length ? r.reduce((x, y) => x + y, 0) / r.length : rank.get(a.action_id);
      };
      col.sort((p, q) => key(p) - key(q));
      col.forEach((a, i) => rank.set(a.action_id, i));
    }
  }
  const stateOf = (id) => (model.status(id) || {}).state || "PENDING";
  const pos = new Map();
  let width = 0, height = 0;
  columns.forEach((col, l) => {
    let y = 10;
    for (const a of col) {
      const kids = model.children(a.action_id);
      let h = NODE_H;
      if (kids.length && model.expanded.has(a.action_id)) {
        const shown = Math.min(kids.length, MAX_CHILDREN_SHOWN);
        h += Math.ceil(shown / PER_ROW) * CELL + 8 + (kids.length > shown ? 12 : 0);
      }
      const x = 10 + l * (NODE_W + GAP_X);
      pos.set(a.action_id, { x, y, h });
      y += h + GAP_Y;
      width = Math.max(width, x + NODE_W + 10);
    }
    height = Math.max(height, y);
  });
  const root = svg("svg", { width, height, class: "dag", role: "img" });
  const edges = svg("g", { class: "edges" });
  root.appendChild(edges);
  for (const a of spec) {
    const to = pos.get(a.action_id);
    for (const n of a.needs) {
      const from = pos.get(n);
      if (!from) continue;
      const x1 = from.x + NODE_W, y1 = from.y + NODE_H / 2, x2 = to.x, y2 = to.y + NODE_H / 2;
      const mx = (x1 + x2) / 2;
      edges.appendChild(svg("path", {
        d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}`,
        class: "edge st-" + stateOf(n),
      }));
    }
  }
  for (const a of spec) {
    const p = pos.get(a.action_id);
    const s = model.status(a.action_id) || {};
    const state = s.state || "PENDING";
    const kids = model.children(a.action_id);
    const g = svg("g", {
      class: "node" + (model.selected === a.action_id ? " selected" : ""),
      transform: `translate(${p.x},${p.y})`,
      "data-action": a.action_id,
      "data-state": state,
      tabindex: 0,
    });
    g.appendChild(svg("title", {}, `${a.action_id}: ${state}${s.reason ? "\n" + s.reason : ""}`));
    g.appendChild(svg("rect", { width: NODE_W, height: p.h, rx: 6, class: "box st-" + state }));
    const join = joinLabel(a, stateOf);
    g.appendChild(svg("text", { x: 8, y: 17, class: "name" }, clip(a.action_id, join ? 13 : 20)));
    let sub = state.toLowerCase().replace("_", " ");
    if (s.attempt > 1) sub += ` · try ${s.attempt}`;
    if (kids.length) {
      const done = kids.filter((k) => k.state === "SUCCEEDED").length;
      sub += ` · ${a.map_over !== undefined ? "map" : "items"} ${done}/${kids.length}`;
    }
    g.appendChild(svg("text", { x: 8, y: 35, class: "sub" }, clip(sub, kids.length ? 24 : 27)));
    if (join) g.appendChild(svg("text", { x: NODE_W - 8, y: 17, class: "join" }, join));
    g.addEventListener("click", () => on.select(a.action_id));
    g.addEventListener("keydown", (e) => { if (e.key === "Enter") on.select(a.action_id); });
    if (kids.length) {
      const open = model.expanded.has(a.action_id);
      const t = svg("text", { x: NODE_W - 10, y: 37, class: "toggle", "data-toggle": a.action_id },
        open ? "−" : "+");
      t.appendChild(svg("title", {}, open ? "hide the items" : `show the ${kids.length} items`));
      t.addEventListener("click", (e) => { e.stopPropagation(); on.toggle(a.action_id); });
      g.appendChild(t);
      if (open) drawChildren(g, kids, model, on);
    }
    root.appendChild(g);
  }
  return root;
}

function drawChildren(g, kids, model, on) {
  const shown = kids.slice(0, MAX_CHILDREN_SHOWN);
  shown.forEach((k, i) => {
    const x = 8 + (i % PER_ROW) * CELL, y = NODE_H + Math.floor(i / PER_ROW) * CELL;
    const r = svg("rect", {
      x, y, width: CELL - 2, height: CELL - 2, rx: 2,
      class: "child st-" + k.state + (model.selected === k.action_id ? " selected" : ""),
      "data-action": k.action_id, "data-state": k.state,
    });
    r.appendChild(svg("title", {}, `${k.action_id}: ${k.state}${k.reason ? "\n" + k.reason : ""}`));
    r.addEventListener("click", (e) => { e.stopPropagation(); on.select(k.action_id); });
    g.appendChild(r);
  });
  if (kids.length > shown.length) {
    const y = NODE_H + Math.ceil(shown.length / PER_ROW) * CELL + 9;
    g.appendChild(svg("text", { x: 8, y, class: "sub" }, `+${kids.length - shown.length} more`));
  }
}

// Attempts from the history: leased/started -> finished, per lease (a hedge is its own bar).
function spansFrom(events, spans) {
  const ends = new Set(["ACTION_FINISHED", "ACTION_RETRY_SCHEDULED", "LEASE_LOST",
    "ACTION_CANCELLED", "ACTION_SKIPPED"]);
  for (const e of events) {
    const key = e.lease_id || `${e.action_id}#${e.attempt}`;
    if (e.type === "ACTION_LEASED" || e.type === "ACTION_STARTED") {
      const s = spans.get(key) || { action_id: e.action_id, attempt: e.attempt, start: e.recorded_ms };
      if (e.worker_id) s.worker_id = e.worker_id;
      if (e.type === "ACTION_STARTED") s.started = e.recorded_ms;
      spans.set(key, s);
    } else if (ends.has(e.type) && e.action_id) {
      const state = e.type === "LEASE_LOST" ? "LOST" : e.action_state;
      const close = (s) => { if (s.end === undefined) { s.end = e.recorded_ms; s.state = state; } };
      if (e.lease_id && spans.has(e.lease_id)) close(spans.get(e.lease_id));
      else for (const s of spans.values()) if (s.action_id === e.action_id) close(s);
    }
  }
}

// One row per worker; attempts that overlap there (its slots) get lanes of their own.
function renderTimeline(spans, now, on, selected) {
  // The newest attempts only: thousands of bars say nothing a browser can draw quickly.
  const list = [...spans.values()].filter((s) => s.worker_id).slice(-MAX_BARS)
    .map((s) => Object.assign({}, s, { start: s.started || s.start })); // from its start, once known
  if (!list.length) return null;
  list.sort((p, q) => p.start - q.start);
  const lanes = new Map(); // worker -> the end of each lane's last bar
  for (const s of list) {
    const ends = lanes.get(s.worker_id) || lanes.set(s.worker_id, []).get(s.worker_id);
    let lane = ends.findIndex((e) => e <= s.start);
    if (lane < 0) lane = ends.push(0) - 1;
    ends[lane] = s.end || Infinity;
    s.lane = lane;
  }
  const workers = [...lanes.keys()].sort();
  const t0 = list[0].start;
  const t1 = Math.max(now, ...list.map((s) => s.end || now));
  const left = 130, right = 16, lane = 17, width = 1240;
  const scale = (width - left - right) / Math.max(1, t1 - t0);
  const top = new Map();
  let y = 4;
  for (const w of workers) { top.set(w, y); y += lanes.get(w).length * lane + 8; }
  const root = svg("svg", { width, height: y + 18, class: "timeline" });
  for (const w of workers) {
    root.appendChild(svg("text", { x: 4, y: top.get(w) + 12, class: "worker" }, clip(w, 18)));
    const base = top.get(w) + lanes.get(w).length * lane + 3;
    root.appendChild(svg("line", { x1: 0, x2: width - right, y1: base, y2: base, class: "lane" }));
  }
  for (const s of list) {
    const by = top.get(s.worker_id) + s.lane * lane;
    const x = left + (s.start - t0) * scale;
    const w = Math.max(2, ((s.end || now) - s.start) * scale);
    const state = s.state || "RUNNING";
    const r = svg("rect", { x, y: by, width: w, height: lane - 3, rx: 2,
      class: "bar st-" + state + (selected === s.action_id ? " selected" : ""),
      "data-action": s.action_id });
    const secs = (((s.end || now) - s.start) / 1000).toFixed(1);
    r.appendChild(svg("title", {}, `${s.action_id} attempt ${s.attempt} on ${s.worker_id}: ` +
      `${state}, ${secs}s`));
    r.addEventListener("click", () => on.select(s.action_id));
    root.appendChild(r);
    if (w > 40) root.appendChild(svg("text", { x: x + 3, y: by + 10, class: "barlabel" },
      clip(s.action_id, Math.floor(w / 6.5))));
  }
  root.appendChild(svg("text", { x: left, y: y + 10, class: "axis" }, "0s"));
  root.appendChild(svg("text", { x: width - right, y: y + 10, class: "axis end" },
    `${((t1 - t0) / 1000).toFixed(1)}s`));
  return root;
}

window.PlaitDag = { renderDag, renderTimeline, spansFrom, joinLabel, layers };
