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
              ["bundle version", esc(d.version ?? "–")],
              ["threshold", fmt(d.threshold, 4)],
              ["guarantee", `<small id="guarantee">${d.guarantee ? esc(d.guarantee) : "–"}</small>`],
              ["fallback, last 200", `${fmt(100 * d.fallback_share, 0)} %`],
              ["last frame", when(d.at)]);
  } else rows.push(["detector", "no frame scored yet"]);
  rows.push(["frames in results.db", s.max_id]);
  $("scoring").innerHTML = rows.map(([k, v]) => `<span>${k}</span><span>${v}</span>`).join("");
}
function products(s) {
  const p = s.products || [];
  $("products-section").hidden = !p.length;
  $("products").innerHTML = p.length ? `<table><tr><th>product</th><th>frames</th><th>OK</th><th>NG</th>` +
    `<th>hold</th><th>error</th></tr>` + p.map(r => `<tr><td>${esc(r.product)}</td><td>${r.total}</td>` +
    `<td class="ok">${r.ok}</td><td class="ng">${r.ng}</td><td>${r.hold}</td><td class="error">${r.error}</td></tr>`)
    .join("") + `</table>` : "";
}
function alarms(s) {
  const open = s.alarms || [];
  const held = (s.hold || []).map(h =>
    `<div class="alarm"><b>HOLD: parts to manual check</b><br><small>${esc(h.hold_reason)}</small>` +
    `<br><small>${esc(h.folder)}</small></div>`).join("");
  $("alarms").innerHTML = held + (open.length ? open.map(a =>
    `<div class="alarm"><b>${esc(a.name)}</b> since ${when(a.at)}<br><small>${esc(a.detail)}</small>` +
    `${a.folder ? `<br><small>${esc(a.folder)}</small>` : ""}</div>`).join("") : `<div class="none">no open alarm</div>`);
  $("events").innerHTML = (s.events || []).map(e => `<div>${when(e.at)} ${esc(e.name)}` +
    (e.kind === "version" ? ` <small>${esc(e.detail)}</small>` : `: ${esc(e.state)}`) + `</div>`).join("");
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
  $("histnote").textContent = `${h.n} latest scores of ${h.detector}` + (h.product ? ` (product ${h.product})` : "");
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
const pct = (v, d=1) => v === null || v === undefined ? "–" : `${fmt(100 * v, d)} %`;
const interval = i => i ? `${pct(i[0])} – ${pct(i[1])}` : "–";
function reviewed(s) {
  const v = s.reviews, b = v.bound;
  const bound = b ? `≤ ${pct(b.false_reject_rate)}` + (b.confidence ? ` (with ${pct(b.confidence, 0)} confidence, ${b.n} images)` :
    ` (on average, ${b.n} images)`) : "start the station with --bundle to show it";
  const rows = [
    ["reviews (latest per frame)", v.reviews],
    ["rejects reviewed", `${v.rejects_reviewed}, of which good parts <b id="good-rejects">${v.good_rejects}</b>`],
    ["good parts among reviewed rejects", `<b id="good-share">${pct(v.good_share)}</b> (${pct(v.confidence, 0)} exact interval ${interval(v.good_share_interval)})`],
    ["false-reject rate, measured", `<b id="measured-frr">${pct(v.false_reject_rate, 2)}</b> (${pct(v.confidence, 0)} interval ${interval(v.false_reject_interval)})` +
      (v.since ? `<br><small>good parts rejected of good parts scored since ${new Date(v.since * 1000).toLocaleString()}: ${v.frames_since.ng} rejects, ${v.frames_since.ok} OK</small>` : "")],
    ["false-reject rate, calibrated bound", `<span id="bound">${bound}</span>`],
    ["reviewed misses (OK frames found defective)", `<b id="misses-count" class="${v.misses ? "ng" : ""}">${v.misses}</b>`],
  ];
  $("reviewed").innerHTML = rows.map(([k, x]) => `<span>${k}</span><span>${x}</span>`).join("");
  $("misses").innerHTML = v.last_misses.map(m => `<div class="ng">${when(m.at)} ${esc(m.name)}: score ${fmt(m.score, 3)} ` +
    `(threshold ${fmt(m.threshold, 3)}), ${esc(m.who)}${m.note ? `: ${esc(m.note)}` : ""}</div>`).join("");
}
function frames(s) {
  const box = $("frames"); box.replaceChildren();
  for (const r of s.frames) {
    const d = document.createElement("div");
    d.dataset.id = r.id;
    d.innerHTML = `<span>#${r.id}</span><span>${esc(r.name)}</span><b class="${esc(r.status)}">${esc(r.status.toUpperCase())}</b>` +
      `<span>${fmt(r.score, 3)}</span><span>${when(r.scored_at)}</span>`;
    d.addEventListener("click", () => openFrame(r.id));
    box.append(d);
  }
}
let reviewing = false;
function reviewBox(r) {
  if (!reviewing || !["ok", "ng"].includes(r.status)) return "";
  const said = r.review ? `reviewed: <b>${r.review.verdict === "good" ? "good part" : "defect"}</b> by ${esc(r.review.who)}, ${when(r.review.at)}` +
    (r.review.note ? ` (${esc(r.review.note)})` : "") : "not reviewed yet";
  return `<div class="review" id="review"><span class="said" id="review-said">${said}</span>` +
    `<input name="token" type="password" placeholder="review token" autocomplete="off" value="${esc(sessionStorage.getItem("reviewToken") || "")}">` +
    `<input name="note" placeholder="note (optional)" maxlength="500">` +
    `<button data-verdict="good">good part</button><button data-verdict="defect">defect</button></div>`;
}
async function sendReview(id, verdict) {
  const box = $("review"), token = box.querySelector("[name=token]").value;
  sessionStorage.setItem("reviewToken", token);
  const res = await fetch(withToken("/api/review"), {method: "POST", headers: {"Content-Type": "application/json", "X-Review-Token": token},
    body: JSON.stringify({frame_id: id, verdict, note: box.querySelector("[name=note]").value})});
  const answer = await res.json();
  $("review-said").innerHTML = res.ok ? `reviewed: <b>${verdict === "good" ? "good part" : "defect"}</b> by ${esc(answer.who)}, saved` :
    `<span class="ng">not saved: ${esc(answer.error)}</span>`;
}
async function openFrame(id) {
  const r = await (await fetch(withToken(`/api/frame/${id}`))).json();
  const span = Math.max(r.score, r.threshold) * 1.25 || 1, pos = v => 100 * v / span;
  $("modalbox").innerHTML = (r.overlay_url ? `<img alt="" src="${esc(withToken(r.overlay_url))}">` : "") +
    `<p><b class="${esc(r.status)}">${esc(r.status.toUpperCase())}</b> ${esc(r.path)}<br>` +
    `score <b>${fmt(r.score, 4)}</b> against threshold <b>${fmt(r.threshold, 4)}</b> (${esc(r.detector)} on ${esc(r.backend)}), ` +
    `${when(r.scored_at)}, ${fmt(r.latency_ms, 0)} ms` +
    (r.bundle_version != null ? `, bundle version <b id="frame-version">${esc(r.bundle_version)}</b>` : "") + `</p>` +
    `<svg viewBox="0 0 100 8" height="24"><rect x="0" y="2" width="100" height="4" fill="#e3e7eb"/>` +
    `<rect x="0" y="2" width="${pos(r.score)}" height="4" fill="#d43a2f"/>` +
    `<line x1="${pos(r.threshold)}" x2="${pos(r.threshold)}" y1="0" y2="8" stroke="#1d2329" stroke-width=".6"/></svg>` +
    reviewBox(r) + `<p><small>click anywhere else to close</small></p>`;
  const box = $("review");
  if (box) {
    box.addEventListener("click", e => e.stopPropagation());
    box.querySelectorAll("button").forEach(b => b.addEventListener("click", () => sendReview(id, b.dataset.verdict)));
  }
  $("modal").classList.add("open");
}
$("modal").addEventListener("click", () => $("modal").classList.remove("open"));
let lastMax = -1;
async function poll() {
  try {
    const res = await fetch(withToken("/api/state"), {cache: "no-store"});
    if (res.status === 503) {  // results.db is there but cannot be read: the station says why in one line
      $("live").className = "stale"; $("live").textContent = await res.text(); return;
    }
    if (!res.ok) throw new Error(res.status);
    const s = await res.json();
    $("out").textContent = s.out;
    $("live").className = ""; $("live").textContent = `live · ${new Date().toLocaleTimeString()}`;
    if (!s.ready) { $("live").textContent = "waiting for results.db…"; return; }
    counts("hour", s.counts.hour); counts("shift", s.counts.shift);
    reviewing = s.reviewing;
    scoring(s); products(s); alarms(s); trend(s); hist(s); health(s); reviewed(s); frames(s);
    if (s.max_id !== lastMax) { rejects(s); lastMax = s.max_id; }
    document.body.dataset.maxId = s.max_id;
  } catch (e) {
    $("live").className = "stale"; $("live").textContent = `no connection (${e.message}); retrying`;
  }
}
poll();
setInterval(poll, 2000);
