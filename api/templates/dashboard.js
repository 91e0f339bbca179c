// The monitoring page's live part: polls /dashboard/api/* and redraws. Every value goes into the page as a text
// node (el() / textContent), never through innerHTML, so job arguments, errors and results cannot become markup.
"use strict";

const POLL_MS = 2000;
const body = document.body;
const canTrigger = body.dataset.canTrigger === "yes";
const isAdmin = body.dataset.admin === "yes";
const state = { page: 1, filters: new URLSearchParams(), detail: null, detailStatus: null, tab: "operations" };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "class") node.className = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) node.append(child instanceof Node ? child : text(child));
  return node;
}

function text(value) {
  if (value === null || value === undefined) return "";
  return typeof value === "string" ? value : JSON.stringify(value);
}

function fill(tbody, rows, columns) {
  tbody.replaceChildren(...rows);
  if (!rows.length) tbody.append(el("tr", {}, el("td", { colspan: columns, class: "muted" }, "none")));
}

function time(iso, withDate) {
  if (!iso) return "";
  const d = new Date(iso);
  return withDate ? d.toLocaleString() : d.toLocaleTimeString();
}

function seconds(s) {
  if (s === null || s === undefined) return "";
  if (s < 60) return `${s.toFixed(1)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

function flash(message, isError) {
  const box = document.getElementById("flash");
  box.textContent = message;
  box.className = isError ? "flash error" : "flash";
  box.hidden = false;
}

async function api(path, options) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  const payload = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = typeof payload.detail === "string" ? payload.detail : JSON.stringify(payload.detail);
    throw new Error(`${response.status}: ${detail || response.statusText}`);
  }
  return payload;
}

async function act(path, init) {
  try {
    const done = await api(path, { method: "POST", ...init });
    flash(done.message + (done.task_id ? ` · job ${done.task_id}` : ""), false);
    await refresh();
    return done;
  } catch (error) {
    flash(error.message, true);
    return null;
  }
}

// ---- charts: plain SVG, one bar (or point) a minute ----------------------------------------------------------
const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  return node;
}

function barChart(points, value, failed, label) {
  const width = 180, height = 36, step = width / Math.max(points.length, 1);
  const top = Math.max(1, ...points.map((p) => value(p) || 0));
  const chart = svg("svg", { class: "chart", width, height, role: "img", "aria-label": label });
  points.forEach((p, i) => {
    const v = value(p) || 0, f = failed ? failed(p) : 0;
    const title = svg("title", {});
    title.textContent = `${time(p.minute)}: ${value(p) ?? "no sample"}` + (f ? ` (${f} failed)` : "");
    const h = (v / top) * height, hf = (f / top) * height;
    const bar = svg("rect", { x: i * step, y: height - h, width: Math.max(step - 0.5, 0.5), height: h });
    bar.append(title);
    chart.append(bar);
    if (f) chart.append(svg("rect", { class: "failed", x: i * step, y: height - hf, width: step - 0.5, height: hf }));
  });
  return chart;
}

// ---- operations panel -----------------------------------------------------------------------------------------
function queueRow(q) {
  const purge = isAdmin
    ? el("button", { class: "purge", "data-queue": q.name, onclick: () => purgeQueue(q.name) }, "purge")
    : "";
  return el(
    "tr", { "data-queue": q.name },
    el("td", {}, q.name), el("td", { class: "num waiting" }, q.queued), el("td", { class: "num" }, q.deferred),
    el("td", { class: "num" }, q.in_progress), el("td", { class: "num" }, q.workers),
    el("td", { class: "num" }, seconds(q.oldest_wait_s)),
    el("td", {}, barChart(q.minutes, (p) => p.depth, null, `${q.name} waiting jobs`)),
    el("td", {}, barChart(q.minutes, (p) => p.finished, (p) => p.failed, `${q.name} jobs finished`)),
    el("td", {}, barChart(q.minutes, (p) => p.p95_ms, null, `${q.name} p95 run time (ms)`)),
    el("td", {}, purge),
  );
}

function workerRow(w) {
  const i = w.info;
  const uptime = i && i.started_ms ? (Date.now() - i.started_ms) / 1000 : null;
  const rss = i && i.rss_bytes ? `${(i.rss_bytes / 1048576).toFixed(0)} MiB` : "";
  return el(
    "tr", { "data-worker": w.worker_id },
    el("td", {}, w.worker_id), el("td", { class: w.alive ? "complete" : "gone" }, w.alive ? "alive" : "gone"),
    el("td", {}, i ? i.queue : ""), el("td", {}, i ? i.host : ""), el("td", { class: "num" }, i ? i.pid : ""),
    el("td", { class: "num" }, i ? i.max_jobs : ""), el("td", { class: "num" }, i ? i.running.length : ""),
    el("td", { class: "num" }, rss), el("td", {}, seconds(uptime)), el("td", {}, time(w.last_seen, true)),
    el("td", { class: "num" }, i ? i.jobs_complete : ""), el("td", { class: "num" }, i ? i.jobs_failed : ""),
  );
}

function scheduleRow(s) {
  const last = s.last_job_id ? el("a", { class: "job-link", onclick: () => openJob(s.last_job_id) }, s.last_status) : "never";
  return el(
    "tr", { "data-task": s.task_name },
    el("td", {}, s.task_name), el("td", {}, s.queue), el("td", {}, s.schedule), el("td", {}, time(s.next_run, true)),
    el("td", { class: s.last_status || "" }, last), el("td", {}, time(s.last_finished, true)),
  );
}

function progressOrError(job) {
  if (job.progress) return `${Math.round(job.progress.fraction * 100)}% ${job.progress.message}`;
  return job.error || "";
}

function jobRow(row) {
  const j = row.status;
  const args = row.args.length || Object.keys(row.kwargs).length ? JSON.stringify(row.kwargs && Object.keys(row.kwargs).length ? row.kwargs : row.args) : "";
  return el(
    "tr", { "data-job-id": j.task_id },
    el("td", {}, el("a", { class: "job-link", onclick: () => openJob(j.task_id) }, j.task_id.slice(0, 12))),
    el("td", { class: "task" }, j.task_name), el("td", {}, j.queue), el("td", { class: `status ${j.status}` }, j.status),
    el("td", { class: "num" }, j.tries), el("td", {}, time(j.enqueued_at, true)), el("td", {}, time(j.finished_at)),
    el("td", { class: "wrap args" }, args), el("td", { class: "wrap error" }, progressOrError(j)),
  );
}

async function refreshOverview() {
  const o = await api("/dashboard/api/overview");
  fill(document.querySelector("#queues tbody"), o.queues.map(queueRow), 10);
  fill(document.querySelector("#workers tbody"), o.workers.map(workerRow), 12);
  fill(document.querySelector("#schedule tbody"), o.schedule.map(scheduleRow), 6);
}

async function refreshJobs() {
  const query = new URLSearchParams(state.filters);
  query.set("page", state.page);
  const page = await api(`/dashboard/api/jobs?${query}`);
  fill(document.querySelector("#jobs tbody"), page.jobs.map(jobRow), 9);
  document.getElementById("page-number").textContent = page.page;
  document.getElementById("page-prev").disabled = page.page <= 1;
  document.getElementById("page-next").disabled = !page.has_more;
}

// ---- job detail -----------------------------------------------------------------------------------------------
function field(name, value, pre) {
  return [el("dt", {}, name), el("dd", { "data-field": name }, pre ? el("pre", {}, value) : value)];
}

function detailFields(d) {
  const j = d.job;
  const rows = [
    field("task", j.task_name), field("queue", j.queue), field("status", j.status),
    field("tries", j.tries), field("priority", j.priority), field("worker", j.worker_id || ""),
    field("enqueued", time(j.enqueued_at, true)), field("started", time(j.started_at, true)),
    field("finished", time(j.finished_at, true)), field("duration", seconds(d.duration_s)),
    field("progress", j.progress ? progressOrError(j) : ""),
    field("arguments", JSON.stringify({ args: d.args, kwargs: d.kwargs }, null, 2), true),
    field("result", j.result === null || j.result === undefined ? "" : JSON.stringify(j.result, null, 2), true),
    field("error", j.error || "", true),
  ];
  if (j.traceback) rows.push(field("traceback", j.traceback, true));
  else if (d.traceback_hidden) rows.push(field("traceback", "hidden: tracebacks are shown to admin tokens only"));
  rows.push(field("every try", d.tries === null ? "unavailable: PostgreSQL cannot be reached" : triesTable(d.tries)));
  return rows.flat();
}

function triesTable(tries) {
  if (!tries.length) return el("span", { class: "muted" }, "none recorded yet");
  const head = el("tr", {}, ...["try", "outcome", "worker", "host", "started", "finished", "duration", "error"].map((h) => el("th", {}, h)));
  const rows = tries.map((t) => el("tr", { "data-outcome": t.outcome },
    el("td", {}, String(t.try_no)), el("td", {}, t.outcome), el("td", {}, t.worker_id || ""), el("td", {}, t.host || ""),
    el("td", {}, time(t.started_at, true)), el("td", {}, time(t.finished_at, true)),
    el("td", {}, t.duration_ms === null || t.duration_ms === undefined ? "" : seconds(t.duration_ms / 1000)),
    el("td", {}, t.error || "")));
  return el("table", { id: "detail-tries" }, el("thead", {}, head), el("tbody", {}, ...rows));
}

async function refreshDetail() {
  if (!state.detail) return;
  const d = await api(`/dashboard/api/jobs/${encodeURIComponent(state.detail)}`);
  if (state.detailStatus && state.detailStatus !== d.job.status) jobsDrawnAt = 0;  // the list shows it next poll
  state.detailStatus = d.job.status;
  document.getElementById("detail-id").textContent = d.job.task_id;
  document.getElementById("detail-fields").replaceChildren(...detailFields(d));
  const id = d.job.task_id;
  const buttons = [];
  if (d.can_abort) buttons.push(el("button", { id: "abort", onclick: () => act(`/dashboard/api/jobs/${encodeURIComponent(id)}/abort`) }, "abort"));
  if (d.can_retry) buttons.push(el("button", { id: "retry", onclick: () => act(`/dashboard/api/jobs/${encodeURIComponent(id)}/retry`) }, "retry"));
  document.getElementById("detail-actions").replaceChildren(...buttons);
  document.getElementById("detail").hidden = false;
}

function openJob(id) {
  state.detail = id;
  state.detailStatus = null;
  refreshDetail().catch((error) => flash(error.message, true));
}

function purgeQueue(queue) {
  if (!window.confirm(`Drop every waiting job of the ${queue} queue? Running jobs finish.`)) return;
  act(`/dashboard/api/queues/${encodeURIComponent(queue)}/purge`);
}

// ---- the trigger form, generated from the task's argument model (JSON schema) ---------------------------------
function variant(schema) {
  const options = schema.anyOf || [schema];
  const real = options.find((o) => o.type !== "null") || {};
  return { ...real, nullable: options.some((o) => o.type === "null") };
}

function inputFor(name, schema, required) {
  const v = variant(schema);
  const attrs = { name, "data-kind": v.type === "string" && v.format ? v.format : v.type, required: required || null };
  if (v.enum) {
    const choices = (required ? [] : [el("option", { value: "" }, "(default)")]).concat(v.enum.map((e) => el("option", { value: e }, e)));
    const select = el("select", attrs, ...choices);
    if (schema.default !== undefined && schema.default !== null) select.value = schema.default;
    return select;
  }
  if (v.type === "boolean") return el("input", { ...attrs, type: "checkbox", checked: schema.default === true });
  if (v.type === "integer" || v.type === "number") {
    return el("input", { ...attrs, type: "number", min: v.minimum, max: v.maximum, step: v.type === "integer" ? 1 : "any", placeholder: schema.default ?? "" });
  }
  const type = v.format === "date" ? "date" : v.format === "date-time" ? "datetime-local" : "text";
  return el("input", { ...attrs, type, placeholder: schema.default ?? (v.pattern || "") });
}

function readForm(fields) {
  const kwargs = {};
  for (const input of fields.querySelectorAll("[name]")) {
    const kind = input.dataset.kind;
    if (kind === "boolean") kwargs[input.name] = input.checked;
    else if (input.value === "") continue;
    else if (kind === "integer" || kind === "number") kwargs[input.name] = Number(input.value);
    else kwargs[input.name] = input.value;
  }
  return kwargs;
}

async function setUpTrigger() {
  const form = document.getElementById("trigger");
  if (!form || !canTrigger) return;
  const tasks = await api("/dashboard/api/tasks");
  const select = document.getElementById("trigger-task");
  select.replaceChildren(...tasks.map((t) => el("option", { value: t.name }, t.name)));
  const fields = document.getElementById("trigger-fields");
  const draw = () => {
    const task = tasks.find((t) => t.name === select.value);
    if (!task) return;
    const props = task.arguments.properties || {};
    const required = task.arguments.required || [];
    fields.replaceChildren(
      ...Object.entries(props).map(([name, schema]) => el("label", {}, schema.title || name, inputFor(name, schema, required.includes(name)))),
    );
    document.getElementById("trigger-description").textContent = `${task.description} (queue ${task.queue}, ${task.schedule}, needs ${task.scope})`;
  };
  select.addEventListener("change", draw);
  draw();
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const payload = { task_name: select.value, kwargs: readForm(fields) };
    act("/dashboard/api/jobs", { headers: { "Content-Type": "application/json" }, body: JSON.stringify(payload) });
  });
}

// ---- sales: what the analytics cache holds ----------------------------------------------------------------------
async function refreshSales() {
  const s = await api("/dashboard/api/sales");
  const o = s.overview.data;
  const figures = [
    ["revenue", o.revenue], ["orders", o.orders], ["paid orders", o.paid_orders],
    ["average order value", o.average_order_value ?? "-"], ["units", o.units], ["customers", o.distinct_customers],
    ["new customers", o.new_customers], ["cancelled", o.cancelled_orders], ["refunded", o.refunded_orders],
  ];
  document.querySelector("#sales-overview tbody").replaceChildren(
    ...figures.map(([name, value]) => el("tr", {}, el("th", {}, name), el("td", { class: "num" }, value))),
  );
  document.getElementById("sales-generated").textContent = `(cache computed ${time(s.overview.generated_at, true)})`;
  const buckets = s.hourly.data.buckets.map((b) => ({ minute: b.hour, revenue: Number(b.revenue) }));
  const chart = barChart(buckets, (b) => b.revenue, null, "revenue per hour");
  chart.setAttribute("width", 720);
  chart.setAttribute("height", 120);
  chart.setAttribute("viewBox", "0 0 180 36");
  chart.setAttribute("preserveAspectRatio", "none");
  document.getElementById("sales-hourly").replaceChildren(chart);
  fill(document.querySelector("#sales-top tbody"), s.top_products.data.products.map((p) => el(
    "tr", {}, el("td", {}, p.name), el("td", {}, p.sku), el("td", { class: "num" }, p.units),
    el("td", { class: "num" }, p.revenue), el("td", { class: "num" }, p.orders),
  )), 5);
  fill(document.querySelector("#sales-low tbody"), s.low_stock.data.products.map((p) => el(
    "tr", {}, el("td", {}, p.name), el("td", {}, p.sku), el("td", { class: "num" }, p.stock_quantity),
    el("td", { class: "num" }, p.reorder_point), el("td", { class: "num" }, p.shortfall),
  )), 5);
}

// ---- polling ----------------------------------------------------------------------------------------------------
// A text search reads the arguments of every job in its window (bench/monitoring.py): while one is active, the
// poll redraws the job list every SEARCH_POLL_MS only; a click (filter, page, action) redraws it at once.
const SEARCH_POLL_MS = 10000;
let jobsDrawnAt = 0;

function jobsDue(polled) {
  return !polled || !state.filters.get("q") || Date.now() - jobsDrawnAt >= SEARCH_POLL_MS;
}

async function refresh(polled) {
  const jobs = () => (jobsDue(polled) ? refreshJobs().then(() => { jobsDrawnAt = Date.now(); }) : null);
  const parts = state.tab === "sales" ? [refreshSales()] : [refreshOverview(), jobs(), refreshDetail()];
  const results = await Promise.allSettled(parts);
  const failed = results.find((r) => r.status === "rejected");
  if (failed) flash(failed.reason.message, true);
  document.getElementById("updated").textContent = new Date().toLocaleTimeString();
}

async function poll() {
  try {
    await refresh(true);
  } finally {
    window.setTimeout(poll, POLL_MS);
  }
}

function setUpFilters() {
  const form = document.getElementById("filters");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const filters = new URLSearchParams();
    for (const [name, value] of new FormData(form)) {
      if (!value) continue;
      // datetime-local has no zone: it is the browser's local time, sent as an instant
      filters.set(name, name === "since" || name === "until" ? new Date(value).toISOString() : value);
    }
    state.filters = filters;
    state.page = 1;
    refresh();
  });
  document.getElementById("page-prev").addEventListener("click", () => { state.page = Math.max(1, state.page - 1); refresh(); });
  document.getElementById("page-next").addEventListener("click", () => { state.page += 1; refresh(); });
  document.getElementById("detail-close").addEventListener("click", () => {
    state.detail = null;
    document.getElementById("detail").hidden = true;
  });
}

function setUpTabs() {
  for (const tab of document.querySelectorAll("nav [role=tab]")) {
    tab.addEventListener("click", () => {
      state.tab = tab.dataset.panel;
      for (const other of document.querySelectorAll("nav [role=tab]")) {
        other.setAttribute("aria-selected", String(other === tab));
        document.getElementById(other.dataset.panel).hidden = other !== tab;
      }
      refresh();
    });
  }
}

setUpTabs();
setUpFilters();
setUpTrigger().catch((error) => flash(error.message, true));
poll();
