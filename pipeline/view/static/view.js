// annotate view: the grid, the filters, the pager, the detail pane and the summary.
// Everything comes from this server (/api/..., /thumb/..., /image/...); values are set as text, never as HTML.
"use strict";

const PAGE = 48;
const form = document.getElementById("filters");
const grid = document.getElementById("grid");
const state = { offset: 0, total: 0, rowsInSummary: null, labels: [] };

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function money(value) { return value == null ? "–" : "$" + Number(value).toFixed(value < 0.01 ? 6 : 4); }
function count(value) { return Number(value || 0).toLocaleString("en-US"); }

function filters() {
  const params = new URLSearchParams();
  for (const [key, value] of new FormData(form)) if (value) params.set(key, value);
  return params;
}

function fromHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  for (const field of form.elements) if (field.name) field.value = params.get(field.name) || "";
  state.offset = Number(params.get("offset") || 0);
}

function toHash() {
  const params = filters();
  if (state.offset) params.set("offset", state.offset);
  history.replaceState(null, "", "#" + params.toString());
}

async function getJson(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(url + ": " + response.status);
  return response.json();
}

function fill(select, values) {
  const chosen = select.value;
  select.replaceChildren(el("option", { value: "" }, "any"));
  for (const { value, rows } of values) select.append(el("option", { value: String(value) }, `${value} (${count(rows)})`));
  if (chosen && ![...select.options].some((o) => o.value === chosen)) select.append(el("option", { value: chosen }, chosen));
  select.value = chosen;
}

function showSummary(data) {
  const report = data.report;
  const line = document.getElementById("summary-line");
  const facts = document.getElementById("summary-facts");
  facts.replaceChildren();
  if (!report) { line.textContent = `${data.dir}: no rows yet`; return; }
  const status = Object.entries(report.by_status).map(([s, n]) => `${count(n)} ${s}`).join(", ");
  line.textContent = `${data.dir}: ${count(report.rows)} rows (${status}), ${count(report.images)} images`;
  const lat = report.latency_ms;
  const add = (name, value) => { const span = el("span", {}, name + " "); span.append(el("b", {}, value)); facts.append(span); };
  add("cost", money(report.cost_usd));
  if (report.cost_per_1000_images_usd != null) add("per 1,000 images", money(report.cost_per_1000_images_usd));
  add("tokens", count(report.tokens.total));
  if (lat.p50 != null) add("latency p50/p95/p99", `${lat.p50.toFixed(0)} / ${lat.p95.toFixed(0)} / ${lat.p99.toFixed(0)} ms`);
  const flags = Object.entries(report.flags);
  if (flags.length) add("flagged", flags.map(([f, n]) => `${count(n)} ${f}`).join(", "));
  for (const [field, values] of Object.entries(report.labels)) {
    add(field, values.slice(0, 6).map((v) => `${v.value} ${count(v.rows)}`).join(", "));
  }
  for (const select of form.querySelectorAll("select[data-facet]")) fill(select, data.facets[select.dataset.facet] || []);
  state.labels = data.labels || [];
  if (state.rowsInSummary !== null && state.rowsInSummary !== report.rows) loadRows();  // a run wrote more
  state.rowsInSummary = report.rows;
}

function labelValue(row, path) {
  let value = row;
  for (const part of path.split(".")) value = value == null ? null : value[part];
  return value;
}

function card(row) {
  const node = el("article", { class: "card", tabindex: "0", "data-id": row.id });
  const thumb = el("div", { class: "thumb" });
  const img = el("img", { src: "/thumb/" + encodeURIComponent(row.id), alt: "image of row " + row.id, loading: "lazy" });
  img.addEventListener("error", () => thumb.replaceChildren(el("span", { class: "missing" }, "image unavailable")));
  thumb.append(img);
  node.append(thumb);
  const text = row.status === "ok" ? row.answer : row.error;
  node.append(el("div", { class: "answer" + (text ? "" : " empty") }, text || "(empty answer)"));
  const chips = el("div", { class: "chips" });
  if (row.status !== "ok") chips.append(el("span", { class: "chip error" }, (row.error || "error").split(":")[0]));
  for (const flag of row.flags || []) chips.append(el("span", { class: "chip flag" }, flag));
  for (const path of state.labels) {
    const value = labelValue(row, path);
    if (value != null) chips.append(el("span", { class: "chip label" }, `${path}: ${value}`));
  }
  if (chips.childElementCount) node.append(chips);
  const latency = row.latency_ms == null ? "" : ` · ${Math.round(row.latency_ms)} ms`;
  node.append(el("div", { class: "meta" }, `${money(row.cost_usd)} · ${count(row.total_tokens)} tokens${latency}`));
  node.addEventListener("click", () => openDetail(row.id));
  node.addEventListener("keydown", (event) => { if (event.key === "Enter") openDetail(row.id); });
  return node;
}

let loading = 0;
async function loadRows() {
  const ticket = ++loading;
  const params = filters();
  params.set("offset", state.offset);
  params.set("limit", PAGE);
  grid.setAttribute("aria-busy", "true");
  const page = await getJson("/api/rows?" + params.toString());
  if (ticket !== loading) return;  // a newer filter came meanwhile
  state.total = page.total;
  grid.replaceChildren(...page.rows.map(card));
  const first = page.total ? state.offset + 1 : 0;
  document.getElementById("range").textContent =
    `${count(first)}–${count(state.offset + page.rows.length)} of ${count(page.total)} rows`;
  grid.setAttribute("aria-busy", "false");
  toHash();
}

async function openDetail(id) {
  const row = await getJson("/api/row/" + encodeURIComponent(id));
  const pane = document.getElementById("detail");
  const image = document.getElementById("detail-image");
  const problem = document.getElementById("detail-image-problem");
  problem.hidden = true;
  image.hidden = false;
  image.onerror = async () => {
    image.hidden = true;
    problem.hidden = false;
    const response = await fetch(image.src);
    problem.textContent = "image unavailable: " + (await response.text());
  };
  image.src = "/image/" + encodeURIComponent(id);
  document.getElementById("detail-full").href = image.src;  // at full size in a tab of its own
  document.getElementById("detail-answer").textContent = row.status === "ok" ? row.answer : row.error;
  const body = document.querySelector("#detail-row tbody");
  body.replaceChildren();
  for (const [key, value] of Object.entries(row)) {
    const tr = el("tr");
    tr.append(el("th", {}, key));
    tr.append(el("td", {}, value !== null && typeof value === "object" ? JSON.stringify(value) : String(value)));
    body.append(tr);
  }
  pane.hidden = false;
  pane.dataset.id = id;
}

document.getElementById("close").addEventListener("click", () => { document.getElementById("detail").hidden = true; });
document.addEventListener("keydown", (event) => { if (event.key === "Escape") document.getElementById("detail").hidden = true; });

document.getElementById("pager").addEventListener("click", (event) => {
  const go = event.target.dataset && event.target.dataset.go;
  if (!go) return;
  const last = Math.max(0, Math.floor((state.total - 1) / PAGE) * PAGE);
  state.offset = { first: 0, prev: Math.max(0, state.offset - PAGE), next: Math.min(last, state.offset + PAGE), last }[go];
  loadRows();
});

let typing;
form.addEventListener("input", (event) => {
  state.offset = 0;
  clearTimeout(typing);
  typing = setTimeout(loadRows, event.target.name === "text" ? 250 : 0);
});
form.addEventListener("submit", (event) => event.preventDefault());

async function refreshSummary() {
  try { showSummary(await getJson("/api/summary")); } catch (error) { /* the next refresh tries again */ }
}

fromHash();
refreshSummary().then(loadRows);
setInterval(refreshSummary, 10000);
