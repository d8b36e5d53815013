// The gateway's page: polls /gateway/page/state every second and redraws.
// Plain DOM (textContent only: nothing from the server is parsed as HTML),
// charts drawn as inline SVG; no library, nothing fetched from elsewhere.
"use strict";

const CSRF = document.querySelector('meta[name="csrf-token"]').content;
const POLL_MS = 1000;
const COLORS = ["#2563eb", "#16a34a", "#d97706", "#9333ea", "#dc2626", "#0891b2", "#4b5563", "#db2777"];
const SVG = "http://www.w3.org/2000/svg";
let busy = new Set(); // models and batches with an action under way

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "style") node.style.cssText = v; // CSSOM: allowed by the page's CSP
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return node;
}
function td(text, cls) { return el("td", cls ? { class: cls } : {}, text == null ? "–" : String(text)); }
function duration(s) {
  if (s == null) return "–";
  s = Math.round(s);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}
function ms(s) { return s == null ? "–" : (s < 1 ? (s * 1000).toFixed(1) + " ms" : s.toFixed(2) + " s"); }
function clock(t) { return new Date(t * 1000).toLocaleTimeString(); }
function tokens(a, b) { return (a ?? "–") + " / " + (b ?? "–"); }
function notice(text) {
  const n = document.getElementById("notice");
  n.textContent = text; n.hidden = false;
  clearTimeout(notice.timer);
  notice.timer = setTimeout(() => { n.hidden = true; }, 8000);
}

function stateCell(m) {
  const cell = el("td", {}, el("span", { class: "state " + m.state }, m.state));
  let detail = "";
  if (m.state === "queued") {
    detail = m.queue_reason ? "reason: " + m.queue_reason : "waiting for the scheduler";
    if (m.expected_start) detail += "; expected start " + m.expected_start;
  } else if (m.state === "loading") {
    detail = "loading for " + duration(m.loading_for_s);
    if (m.expected_load_s != null) detail += " of about " + duration(m.expected_load_s) + " (earlier starts)";
  } else if (m.state === "failed" && m.error) {
    detail = m.error;
  }
  if (detail) cell.append(el("div", { class: "detail" }, detail));
  return cell;
}

async function act(url, what, key) {
  busy.add(key);
  notice(what + "…");
  try {
    const r = await fetch(url, { method: "POST", credentials: "same-origin",
                                 headers: { "X-CSRF-Token": CSRF } });
    const body = await r.json().catch(() => ({}));
    notice(r.ok ? body.message : "Failed: " + ((body.error && body.error.message) || r.status));
  } catch (e) {
    notice("Failed: " + e);
  } finally {
    busy.delete(key);
  }
}

function stopButton(m) {
  const live = m.job_id || ["queued", "loading", "ready"].includes(m.state);
  const b = el("button", { "data-model": m.name }, busy.has("m:" + m.name) ? "stopping…" : "Stop");
  b.disabled = !live || busy.has("m:" + m.name);
  b.addEventListener("click", () => {
    const job = m.job_id ? " and cancel job " + m.job_id : "";
    if (confirm("Stop " + m.name + job + " now? Requests in flight to it fail.")) {
      act("/gateway/page/models/" + encodeURIComponent(m.name) + "/stop", "Stopping " + m.name, "m:" + m.name);
      b.disabled = true; b.textContent = "stopping…";
    }
  });
  return b;
}

function drawModels(models) {
  const body = document.querySelector("#models tbody");
  body.replaceChildren(...models.map((m) => el("tr", { "data-model": m.name, "data-state": m.state },
    el("td", {}, m.name, el("div", { class: "detail" }, m.served || "")),
    stateCell(m), td(m.job_id), td(m.node), td(m.gpus), td(duration(m.time_left), "num"),
    td(m.in_flight, "num in-flight"), td(m.served_requests, "num served"),
    td(tokens(m.prompt_tokens, m.completion_tokens), "num tokens"),
    td(ms(m.p50_s) + " / " + ms(m.p95_s), "num"),
    td(m.gpu_hours_used.toFixed(3), "num"), td(m.gpu_hours_saved.toFixed(3), "num"),
    el("td", {}, stopButton(m)))));
}

function drawBatches(batches) {
  const box = document.getElementById("batches");
  if (!batches.length) { box.replaceChildren(el("p", { class: "none" }, "No batches.")); return; }
  const rows = batches.map((b) => {
    const done = b.total ? (b.completed + b.failed) / b.total : 0;
    const bar = el("div", { class: "bar" }, el("div", { style: "width:" + (done * 100).toFixed(1) + "%" }));
    const cancel = el("button", {}, "Cancel");
    cancel.disabled = !b.active || busy.has("b:" + b.id);
    cancel.addEventListener("click", () => {
      if (confirm("Cancel batch " + b.id + " (" + b.model + ")?")) {
        act("/gateway/page/batches/" + encodeURIComponent(b.id) + "/cancel", "Cancelling " + b.id, "b:" + b.id);
      }
    });
    return el("tr", {}, td(b.id), td(b.model), td(b.status), el("td", {}, bar),
      td(b.completed + b.failed + " / " + b.total + (b.failed ? " (" + b.failed + " failed)" : ""), "num"),
      td(b.active ? duration(b.eta_s) : ""), el("td", {}, cancel));
  });
  box.replaceChildren(el("table", {}, el("thead", {}, el("tr", {}, ...["Batch", "Model", "Status",
    "Progress", "Done", "ETA", ""].map((h) => el("th", {}, h)))), el("tbody", {}, ...rows)));
}

function drawRecent(recent, errors) {
  document.querySelector("#recent tbody").replaceChildren(...recent.map((r) => el("tr",
    { class: r.ok ? "" : "bad" }, td(clock(r.time)), td(r.model || "–"), td(r.route),
    td(r.status, "num"), td(ms(r.latency_s), "num"), td(tokens(r.prompt_tokens, r.completion_tokens), "num"))));
  document.querySelector("#errors tbody").replaceChildren(...(errors.length ? errors.map((r) => el("tr", {},
    td(clock(r.time)), td(r.model || "–"), td(r.status, "num"), td(r.message || "", "wrap")))
    : [el("tr", {}, el("td", { colspan: "4", class: "none" }, "No errors."))]));
}

function chart(target, series, unit) {
  const w = 420, h = 140, pad = 44;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("width", w); svg.setAttribute("height", h); svg.setAttribute("role", "img");
  const n = Math.max(2, ...series.map((s) => s.points.length));
  const top = Math.max(1e-9, ...series.flatMap((s) => s.points));
  const line = (x1, y1, x2, y2, color) => {
    const l = document.createElementNS(SVG, "line");
    for (const [k, v] of Object.entries({ x1, y1, x2, y2, stroke: color })) l.setAttribute(k, v);
    svg.append(l);
  };
  const text = (x, y, s, anchor) => {
    const t = document.createElementNS(SVG, "text");
    t.setAttribute("x", x); t.setAttribute("y", y); t.setAttribute("text-anchor", anchor || "start");
    t.textContent = s; svg.append(t);
  };
  line(pad, h - pad, w - 8, h - pad, "#d1d5db");
  line(pad, 8, pad, h - pad, "#d1d5db");
  text(pad - 4, 14, unit === "gpuh" ? top.toFixed(3) : String(Math.round(top * 10) / 10), "end");
  text(pad - 4, h - pad, "0", "end");
  text(pad, h - 10, (n - 1) + " min ago");
  text(w - 8, h - 10, "now", "end");
  series.forEach((s) => {
    if (!s.points.length) return;
    const x = (i) => pad + (i + n - s.points.length) * (w - 8 - pad) / (n - 1);
    const y = (v) => h - pad - v / top * (h - pad - 12);
    const p = document.createElementNS(SVG, "polyline");
    p.setAttribute("fill", "none"); p.setAttribute("stroke", s.color); p.setAttribute("stroke-width", "2");
    p.setAttribute("points", s.points.map((v, i) => x(i).toFixed(1) + "," + y(v).toFixed(1)).join(" "));
    svg.append(p);
  });
  document.getElementById(target).replaceChildren(svg);
}

function drawCharts(models) {
  // Only the models used so far (a colour each, kept by catalog order); each
  // line starts from 0 at the gateway's start, so one minute is a line too.
  const color = (i) => COLORS[i % COLORS.length];
  const used = models.map((m, i) => ({ m, c: color(i) }))
    .filter(({ m }) => m.requests || m.gpu_hours_used || m.state !== "cold");
  chart("chart-rpm", used.map(({ m, c }) => ({ points: [0, ...m.per_minute], color: c })), "rpm");
  chart("chart-gpuh", used.map(({ m, c }) => ({ points: [0, ...m.gpu_hours_series], color: c })), "gpuh");
  document.getElementById("legend").replaceChildren(...(used.length ? used.map(({ m, c }) =>
    el("div", {}, el("span", { style: "background:" + c }), m.name))
    : [el("div", { class: "none" }, "No model used yet.")]));
}

function drawSummary(s) {
  const ready = s.models.filter((m) => m.state === "ready").length;
  const served = s.models.reduce((a, m) => a + m.served_requests, 0);
  document.getElementById("summary").textContent = s.models.length + " models, " + ready + " ready; " +
    served + " requests served; " + s.held + " held; GPU-hours used " + s.gpu_hours_used.toFixed(3) +
    ", saved by idle stops " + s.gpu_hours_saved.toFixed(3) + "; up " + duration(s.now - s.started);
}

async function poll() {
  const live = document.getElementById("live");
  try {
    const r = await fetch("/gateway/page/state", { credentials: "same-origin", cache: "no-store" });
    if (r.status === 401) {
      document.querySelector("main").replaceChildren(el("p", {}, "Signed out (the gateway restarted?):" +
        " open the link `alvis-fsm gateway` printed, or run `alvis-fsm gateway open`."));
      return; // no more polling
    }
    const s = await r.json();
    drawSummary(s); drawModels(s.models); drawBatches(s.batches); drawRecent(s.recent, s.errors);
    drawCharts(s.models);
    live.classList.remove("stale"); live.title = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    live.classList.add("stale"); live.title = "the gateway does not answer: " + e;
  }
  setTimeout(poll, POLL_MS);
}
poll();
