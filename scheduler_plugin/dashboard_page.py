"""The ``/serve`` page: one self-contained HTML document.

Plain JavaScript and canvas, nothing loaded from elsewhere, so the page works on
clusters with no internet access. It polls ``/serve/api/status`` (relative to its own
address, so a dashboard prefix works) and redraws in place. Every name shown comes
from users (endpoints, backends, errors), so it is inserted as text, never as HTML.
"""

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>daskserve</title>
<style>
  body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.2em;
         color: #222; background: #fafafa; }
  h1 { font-size: 1.4em; margin: 0 0 .2em; }
  h2 { font-size: 1.1em; margin: 1.4em 0 .4em; border-bottom: 1px solid #ccc; }
  table { border-collapse: collapse; font-size: .9em; background: #fff; }
  th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left;
           vertical-align: top; }
  th { background: #f0f0f0; }
  td.num { text-align: right; font-variant-numeric: tabular-nums; }
  .muted { color: #777; font-size: .85em; }
  .RUNNING { color: #1a7f37; } .PENDING, .UPDATING { color: #9a6700; }
  .FAILED, .error { color: #cf222e; }
  .charts { display: flex; flex-wrap: wrap; gap: 1em; }
  .chart { background: #fff; border: 1px solid #ddd; padding: .4em; }
  .chart h3 { font-size: .9em; margin: 0 0 .3em; }
  canvas { display: block; }
</style>
</head>
<body>
<h1>daskserve</h1>
<div id="summary" class="muted">loading…</div>
<div id="problem" class="error"></div>

<h2>Endpoints</h2>
<table id="endpoints"><thead><tr>
  <th>endpoint</th><th>route</th><th>methods</th><th>traffic</th><th>shadows</th>
  <th>req/s</th><th>p50 ms</th><th>p99 ms</th></tr></thead><tbody></tbody></table>
<div id="charts" class="charts"></div>

<h2>Backends</h2>
<table id="backends"><thead><tr>
  <th>backend</th><th>status</th><th>replicas</th><th>config</th>
  <th>waiting in routers</th><th>pending reason</th><th>last error</th></tr></thead>
  <tbody></tbody></table>

<h2>Replicas</h2>
<table id="replicas"><thead><tr>
  <th>replica</th><th>backend</th><th>worker</th><th>state</th><th>in flight</th>
  <th>queued</th><th>requests</th><th>errors</th></tr></thead><tbody></tbody></table>

<div id="gpu-section" hidden>
<h2>GPUs</h2>
<table id="gpus"><thead><tr>
  <th>worker</th><th>gpu</th><th>name</th><th>utilisation %</th><th>memory used</th>
  <th>memory total</th></tr></thead><tbody></tbody></table>
</div>

<script>
"use strict";
const API = location.pathname.replace(/\\/+$/, "") + "/api/status";
const POLL_MS = 1000;
const COLORS = ["#0969da", "#cf222e", "#1a7f37", "#8250df", "#9a6700"];

function cell(row, value, cls) {
  const td = document.createElement("td");
  td.textContent = value === null || value === undefined ? "–" : String(value);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}
function fmt(x, digits) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(digits);
}
function pairs(obj) {
  return Object.entries(obj || {}).map(([k, v]) => k + ": " + v).join(", ");
}
function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(1) + " " + units[i];
}
function fill(tableId, rows, build) {
  const body = document.querySelector("#" + tableId + " tbody");
  const fresh = document.createElement("tbody");
  rows.forEach(r => { const tr = document.createElement("tr"); build(tr, r);
                      fresh.appendChild(tr); });
  body.replaceWith(fresh);
}
function last(list) {
  for (let i = list.length - 1; i >= 0; i--) if (list[i] !== null) return list[i];
  return null;
}

function chart(id, title, now, span, series, unit) {
  let box = document.getElementById(id);
  if (!box) {
    box = document.createElement("div");
    box.className = "chart"; box.id = id;
    const h = document.createElement("h3"); box.appendChild(h);
    const c = document.createElement("canvas"); c.width = 420; c.height = 160;
    box.appendChild(c);
    document.getElementById("charts").appendChild(box);
  }
  box.querySelector("h3").textContent = title;
  const canvas = box.querySelector("canvas");
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, L = 48, B = 18, T = 14, R = 8;
  ctx.clearRect(0, 0, W, H);
  let max = 0;
  series.forEach(s => s.ys.forEach(y => { if (y !== null && y > max) max = y; }));
  max = max > 0 ? max * 1.1 : 1;
  ctx.strokeStyle = "#ccc"; ctx.fillStyle = "#555"; ctx.font = "10px sans-serif";
  ctx.beginPath(); ctx.moveTo(L, T); ctx.lineTo(L, H - B); ctx.lineTo(W - R, H - B);
  ctx.stroke();
  ctx.fillText(max.toPrecision(3) + " " + unit, 2, T + 4);
  ctx.fillText("0", L - 10, H - B);
  ctx.fillText("-" + Math.round(span / 60) + " min", L, H - 4);
  ctx.fillText("now", W - R - 20, H - 4);
  const x = t => L + (W - L - R) * (1 - (now - t) / span);
  const y = v => (H - B) - (H - B - T) * v / max;
  series.forEach((s, i) => {
    ctx.strokeStyle = s.color || COLORS[i % COLORS.length]; ctx.lineWidth = 1.5;
    ctx.beginPath();
    let pen = false;
    s.xs.forEach((t, j) => {
      const v = s.ys[j];
      if (v === null || now - t > span) { pen = false; return; }
      if (pen) ctx.lineTo(x(t), y(v)); else ctx.moveTo(x(t), y(v));
      pen = true;
    });
    ctx.stroke();
    ctx.fillStyle = ctx.strokeStyle;
    s.xs.forEach((t, j) => {  // dots too: a lone sample draws no line
      const v = s.ys[j];
      if (v !== null && now - t <= span) ctx.fillRect(x(t) - 1.5, y(v) - 1.5, 3, 3);
    });
    ctx.fillText(s.label, L + 6 + i * 60, T);
  });
}

function render(s) {
  const problem = document.getElementById("problem");
  if (!s.running) {
    document.getElementById("summary").textContent = "no daskserve instance runs on this scheduler";
    return;
  }
  const names = Object.keys(s.endpoints).sort();
  document.getElementById("summary").textContent =
    "instance " + s.epoch.slice(0, 8) + " · routing table v" + s.version +
    " · proxies: " + (s.proxies.join(", ") || "none") + " · " + names.length +
    " endpoint(s), " + Object.keys(s.backends).length + " backend(s), " +
    s.replicas.length + " replica(s) · updated " + new Date(s.time * 1000).toLocaleTimeString();
  problem.textContent = s.unanswered_workers.length ?
    "no metrics from worker(s): " + s.unanswered_workers.join(", ") : "";

  fill("endpoints", names, (tr, name) => {
    const e = s.endpoints[name], h = e.traffic_history;
    tr.dataset.endpoint = name;
    cell(tr, name, "name");
    cell(tr, e.route === null ? "(handle only)" : e.route);
    cell(tr, e.methods.join(", "));
    cell(tr, pairs(e.traffic));
    cell(tr, pairs(e.shadows) || "–");
    cell(tr, fmt(h.rate.length ? h.rate[h.rate.length - 1] : null, 2), "num rate");
    cell(tr, fmt(last(h.p50_ms), 2), "num p50");
    cell(tr, fmt(last(h.p99_ms), 2), "num p99");
  });
  const span = s.history_s, now = s.time;
  const keep = new Set();
  names.forEach((name, i) => {
    const h = s.endpoints[name].traffic_history;
    if (s.endpoints[name].route === null) return;
    keep.add("rate-" + i); keep.add("lat-" + i);
    chart("rate-" + i, name + ": requests/s", now, span,
          [{label: "req/s", xs: h.t, ys: h.rate}], "/s");
    chart("lat-" + i, name + ": latency", now, span,
          [{label: "p50", xs: h.t, ys: h.p50_ms}, {label: "p99", xs: h.t, ys: h.p99_ms}],
          "ms");
  });
  document.querySelectorAll("#charts .chart").forEach(c => { if (!keep.has(c.id)) c.remove(); });

  fill("backends", Object.keys(s.backends).sort(), (tr, tag) => {
    const b = s.backends[tag], c = b.config;
    cell(tr, tag);
    cell(tr, b.status, b.status);
    cell(tr, pairs(b.replicas) + " of " + c.num_replicas);
    cell(tr, Object.entries(c).filter(([k, v]) => v !== null && k !== "num_replicas")
                 .map(([k, v]) => k + "=" + (typeof v === "object" ? JSON.stringify(v) : v))
                 .join(", "));
    cell(tr, b.router_queued, "num");
    cell(tr, b.pending_reason);
    cell(tr, b.last_error, "error");
  });
  fill("replicas", s.replicas, (tr, r) => {
    cell(tr, r.tag); cell(tr, r.backend); cell(tr, r.worker); cell(tr, r.state);
    cell(tr, r.in_flight, "num"); cell(tr, r.queued, "num");
    cell(tr, r.requests, "num"); cell(tr, r.errors, "num");
  });
  document.getElementById("gpu-section").hidden = !s.gpus.length;
  fill("gpus", s.gpus, (tr, g) => {
    cell(tr, g.worker); cell(tr, g.gpu + " (" + g.device + ")"); cell(tr, g.name);
    cell(tr, g.utilization_percent, "num"); cell(tr, bytes(g.memory_used_bytes), "num");
    cell(tr, bytes(g.memory_total_bytes), "num");
  });
}

async function poll() {
  try {
    const reply = await fetch(API, {cache: "no-store"});
    if (!reply.ok) throw new Error("HTTP " + reply.status);
    render(await reply.json());
  } catch (err) {
    document.getElementById("problem").textContent = "cannot read " + API + ": " + err;
  } finally {
    setTimeout(poll, POLL_MS);
  }
}
poll();
</script>
</body>
</html>
"""
