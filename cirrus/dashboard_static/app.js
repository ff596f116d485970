// cirrus grid-search dashboard: polls /api/state and draws with plain SVG (no libraries).
"use strict";

const POLL_MS = 500;
const SVG_NS = "http://www.w3.org/2000/svg";
const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
                 "#17becf", "#bcbd22", "#7f7f7f"];
const KILLABLE = new Set(["queued", "running"]);

let latest = null;          // the last /api/state answer
let headerFor = null;       // the hyper_vars the table header was built for
const rowsByIndex = new Map();
const curvesByIndex = new Map();

function color(i) {
  return i < PALETTE.length ? PALETTE[i] : `hsl(${(i * 137.508) % 360}, 65%, 45%)`;
}

function fmt(v, digits = 4) {
  if (v === null || v === undefined) return "–";
  if (typeof v !== "number") return String(v);
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e5 || a < 1e-3) return v.toExponential(2);
  return Number(v.toPrecision(digits)).toString();
}

function fmtCost(v) {
  if (v === null || v === undefined) return "–";
  return "$" + (Math.abs(v) < 0.01 && v !== 0 ? v.toExponential(2) : v.toFixed(4));
}

function el(tag, attrs = {}, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function svgEl(tag, attrs = {}, text) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

// "Nice" axis ticks (steps of 1, 2 or 5 x 10^k) covering [lo, hi].
function ticks(lo, hi, count) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / Math.max(1, count);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map(m => m * mag).find(s => s >= raw) || 10 * mag;
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(Number(t.toPrecision(12)));
  return out;
}

// A plot frame: the chart's layers and the scales from data to pixels.
function frame(svg, xmax, ylo, yhi, xlabel, ylabel, yfmt) {
  const vb = svg.viewBox.baseVal;
  const W = vb.width, H = vb.height, m = {l: 64, r: 16, t: 12, b: 36};
  if (!(yhi > ylo)) { const d = Math.abs(ylo) * 0.1 || 1; ylo -= d; yhi += d; }
  const pad = (yhi - ylo) * 0.05; ylo -= pad; yhi += pad;
  if (!(xmax > 0)) xmax = 1;
  const sx = x => m.l + (x / xmax) * (W - m.l - m.r);
  const sy = y => H - m.b - ((y - ylo) / (yhi - ylo)) * (H - m.t - m.b);
  let axes = svg.querySelector("g.axes");
  if (!axes) { axes = svgEl("g", {class: "axes"}); svg.appendChild(axes); }
  let plot = svg.querySelector("g.plot");
  if (!plot) { plot = svgEl("g", {class: "plot"}); svg.appendChild(plot); }
  axes.replaceChildren();
  for (const t of ticks(ylo, yhi, 5)) {
    axes.appendChild(svgEl("line", {class: "grid", x1: m.l, x2: W - m.r, y1: sy(t), y2: sy(t)}));
    axes.appendChild(svgEl("text", {x: m.l - 6, y: sy(t) + 4, "text-anchor": "end"}, yfmt(t)));
  }
  for (const t of ticks(0, xmax, 8)) {
    axes.appendChild(svgEl("text", {x: sx(t), y: H - m.b + 16, "text-anchor": "middle"}, fmt(t)));
  }
  axes.appendChild(svgEl("line", {class: "axis", x1: m.l, x2: m.l, y1: m.t, y2: H - m.b}));
  axes.appendChild(svgEl("line", {class: "axis", x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b}));
  axes.appendChild(svgEl("text", {x: (m.l + W - m.r) / 2, y: H - 4, "text-anchor": "middle"}, xlabel));
  axes.appendChild(svgEl("text", {x: 12, y: (m.t + H - m.b) / 2, "text-anchor": "middle",
                                  transform: `rotate(-90 12 ${(m.t + H - m.b) / 2})`}, ylabel));
  return {sx, sy, plot};
}

function pathData(points, sx, sy) {
  let d = "", pen = false, run = 0;
  for (const [x, y] of points) {
    if (x === null || y === null) {                            // a gap at a non-finite value
      if (run === 1) d += "h0.01";                             // a lone point still shows as a dot
      pen = false; run = 0; continue;
    }
    d += (pen ? "L" : "M") + sx(x).toFixed(1) + "," + sy(y).toFixed(1);
    pen = true; run += 1;
  }
  if (run === 1) d += "h0.01";
  return d;
}

// The experiments the selector shows: all, or the best / worst k by their latest loss.
function selected(exps) {
  const mode = document.getElementById("filter").value;
  if (mode === "all") return new Set(exps.map(e => e.index));
  const k = Math.max(1, parseInt(document.getElementById("k").value, 10) || 1);
  const ranked = exps.filter(e => e.loss !== null).sort((a, b) => a.loss - b.loss);
  const pick = mode === "best" ? ranked.slice(0, k) : ranked.slice(-k);
  return new Set(pick.map(e => e.index));
}

function label(e) {
  return `#${e.index} ` + Object.entries(e.hyper).map(([k, v]) => `${k}=${v}`).join(" ");
}

function drawLoss(exps, shown) {
  const svg = document.getElementById("loss-chart");
  let xmax = 0, ylo = Infinity, yhi = -Infinity;
  for (const e of exps) {
    if (!shown.has(e.index)) continue;
    for (const [t, y] of e.points) {
      if (t !== null && t > xmax) xmax = t;
      if (y !== null) { ylo = Math.min(ylo, y); yhi = Math.max(yhi, y); }
    }
  }
  if (!isFinite(ylo)) { ylo = 0; yhi = 1; }
  const {sx, sy, plot} = frame(svg, xmax, ylo, yhi, "seconds since the experiment started",
                               "held-out loss", v => fmt(v, 3));
  const legend = document.getElementById("legend");
  legend.replaceChildren();
  for (const e of exps) {
    let path = curvesByIndex.get(e.index);
    const visible = shown.has(e.index) && e.n_points > 0;
    if (!visible) {
      if (path) { path.remove(); curvesByIndex.delete(e.index); }
      continue;
    }
    if (!path) {
      path = svgEl("path", {class: "curve", "data-exp": e.index, stroke: color(e.index)});
      path.appendChild(svgEl("title", {}, label(e)));
      plot.appendChild(path);
      curvesByIndex.set(e.index, path);
    }
    path.setAttribute("d", pathData(e.points, sx, sy));
    path.setAttribute("data-points", e.n_points);
    path.setAttribute("data-state", e.state);
    path.classList.toggle("ended", !KILLABLE.has(e.state));
    const item = el("span", {"data-legend": e.index});
    const sw = el("span", {class: "swatch"});
    sw.style.background = color(e.index);
    item.appendChild(sw);
    item.appendChild(document.createTextNode(`${label(e)} (${e.state})`));
    legend.appendChild(item);
  }
}

function drawCost(totals) {
  const svg = document.getElementById("cost-chart");
  const series = totals.cost_series.filter(([t, c]) => t !== null && c !== null);
  const xmax = series.length ? series[series.length - 1][0] : 1;
  const yhi = series.reduce((a, [, c]) => Math.max(a, c), 0);
  const {sx, sy, plot} = frame(svg, xmax, 0, yhi > 0 ? yhi : 1e-6, "seconds since the dashboard started",
                               "cost ($)", v => fmt(v, 2));
  plot.replaceChildren();
  if (series.length) {
    const d = pathData(series, sx, sy);
    const area = d + `L${sx(xmax).toFixed(1)},${sy(0).toFixed(1)}L${sx(series[0][0]).toFixed(1)},${sy(0).toFixed(1)}Z`;
    plot.appendChild(svgEl("path", {class: "cost-area", d: area}));
    plot.appendChild(svgEl("path", {class: "cost-line", d, "data-points": series.length, id: "cost-line"}));
  }
  document.getElementById("total-cost").textContent = fmtCost(totals.cost);
  document.getElementById("total-savings").textContent = fmtCost(totals.savings);
}

function buildHeader(hyperVars) {
  const head = document.getElementById("head-row");
  head.replaceChildren();
  for (const h of ["#", "", ...hyperVars, "state", "loss", "evals", "updates/s", "cost", "saved", "reason", ""]) {
    head.appendChild(el("th", {}, h));
  }
  document.getElementById("rows").replaceChildren();
  rowsByIndex.clear();
  headerFor = JSON.stringify(hyperVars);
}

function cell(row, cls, text) {
  const td = el("td", cls ? {class: cls} : {}, text);
  row.appendChild(td);
  return td;
}

function updateTable(state, shown) {
  if (headerFor !== JSON.stringify(state.hyper_vars)) buildHeader(state.hyper_vars);
  const body = document.getElementById("rows");
  for (const e of state.experiments) {
    let r = rowsByIndex.get(e.index);
    if (!r) {
      const tr = el("tr", {"data-exp-row": e.index});
      cell(tr, "num", String(e.index));
      const sw = el("span", {class: "swatch"});
      sw.style.cssText = `display:inline-block;width:14px;height:4px;background:${color(e.index)}`;
      cell(tr, "").appendChild(sw);
      for (const h of state.hyper_vars) cell(tr, "", String(e.hyper[h]));
      r = {tr, state: cell(tr, ""), loss: cell(tr, "num"), evals: cell(tr, "num"), ups: cell(tr, "num"),
           cost: cell(tr, "num"), saved: cell(tr, "num"), reason: cell(tr, "reason"), action: cell(tr, ""),
           shownState: null};
      body.appendChild(tr);
      rowsByIndex.set(e.index, r);
    }
    r.tr.setAttribute("data-state", e.state);
    r.tr.classList.toggle("hidden-row", !shown.has(e.index) && document.getElementById("filter").value !== "all");
    r.loss.textContent = fmt(e.loss);
    r.evals.textContent = String(e.n_points);
    r.ups.textContent = fmt(e.updates_per_s, 3);
    r.cost.textContent = fmtCost(e.cost);
    r.saved.textContent = e.saved ? fmtCost(e.saved) : "";
    r.reason.textContent = e.reason || "";
    if (r.shownState !== e.state) {          // rebuild the state badge and button only on a change
      r.shownState = e.state;
      r.state.replaceChildren(el("span", {class: `state state-${e.state}`}, e.state));
      r.action.replaceChildren();
      if (KILLABLE.has(e.state)) {
        const b = el("button", {type: "button", class: "danger", "data-kill": e.index,
                                title: `kill experiment ${e.index}`}, "Kill");
        b.addEventListener("click", () => kill(e.index, b));
        r.action.appendChild(b);
      }
    }
  }
}

function message(text) {
  document.getElementById("message").textContent = text;
}

async function post(url) {
  const res = await fetch(url, {method: "POST"});
  let body = {};
  try { body = await res.json(); } catch (_) { /* not JSON */ }
  return {ok: res.ok, status: res.status, body};
}

async function kill(i, button) {
  if (button) button.disabled = true;
  try {
    const r = await post(`/api/kill/${i}`);
    message(r.ok ? `experiment ${i} killed` : `could not kill experiment ${i}: ${r.body.error || r.status}`);
  } catch (err) {
    message(`could not kill experiment ${i}: ${err}`);
    if (button) button.disabled = false;
  }
  poll(true);
}

function render(state) {
  latest = state;
  const shown = selected(state.experiments);
  drawLoss(state.experiments, shown);
  updateTable(state, shown);
  drawCost(state.totals);
  const c = state.totals.counts;
  const st = document.getElementById("status");
  st.textContent = Object.entries(c).map(([k, v]) => `${v} ${k}`).join(" · ") +
                   ` — ${fmt(state.totals.elapsed, 3)} s`;
  st.setAttribute("data-connected", "1");
}

let timer = null, inFlight = false;
async function poll(now) {
  if (now) { clearTimeout(timer); }
  if (inFlight) return;
  inFlight = true;
  try {
    const res = await fetch("/api/state", {cache: "no-store"});
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    render(await res.json());
  } catch (err) {
    const st = document.getElementById("status");
    st.textContent = `disconnected (${err.message || err}); retrying…`;
    st.setAttribute("data-connected", "0");
  } finally {
    inFlight = false;
    clearTimeout(timer);
    timer = setTimeout(() => poll(false), POLL_MS);
  }
}

document.getElementById("filter").addEventListener("change", () => latest && render(latest));
document.getElementById("k").addEventListener("input", () => latest && render(latest));
document.getElementById("kill-all").addEventListener("click", async () => {
  try {
    const r = await post("/api/kill_all");
    message(r.ok ? `killed ${r.body.killed.length} experiment(s)` : `kill all failed: ${r.status}`);
  } catch (err) { message(`kill all failed: ${err}`); }
  poll(true);
});
poll(true);
