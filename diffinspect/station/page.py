# ruff: noqa: E501  (HTML, CSS and JS lines)
"""The station page: one HTML document with its CSS and JS inline (no CDN, no build step)."""

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>diffinspect station</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
:root { --ok:#2e9e44; --ng:#d43a2f; --err:#e39a12; --ink:#1d2329; --mute:#6b7580; --card:#fff; --bg:#eef1f4; }
* { box-sizing:border-box; }
body { margin:0; font:14px/1.35 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif; background:var(--bg); color:var(--ink); }
header { display:flex; align-items:center; gap:12px; padding:10px 18px; background:#1d2329; color:#fff; }
header h1 { font-size:17px; margin:0; font-weight:600; }
header .out { color:#aeb7c0; font-size:12px; overflow:hidden; text-overflow:ellipsis; white-space:nowrap; }
#live { margin-left:auto; font-size:12px; color:#aeb7c0; }
#live.stale { color:#ffb347; }
main { display:grid; grid-template-columns:repeat(auto-fill,minmax(330px,1fr)); gap:12px; padding:12px 18px; }
section { background:var(--card); border-radius:8px; padding:10px 14px; box-shadow:0 1px 2px rgba(0,0,0,.08); }
section h2 { font-size:13px; text-transform:uppercase; letter-spacing:.04em; color:var(--mute); margin:0 0 8px; }
.wide { grid-column:1/-1; }
.counts { display:grid; grid-template-columns:repeat(5,1fr); gap:6px; text-align:center; }
.counts div b { display:block; font-size:24px; font-variant-numeric:tabular-nums; }
.counts small { color:var(--mute); }
.ok { color:var(--ok); } .ng { color:var(--ng); } .error { color:var(--err); }
.kv { display:grid; grid-template-columns:auto 1fr; gap:3px 12px; }
.kv span:nth-child(odd) { color:var(--mute); }
.fallback { color:var(--err); font-weight:600; }
#alarms .alarm { background:#fdecea; border-left:4px solid var(--ng); padding:6px 8px; margin:4px 0; border-radius:4px; }
#alarms .alarm b { color:var(--ng); }
#alarms .none { color:var(--ok); font-weight:600; }
#events { max-height:140px; overflow:auto; font-size:12px; color:var(--mute); margin-top:6px; }
#rejects { display:flex; flex-wrap:wrap; gap:8px; }
#rejects figure { margin:0; width:120px; cursor:pointer; }
#rejects img { width:120px; height:120px; object-fit:cover; border-radius:4px; border:2px solid var(--ng); background:#ddd; }
#rejects figcaption { font-size:11px; color:var(--mute); overflow:hidden; text-overflow:ellipsis; white-space:nowrap; }
svg { width:100%; display:block; }
svg text { font-size:10px; fill:var(--mute); }
#modal { position:fixed; inset:0; background:rgba(0,0,0,.75); display:none; align-items:center; justify-content:center; }
#modal.open { display:flex; }
#modal .box { background:#fff; border-radius:8px; padding:12px; max-width:92vw; max-height:92vh; overflow:auto; }
#modal img { max-width:86vw; max-height:70vh; display:block; margin:0 auto; }
.empty { color:var(--mute); font-style:italic; }
</style></head>
<body>
<header><h1>diffinspect station</h1><span class="out" id="out"></span><span id="live">connecting…</span></header>
<main>
<section><h2>Last hour</h2><div class="counts" id="hour"></div></section>
<section><h2>This shift</h2><div class="counts" id="shift"></div></section>
<section><h2>Scoring</h2><div class="kv" id="scoring"></div></section>
<section><h2>Alarms</h2><div id="alarms"></div><div id="events"></div></section>
<section><h2>Score histogram and threshold</h2><svg id="hist" viewBox="0 0 400 150" height="150"></svg><div id="histnote" class="empty"></div></section>
<section class="wide"><h2>OK / NG / error per minute, last hour</h2><svg id="trend" viewBox="0 0 900 120" preserveAspectRatio="none" height="120"></svg></section>
<section class="wide"><h2>Frame health against calibrated bands</h2><div id="health"></div></section>
<section class="wide"><h2>Last rejects</h2><div id="rejects"></div></section>
</main>
<div id="modal"><div class="box" id="modalbox"></div></div>
<script>
"use strict";
const TOKEN = new URLSearchParams(location.search).get("token");
const withToken = u => TOKEN ? u + (u.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(TOKEN) : u;
const $ = id => document.getElementById(id);
const esc = s => String(s ?? "").replace(/[&<>"']/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c]));
const fmt = (v, d=1) => v === null || v === undefined || !isFinite(v) ? "–" : Number(v).toFixed(d);
const when = t => new Date(t * 1000).toLocaleTimeString();
const NS = "http://www.w3.org/2000/svg";
function el(tag, attrs, text) {
  const e = document.createElementNS(NS, tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  return e;
}
function counts(id, c) {
  $(id).innerHTML = `<div><b id="${id}-total">${c.total}</b><small>frames</small></div>` +
    `<div><b id="${id}-ok" class="ok">${c.ok}</b><small>OK</small></div>` +
    `<div><b id="${id}-ng" class="ng">${c.ng}</b><small>NG</small></div>` +
    `<div><b id="${id}-error" class="error">${c.error}</b><small>error</small></div>` +
    `<div><b id="${id}-rate">${fmt(c.per_minute)}</b><small>per min</small></div>`;
}
function scoring(s) {
  const d = s.detector, l = s.latency;
  const rows = [["latency p50 / p99", l.p50 === null ? "–" : `${fmt(l.p50, 0)} / ${fmt(l.p99, 0)} ms`]];
  if (d) {
    const fb = d.fallback_reason ? `<span class="fallback">FALLBACK</span> (${esc(d.fallback_reason)})` : "";
    rows.push(["detector", `${esc(d.detector)} ${fb}`], ["backend", esc(d.backend)],
              ["threshold", fmt(d.threshold, 4)], ["fallback, last 200", `${fmt(100 * d.fallback_share, 0)} %`],
              ["last frame", when(d.at)]);
  } else rows.push(["detector", "no frame scored yet"]);
  rows.push(["frames in results.db", s.max_id]);
  $("scoring").innerHTML = rows.map(([k, v]) => `<span>${k}</span><span>${v}</span>`).join("");
}
function alarms(s) {
  const open = s.alarms || [];
  $("alarms").innerHTML = open.length ? open.map(a =>
    `<div class="alarm"><b>${esc(a.name)}</b> since ${when(a.at)}<br><small>${esc(a.detail)}</small>` +
    `${a.folder ? `<br><small>${esc(a.folder)}</small>` : ""}</div>`).join("") : `<div class="none">no open alarm</div>`;
  $("events").innerHTML = (s.events || []).map(e => `<div>${when(e.at)} ${esc(e.name)}: ${esc(e.state)}</div>`).join("");
}
function trend(s) {
  const svg = $("trend"); svg.replaceChildren();
  const t = s.trend, w = 900 / t.length, max = Math.max(1, ...t.map(b => b.ok + b.ng + b.error));
  t.forEach((b, i) => {
    let y = 110;
    for (const [k, c] of [["ok", "#2e9e44"], ["ng", "#d43a2f"], ["error", "#e39a12"]]) {
      const h = 100 * b[k] / max;
      if (h > 0) { y -= h; svg.append(el("rect", {x: i * w + 1, y, width: w - 2, height: h, fill: c})); }
    }
  });
  svg.append(el("text", {x: 2, y: 10}, `max ${max}/min`), el("text", {x: 860, y: 119}, "now"));
}
function hist(s) {
  const svg = $("hist"); svg.replaceChildren();
  const h = s.histogram;
  if (!h.counts.length) { $("histnote").textContent = "no scores yet"; return; }
  $("histnote").textContent = `${h.n} latest scores of ${h.detector}`;
  const lo = h.edges[0], hi = h.edges[h.edges.length - 1], W = 400, H = 130, max = Math.max(...h.counts) * 1.12;
  const x = v => 5 + (W - 10) * (v - lo) / (hi - lo);
  h.counts.forEach((c, i) => {
    const bh = H * c / max, over = h.threshold !== null && h.edges[i] >= h.threshold;
    svg.append(el("rect", {x: x(h.edges[i]), y: H - bh, width: Math.max(1, x(h.edges[i + 1]) - x(h.edges[i]) - 1),
                           height: bh, fill: over ? "#d43a2f" : "#5b8cc9"}));
  });
  if (h.threshold !== null) {
    svg.append(el("line", {x1: x(h.threshold), x2: x(h.threshold), y1: 0, y2: H, stroke: "#1d2329", "stroke-dasharray": "4 3"}),
               el("text", {x: Math.min(x(h.threshold) + 3, W - 90), y: 10}, `threshold ${fmt(h.threshold, 3)}`));
  }
  svg.append(el("text", {x: 5, y: 147}, fmt(lo, 2)), el("text", {x: W - 40, y: 147}, fmt(hi, 2)));
}
function health(s) {
  const box = $("health");
  if (!s.health.length) { box.innerHTML = `<div class="empty">no health signals yet (bundles calibrated before health signals have none)</div>`; return; }
  box.replaceChildren();
  for (const name of ["brightness", "contrast", "sharpness", "shift"]) {
    const pts = s.health.map(r => r[name]).filter(v => v !== null);
    if (!pts.length) continue;
    const band = s.bands[name] || null;
    let lo = Math.min(...pts), hi = Math.max(...pts);
    if (band) { lo = Math.min(lo, band[0]); hi = Math.max(hi, band[1]); }
    if (hi <= lo) { hi = lo + 1; }
    const pad = 0.08 * (hi - lo); lo -= pad; hi += pad;
    const W = 900, H = 70, top = 15, y = v => H - (H - top) * (v - lo) / (hi - lo), n = s.health.length;
    const svg = el("svg", {viewBox: `0 0 ${W} ${H + 4}`, preserveAspectRatio: "none", height: 74, "data-signal": name});
    if (band) svg.append(el("rect", {x: 0, y: y(band[1]), width: W, height: Math.max(1, y(band[0]) - y(band[1])), fill: "#d9efdc"}));
    let d = "";
    s.health.forEach((r, i) => { if (r[name] !== null) d += `${d ? "L" : "M"}${(W * i / Math.max(1, n - 1)).toFixed(1)},${y(r[name]).toFixed(1)}`; });
    svg.append(el("path", {d, fill: "none", stroke: "#1d2329", "stroke-width": 1.2}),
               el("text", {x: 4, y: 11}, `${name}  ${fmt(pts[pts.length - 1], 3)}` + (band ? `  (good parts ${fmt(band[0], 2)} – ${fmt(band[1], 2)})` : "")));
    box.append(svg);
  }
}
function rejects(s) {
  const box = $("rejects");
  if (!s.rejects.length) { box.innerHTML = `<div class="empty">no rejects</div>`; return; }
  box.replaceChildren();
  for (const r of s.rejects) {
    const f = document.createElement("figure");
    f.dataset.id = r.id;
    f.innerHTML = (r.overlay_url ? `<img alt="" src="${esc(withToken(r.overlay_url))}">` : `<img alt="no overlay">`) +
      `<figcaption>${esc(r.name)}<br>score ${fmt(r.score, 3)}</figcaption>`;
    f.addEventListener("click", () => openFrame(r.id));
    box.append(f);
  }
}
async function openFrame(id) {
  const r = await (await fetch(withToken(`/api/frame/${id}`))).json();
  const span = Math.max(r.score, r.threshold) * 1.25 || 1, pos = v => 100 * v / span;
  $("modalbox").innerHTML = (r.overlay_url ? `<img alt="" src="${esc(withToken(r.overlay_url))}">` : "") +
    `<p><b class="${esc(r.status)}">${esc(r.status.toUpperCase())}</b> ${esc(r.path)}<br>` +
    `score <b>${fmt(r.score, 4)}</b> against threshold <b>${fmt(r.threshold, 4)}</b> (${esc(r.detector)} on ${esc(r.backend)}), ` +
    `${when(r.scored_at)}, ${fmt(r.latency_ms, 0)} ms</p>` +
    `<svg viewBox="0 0 100 8" height="24"><rect x="0" y="2" width="100" height="4" fill="#e3e7eb"/>` +
    `<rect x="0" y="2" width="${pos(r.score)}" height="4" fill="#d43a2f"/>` +
    `<line x1="${pos(r.threshold)}" x2="${pos(r.threshold)}" y1="0" y2="8" stroke="#1d2329" stroke-width=".6"/></svg>` +
    `<p><small>click anywhere to close</small></p>`;
  $("modal").classList.add("open");
}
$("modal").addEventListener("click", () => $("modal").classList.remove("open"));
let lastMax = -1;
async function poll() {
  try {
    const res = await fetch(withToken("/api/state"), {cache: "no-store"});
    if (!res.ok) throw new Error(res.status);
    const s = await res.json();
    $("out").textContent = s.out;
    $("live").className = ""; $("live").textContent = `live · ${new Date().toLocaleTimeString()}`;
    if (!s.ready) { $("live").textContent = "waiting for results.db…"; return; }
    counts("hour", s.counts.hour); counts("shift", s.counts.shift);
    scoring(s); alarms(s); trend(s); hist(s); health(s);
    if (s.max_id !== lastMax) { rejects(s); lastMax = s.max_id; }
    document.body.dataset.maxId = s.max_id;
  } catch (e) {
    $("live").className = "stale"; $("live").textContent = `no connection (${e.message}); retrying`;
  }
}
poll();
setInterval(poll, 2000);
</script>
</body></html>
"""
