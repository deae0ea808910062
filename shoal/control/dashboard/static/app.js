// Shoal dashboard: renders the snapshots /api/stream pushes once a second.
// Plain DOM, SVG and canvas; every value from the server is set as text, never as HTML.
"use strict";

const HISTORY = 60; // points per chart: one a second
const history = new Map(); // service -> {rps: [], p99: []}

function el(tag, attrs, ...children) {
  const svg = ["svg", "g", "rect", "text", "path", "line"].includes(tag);
  const node = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag)
                   : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) node.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

const fmtRate = (r) => (r >= 100 ? r.toFixed(0) : r >= 10 ? r.toFixed(1) : r.toFixed(2));
const fmtMs = (s) => (s === null || s === undefined ? "-" :
  s < 0.001 ? (s * 1e6).toFixed(0) + " µs" : s < 1 ? (s * 1e3).toFixed(1) + " ms" :
  s.toFixed(2) + " s");
function fmtSuccess(r) {
  if (r === null || r === undefined) return el("span", {class: "dim"}, "-");
  const cls = r >= 0.99 ? "good" : r >= 0.95 ? "meh" : "bad";
  return el("span", {class: cls}, (r * 100).toFixed(r === 1 ? 0 : 1) + "%");
}

function remember(name, rps, p99) {
  let h = history.get(name);
  if (!h) history.set(name, (h = {rps: [], p99: []}));
  h.rps.push(rps); h.p99.push(p99 === null ? 0 : p99);
  if (h.rps.length > HISTORY) { h.rps.shift(); h.p99.shift(); }
  return h;
}

function spark(values, color) {
  const c = el("canvas", {class: "spark", width: 160, height: 28});
  const ctx = c.getContext("2d");
  const max = Math.max(...values, 1e-9);
  ctx.strokeStyle = color; ctx.lineWidth = 1.5; ctx.beginPath();
  values.forEach((v, i) => {
    const x = (i / (HISTORY - 1)) * 158 + 1, y = 26 - (v / max) * 24;
    if (i) ctx.lineTo(x, y); else ctx.moveTo(x, y);
  });
  ctx.stroke();
  return c;
}

function renderServices(services) {
  const body = document.querySelector("#services tbody");
  body.replaceChildren(...services.map((s) => {
    const h = remember(s.name, s.rps || 0, s.p99);
    const states = s.instances.length ? s.instances.map((i) =>
      el("span", {class: "badge " + (i.state || ""), title: i.health_reason || i.address || ""},
         `${i.id}: ${i.state}`)) :
      Object.entries(s.states || {}).map(([k, n]) => el("span", {class: "badge " + k}, `${k} ${n}`));
    return el("tr", {"data-service": s.name},
      el("td", {}, s.name, s.replicas !== undefined ? el("span", {class: "dim"}, ` ×${s.replicas}`) : null),
      el("td", {}, ...(states.length ? states : [el("span", {class: "dim"}, "-")])),
      el("td", {class: "num", "data-rps": (s.rps || 0).toFixed(3)}, fmtRate(s.rps || 0)),
      el("td", {class: "num"}, fmtSuccess(s.success_rate)),
      el("td", {class: "num"}, fmtMs(s.p50)), el("td", {class: "num"}, fmtMs(s.p95)),
      el("td", {class: "num"}, fmtMs(s.p99)),
      el("td", {}, spark(h.rps, "#58a6ff")), el("td", {}, spark(h.p99, "#d29922")));
  }));
}

async function replay(topic, button) {
  button.disabled = true;
  const out = document.getElementById("replay-result");
  try {
    const resp = await fetch(`/api/topics/${encodeURIComponent(topic)}/replay`,
      {method: "POST", headers: {"content-type": "application/json"}, body: "{}"});
    const body = await resp.json();
    out.textContent = resp.ok ?
      `${topic}: replayed ${body.replayed}, already there ${body.duplicates}, replayed before ${body.skipped}` :
      `${topic}: ${body.error}`;
  } catch (e) {
    out.textContent = `${topic}: replay failed: ${e}`;
  } finally {
    button.disabled = false;
  }
}

function renderTopics(topics) {
  const body = document.querySelector("#topics tbody");
  body.replaceChildren(...topics.map((t) => el("tr", {"data-topic": t.name},
    el("td", {}, t.name, el("span", {class: "dim"}, ` (${t.partitions} partitions)`)),
    el("td", {class: "num"}, t.events),
    el("td", {class: "num", "data-rate": (t.publish_rate || 0).toFixed(3)}, fmtRate(t.publish_rate || 0)),
    el("td", {}, ...(t.groups.length ? t.groups.map((g) =>
      el("span", {class: "badge", "data-group": g.name}, `${g.name}: ${g.lag}`)) :
      [el("span", {class: "dim"}, "-")])),
    el("td", {class: "num"}, t.dead_letters ? el("span", {class: "bad"}, t.dead_letters) : "0", " ",
      t.dead_letters ? (() => {
        const b = el("button", {"data-replay": t.name}, "replay");
        b.addEventListener("click", () => replay(t.name, b));
        return b;
      })() : null))));
}

function renderTopology(snapshot) {
  const svg = document.getElementById("topology");
  const width = svg.clientWidth || 900, columns = [[], [], [], []];
  const kind = new Map();
  const add = (name, col, k) => { if (!kind.has(name)) { kind.set(name, k); columns[col].push(name); } };
  // node keys carry their kind: a topic may share its name with a service ("orders")
  if (snapshot.edges.some((e) => e.from === "gateway")) add("gateway:", 0, "gateway");
  for (const s of snapshot.services) add("service:" + s.name, 1, "service");
  for (const t of snapshot.topics) {
    add("topic:" + t.name, 2, "topic");
    for (const g of t.groups) add("group:" + g.name, 3, "group");
  }
  const pos = new Map();
  columns.forEach((names, c) => names.forEach((n, i) =>
    pos.set(n, {x: 20 + c * (width - 160) / 3, y: 20 + i * 36})));
  const height = Math.max(120, ...[...pos.values()].map((p) => p.y + 40));
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.style.height = height + "px";
  const parts = [];
  for (const e of snapshot.edges) {
    const a = pos.get(e.kind === "event" ? "topic:" + e.from : e.from + ":");
    const b = pos.get(e.kind === "event" ? "group:" + e.to : "service:" + e.to);
    if (!a || !b) continue;
    const x1 = a.x + 120, y1 = a.y + 12, x2 = b.x, y2 = b.y + 12, mx = (x1 + x2) / 2;
    parts.push(el("path", {class: "edge" + (e.rate > 0 ? " busy" : ""),
      d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}`,
      "stroke-width": 1 + Math.min(4, Math.log10(1 + e.rate))}));
    parts.push(el("text", {class: "rate", x: mx, y: (y1 + y2) / 2 - 3, "text-anchor": "middle"},
      fmtRate(e.rate) + "/s"));
  }
  for (const [key, p] of pos) {
    const label = key.slice(key.indexOf(":") + 1) || key.slice(0, -1);
    parts.push(el("g", {class: "node " + kind.get(key), "data-node": key,
                        transform: `translate(${p.x},${p.y})`},
      el("rect", {width: 120, height: 24}),
      el("text", {x: 8, y: 16}, label.length > 17 ? label.slice(0, 16) + "…" : label)));
  }
  svg.replaceChildren(...parts);
}

function renderLog(id, rows, line) {
  document.getElementById(id).replaceChildren(...rows.map((r) => el("li", {}, line(r))));
}

const clock = (t) => new Date(t * 1000).toISOString().slice(11, 23);

function render(snapshot) {
  document.getElementById("clock").textContent = snapshot.time ? clock(snapshot.time) : "";
  renderServices(snapshot.services || []);
  renderTopics(snapshot.topics || []);
  renderTopology({edges: [], services: [], topics: [], ...snapshot});
  renderLog("events", snapshot.events || [], (e) =>
    `${clock(e.time)}  ${e.topic}  ${e.type}${e.key !== null ? "  key=" + e.key : ""}  ${e.id}`);
  renderLog("autoscaler", snapshot.autoscaler || [], (d) => {
    const {time, ...rest} = d;
    return `${clock(time)}  ` + Object.entries(rest).map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ");
  });
  const problems = snapshot.errors || [];
  document.getElementById("problems-section").hidden = problems.length === 0;
  renderLog("problems", problems, (p) => p);
}

function connect() {
  const status = document.getElementById("status");
  const source = new EventSource("/api/stream");
  source.addEventListener("snapshot", (m) => {
    status.textContent = "live"; status.dataset.state = "live";
    render(JSON.parse(m.data));
  });
  source.onerror = () => { status.textContent = "reconnecting"; status.dataset.state = "lost"; };
}

connect();
