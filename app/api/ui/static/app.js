// jobledger dashboard: a read-only view of the ledger, from its /v1 API only.
//
// One ES module, no framework and no build step. Hash routes keep it one page:
//   #/jobs[?status=&cursor=]   the job list, its filter and paging, and the chart
//   #/jobs/<job_id>            one job: progress, result, event timeline, live updates
//   #/miners                   miners with their GPUs and load (auditors and admins)
// Every value from the API reaches the page through textContent or an attribute,
// never as HTML. The key lives in sessionStorage (this tab only) until "Forget key".

const KEY_STORAGE = "jobledger.apiKey";
const STATUSES = [
  "pending", "assigned", "running", "canceling",
  "completed", "failed", "canceled", "timed_out",
];
const TERMINAL = new Set(["completed", "failed", "canceled", "timed_out"]);
// Bottom to top in the chart's stacks: finished work first, then work in flight.
const CHART_ORDER = [
  "completed", "failed", "timed_out", "canceled",
  "canceling", "running", "assigned", "pending",
];
const PAGE_SIZE = 20;
const POLL_MS = 2000;
const REFRESH_MS = 10000;
const SVG_NS = "http://www.w3.org/2000/svg";

// ---------------------------------------------------------------- DOM helpers

/** An element with attributes, properties and children; strings become text nodes. */
function h(tag, attrs = {}, ...children) {
  return build(document.createElement(tag), attrs, children);
}

/** The same for SVG elements. */
function s(tag, attrs = {}, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

function build(element, attrs, children) {
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "text") element.textContent = String(value);
    else if (name === "class") element.setAttribute("class", value);
    else if (name === "dataset") Object.assign(element.dataset, value);
    else if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (name in element && !(element instanceof SVGElement)) element[name] = value;
    else element.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

function pill(status) {
  return h("span", { class: `pill status-${status}`, text: label(status), dataset: { status } });
}

function label(status) {
  return String(status).replace(/_/g, " ");
}

function jobLink(jobId) {
  return h("a", { class: "id", href: `#/jobs/${encodeURIComponent(jobId)}`, text: jobId });
}

function progressBar(value, status, large = false) {
  const percent = Math.max(0, Math.min(100, Number(value) || 0));
  return h(
    "div",
    { class: large ? "progress progress-large" : "progress" },
    h("progress", { class: `status-${status}`, max: 100, value: percent }),
    h("span", { class: "progress-value", text: `${percent}%` }),
  );
}

function errorBox(error) {
  return h("p", { class: "error", role: "alert", text: describe(error) });
}

// ---------------------------------------------------------------- formatting

const DATE_TIME = new Intl.DateTimeFormat(undefined, {
  year: "numeric", month: "short", day: "2-digit",
  hour: "2-digit", minute: "2-digit", second: "2-digit",
});

const SHORT_DATE_TIME = new Intl.DateTimeFormat(undefined, {
  month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit",
});

/** A time for people (their locale and zone); the exact UTC instant in the tooltip. */
function time(value, format = DATE_TIME) {
  if (!value) return h("span", { class: "muted", text: "—" });
  const moment = new Date(value);
  return h("time", { datetime: value, title: value, text: format.format(moment) });
}

function ago(value) {
  if (!value) return "never";
  const seconds = Math.max(0, Math.round((Date.now() - new Date(value).getTime()) / 1000));
  if (seconds < 60) return `${seconds} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return `${Math.floor(seconds / 86400)} d ago`;
}

function money(value) {
  return value === null || value === undefined ? "—" : String(value);
}

function bytes(count) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = Number(count);
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
}

// ---------------------------------------------------------------- the API

class ApiError extends Error {
  constructor(status, message, retryAfter = null) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

function storedKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

function headers(key, extra = {}) {
  return { "X-Api-Key": key, Accept: "application/json", ...extra };
}

/** The error an answer carries, in the API's own words ({"error": {"message"}}). */
async function apiError(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch {
    // Not JSON (a proxy's page): the status line says enough.
  }
  return new ApiError(response.status, message, response.headers.get("Retry-After"));
}

/** A request with the stored key; a refused key sends the user back to the key form. */
async function request(path, { signal, key = storedKey(), extraHeaders = {} } = {}) {
  let response;
  try {
    response = await fetch(path, { headers: headers(key, extraHeaders), signal, cache: "no-store" });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "cannot reach the ledger's API");
  }
  if (!response.ok) {
    const error = await apiError(response);
    if (error.status === 401 && key === storedKey()) keyRefused(error);
    throw error;
  }
  return response;
}

async function getJson(path, options) {
  return (await request(path, options)).json();
}

function describe(error) {
  if (!(error instanceof ApiError)) return `Something went wrong: ${error.message || error}`;
  if (error.status === 0) return "Cannot reach the ledger's API. Is it running?";
  if (error.status === 429) {
    const wait = error.retryAfter ? ` Retry in ${error.retryAfter} s.` : "";
    return `Rate limited: this key made too many requests.${wait}`;
  }
  return `${error.message} (HTTP ${error.status})`;
}

// ---------------------------------------------------------------- the key

const ui = {};

function keyHint(key) {
  const match = /^(jl_[A-Za-z0-9]+)_/.exec(key);
  return match ? `${match[1]}_…` : `${key.slice(0, 6)}…`;
}

function showSession() {
  const key = storedKey();
  ui.session.hidden = !key;
  ui.keyHint.textContent = key ? keyHint(key) : "";
}

function showLogin(message = "") {
  stopView();
  ui.view.replaceChildren();
  ui.login.hidden = false;
  ui.loginError.textContent = message;
  ui.loginError.hidden = !message;
  showSession();
  ui.keyInput.focus();
}

function keyRefused(error) {
  sessionStorage.removeItem(KEY_STORAGE);
  showLogin(`The key was refused: ${error.message}. Type a valid key.`);
}

async function signIn(event) {
  event.preventDefault();
  const key = ui.keyInput.value.trim();
  if (!/^[\x21-\x7e]+$/.test(key)) {
    showLogin("An API key is printable ASCII without spaces, like jl_…");
    return;
  }
  ui.loginButton.disabled = true;
  try {
    await request("/v1/jobs?limit=1", { key });
  } catch (error) {
    if (error.status === 401) showLogin(`This key was refused: ${error.message}.`);
    else if (error.status === 403) {
      showLogin("A miner key cannot read the dashboard: use a client, auditor or admin key.");
    } else showLogin(describe(error));
    return;
  } finally {
    ui.loginButton.disabled = false;
  }
  sessionStorage.setItem(KEY_STORAGE, key);
  ui.keyInput.value = "";
  ui.login.hidden = true;
  route();
}

function forgetKey() {
  sessionStorage.removeItem(KEY_STORAGE);
  showLogin();
}

// ---------------------------------------------------------------- routing

// What the current view started (requests, timers), stopped when the view changes.
let current = { controller: new AbortController(), timers: [] };

function stopView() {
  current.controller.abort();
  for (const timer of current.timers) clearTimeout(timer);
  current = { controller: new AbortController(), timers: [] };
}

function later(ms, task) {
  current.timers.push(setTimeout(task, ms));
}

function parseHash() {
  const [path, query = ""] = (location.hash || "#/jobs").slice(1).split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  return { parts, params: new URLSearchParams(query) };
}

function route() {
  stopView();
  if (!storedKey()) {
    showLogin();
    return;
  }
  ui.login.hidden = true;
  showSession();
  const { parts, params } = parseHash();
  const section = parts[0] || "jobs";
  for (const link of document.querySelectorAll("[data-nav]")) {
    if (link.dataset.nav === section) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const { signal } = current.controller;
  if (section === "jobs" && parts.length === 1) jobsView(params, signal);
  else if (section === "jobs" && parts.length === 2) jobView(parts[1], signal);
  else if (section === "miners" && parts.length === 1) minersView(signal);
  else {
    ui.view.replaceChildren(
      h("section", { class: "page" },
        h("h1", { text: "Not found" }),
        h("p", {}, "No page here. ", h("a", { href: "#/jobs", text: "Go to the jobs" }), ".")),
    );
  }
}

function ignoreAbort(error) {
  if (error && error.name === "AbortError") return true;
  return false;
}

// ---------------------------------------------------------------- jobs list

// For "Newer": the cursor of the page before each page reached with "Older", per filter.
const pageTrail = { status: "", previous: new Map() };
let chartBucket = "hour";

function jobsHash(status, cursor) {
  const params = new URLSearchParams();
  if (status) params.set("status", status);
  if (cursor) params.set("cursor", cursor);
  const query = params.toString();
  return query ? `#/jobs?${query}` : "#/jobs";
}

function jobsView(params, signal) {
  const status = STATUSES.includes(params.get("status")) ? params.get("status") : "";
  const cursor = params.get("cursor") || "";
  if (pageTrail.status !== status) Object.assign(pageTrail, { status, previous: new Map() });

  const filter = h(
    "select",
    {
      id: "status-filter",
      "aria-label": "status",
      onchange: (event) => { location.hash = jobsHash(event.target.value, ""); },
    },
    h("option", { value: "", text: "All statuses" }),
    STATUSES.map((name) => h("option", { value: name, text: label(name), selected: name === status })),
  );
  const total = h("span", { class: "muted", id: "jobs-total" });
  const tableArea = h("div", { id: "jobs-table" }, h("div", { class: "empty", text: "Loading…" }));
  const chartArea = h("div", { id: "chart-area" });
  const refresh = () => {
    loadJobs(status, cursor, { total, tableArea }, signal);
    loadChart(chartArea, signal);
  };

  ui.view.replaceChildren(
    h("section", { class: "page", id: "jobs-page" },
      h("div", { class: "page-head" },
        h("h1", { text: "Jobs" }), total,
        h("div", { class: "spacer" }),
        filter,
        h("button", { type: "button", class: "button", text: "Refresh", onclick: refresh })),
      h("div", { class: "card" },
        h("div", { class: "card-head" },
          h("h2", { text: "Jobs submitted" }),
          h("span", { class: "muted", text: "by status now, per UTC hour or day" }),
          h("div", { class: "spacer" }),
          bucketSwitch(() => loadChart(chartArea, signal))),
        chartArea),
      h("div", { class: "card" }, tableArea)),
  );
  refresh();
  const autoRefresh = () => {
    if (!document.hidden) {
      loadJobs(status, cursor, { total, tableArea }, signal);
      loadChart(chartArea, signal);
    }
    later(REFRESH_MS, autoRefresh);
  };
  later(REFRESH_MS, autoRefresh);
}

function bucketSwitch(onChange) {
  const choices = [["hour", "Last 24 hours"], ["day", "Last 30 days"]];
  const buttons = choices.map(([bucket, text]) => h("button", {
    type: "button",
    text,
    dataset: { bucket },
    "aria-pressed": String(bucket === chartBucket),
    onclick: () => {
      chartBucket = bucket;
      for (const button of buttons) {
        button.setAttribute("aria-pressed", String(button.dataset.bucket === bucket));
      }
      onChange();
    },
  }));
  return h("div", { class: "segmented", role: "group", "aria-label": "chart window" }, buttons);
}

async function loadJobs(status, cursor, { total, tableArea }, signal) {
  const query = new URLSearchParams({ limit: String(PAGE_SIZE) });
  if (status) query.set("status", status);
  if (cursor) query.set("cursor", cursor);
  let page;
  try {
    page = await getJson(`/v1/jobs?${query}`, { signal });
  } catch (error) {
    if (!ignoreAbort(error)) tableArea.replaceChildren(errorBox(error));
    return;
  }
  const fingerprint = JSON.stringify(page);
  if (tableArea.dataset.fingerprint === fingerprint) return; // unchanged: leave the DOM be
  tableArea.dataset.fingerprint = fingerprint;
  total.textContent = `${page.total} ${page.total === 1 ? "job" : "jobs"}${status ? ` ${label(status)}` : ""}`;
  if (page.jobs.length === 0) {
    tableArea.replaceChildren(h("div", { class: "empty", text: status
      ? `No ${label(status)} jobs.` : "No jobs yet. Submitted jobs show here." }));
    return;
  }
  const rows = page.jobs.map((job) => h("tr", { dataset: { jobId: job.job_id, status: job.status } },
    h("td", { dataset: { label: "Job" } }, jobLink(job.job_id)),
    h("td", { dataset: { label: "Status" } }, pill(job.status)),
    h("td", { dataset: { label: "Progress" } }, progressBar(job.progress, job.status)),
    h("td", { dataset: { label: "Model" }, text: job.model }),
    h("td", { dataset: { label: "Priority" }, text: job.priority }),
    h("td", { dataset: { label: "Miner" } }, job.miner_id
      ? h("span", { class: "id truncate", title: job.miner_id, text: job.miner_id })
      : h("span", { class: "muted", text: "—" })),
    h("td", { dataset: { label: "Created" }, class: "nowrap" }, time(job.created_at, SHORT_DATE_TIME)),
    h("td", { dataset: { label: "Cost" }, class: "num" }, costCell(job)),
  ));
  const older = h("button", {
    type: "button", class: "button", id: "older", text: "Older →", disabled: !page.has_more,
    onclick: () => {
      pageTrail.previous.set(page.next_cursor, cursor);
      location.hash = jobsHash(status, page.next_cursor);
    },
  });
  const newer = h("button", {
    type: "button", class: "button", id: "newer", text: "← Newer", disabled: !cursor,
    onclick: () => { location.hash = jobsHash(status, pageTrail.previous.get(cursor) || ""); },
  });
  const pageNumber = pageOf(cursor);
  tableArea.replaceChildren(
    h("div", { class: "table-wrap" },
      h("table", { class: "responsive", id: "jobs-list" },
        h("thead", {}, h("tr", {},
          ["Job", "Status", "Progress", "Model", "Priority", "Miner", "Created"].map((name) => h("th", { text: name })),
          h("th", { class: "num", text: "Cost" }))),
        h("tbody", {}, rows))),
    h("div", { class: "pager" },
      newer, older, h("span", { class: "spacer" }),
      h("span", { class: "muted", text: pageNumber ? `Page ${pageNumber}` : "" })),
  );
}

/** What the job was charged; while it runs, `≈` its estimate; nothing if it ended unpaid. */
function costCell(job) {
  if (job.cost !== null && job.cost !== undefined) return money(job.cost);
  if (TERMINAL.has(job.status)) return h("span", { class: "muted", title: "not charged", text: "—" });
  return h("span", { class: "muted", title: "estimated cost", text: `≈ ${money(job.estimated_cost)}` });
}

/** The page number of the page at `cursor`, if the way back to the first page is known. */
function pageOf(cursor) {
  let number = 1;
  for (let at = cursor; at; at = pageTrail.previous.get(at)) {
    if (!pageTrail.previous.has(at)) return null;
    number += 1;
  }
  return number;
}

// ---------------------------------------------------------------- chart

async function loadChart(area, signal) {
  let data;
  try {
    data = await getJson(`/v1/jobs/throughput?bucket=${chartBucket}`, { signal });
  } catch (error) {
    if (!ignoreAbort(error)) area.replaceChildren(h("div", { class: "card-body" }, errorBox(error)));
    return;
  }
  const fingerprint = JSON.stringify(data.buckets);
  if (area.dataset.fingerprint === fingerprint) return;
  area.dataset.fingerprint = fingerprint;
  area.replaceChildren(chart(data), legend(data.totals.by_status));
}

function legend(byStatus) {
  const present = CHART_ORDER.filter((status) => byStatus[status]);
  return h("div", { class: "legend" }, present.map((status) => h("span", { class: `status-${status}` },
    h("i", { class: "swatch", "aria-hidden": "true" }),
    `${label(status)} ${byStatus[status]}`)));
}

/** A tidy top for the y axis: 1, 2 or 5 times a power of ten, at least the largest bar. */
function niceCeiling(value) {
  if (value <= 5) return Math.max(1, value);
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) if (step * power >= value) return step * power;
  return 10 * power;
}

/** Buckets are UTC hours or days, and are labelled so. */
function bucketLabel(start, bucket) {
  const moment = new Date(start);
  if (bucket === "hour") return `${String(moment.getUTCHours()).padStart(2, "0")}:00`;
  return moment.toLocaleDateString(undefined, { month: "short", day: "numeric", timeZone: "UTC" });
}

/** Stacked bars by status, one per bucket, drawn by hand as SVG. */
function chart(data) {
  const width = 960;
  const height = 220;
  const left = 40;
  const right = 8;
  const top = 12;
  const bottom = 28;
  const plotWidth = width - left - right;
  const plotHeight = height - top - bottom;
  const buckets = data.buckets;
  const peak = niceCeiling(Math.max(0, ...buckets.map((b) => b.jobs)));
  const slot = plotWidth / Math.max(1, buckets.length);
  const barWidth = Math.max(2, slot * 0.72);
  const y = (count) => top + plotHeight - (count / peak) * plotHeight;

  const svg = s("svg", {
    class: "chart",
    id: "throughput-chart",
    viewBox: `0 0 ${width} ${height}`,
    role: "img",
    "aria-label": `Jobs submitted per ${data.bucket}: ${data.totals.jobs} in the window`,
  });
  const ticks = peak <= 5 ? peak : 5; // peak is 1, 2 or 5 times a power of ten: whole steps
  for (let i = 0; i <= ticks; i += 1) {
    const value = (peak / ticks) * i;
    const at = y(value);
    svg.append(
      s("line", { class: i === 0 ? "axis" : "grid-line", x1: left, x2: width - right, y1: at, y2: at }),
      s("text", { x: left - 8, y: at + 4, "text-anchor": "end", text: String(value) }),
    );
  }
  const every = Math.ceil(buckets.length / 12);
  buckets.forEach((bucket, index) => {
    const x = left + index * slot + (slot - barWidth) / 2;
    let base = 0;
    for (const status of CHART_ORDER) {
      const count = bucket.by_status[status] || 0;
      if (!count) continue;
      const rect = s("rect", {
        class: `bar fill-${status}`,
        x: x.toFixed(2),
        y: y(base + count).toFixed(2),
        width: barWidth.toFixed(2),
        height: Math.max(0, y(base) - y(base + count)).toFixed(2),
        rx: Math.min(2, barWidth / 4),
        "data-status": status,
        "data-count": count,
        "data-start": bucket.start,
      });
      rect.append(s("title", { text: `${bucketLabel(bucket.start, data.bucket)} · ${label(status)}: ${count}` }));
      svg.append(rect);
      base += count;
    }
    if (index % every === 0) {
      svg.append(s("text", {
        x: (left + index * slot + slot / 2).toFixed(2),
        y: height - 8,
        "text-anchor": "middle",
        text: bucketLabel(bucket.start, data.bucket),
      }));
    }
  });
  if (data.totals.jobs === 0) {
    svg.append(s("text", {
      class: "empty-text", x: left + plotWidth / 2, y: top + plotHeight / 2, "text-anchor": "middle",
      text: "No jobs submitted in this window",
    }));
  }
  return svg;
}

// ---------------------------------------------------------------- one job

const EVENT_LABELS = {
  JobSubmitted: "Submitted",
  JobAssigned: "Assigned",
  JobStarted: "Started",
  JobProgressReported: "Progress",
  JobResultStored: "Result stored",
  JobCompleted: "Completed",
  JobFailed: "Failed",
  JobCancelRequested: "Cancel requested",
  JobCanceled: "Canceled",
  JobTimedOut: "Timed out",
  JobRequeued: "Requeued",
  JobReportRejected: "Report rejected",
};
const EVENT_STATUS = {
  JobSubmitted: "pending",
  JobAssigned: "assigned",
  JobStarted: "running",
  JobProgressReported: "running",
  JobResultStored: "running",
  JobCompleted: "completed",
  JobFailed: "failed",
  JobCancelRequested: "canceling",
  JobCanceled: "canceled",
  JobTimedOut: "timed_out",
  JobRequeued: "pending",
  JobReportRejected: "failed",
};

/** One line on what an event says, from its stored data (or the job right after it). */
function eventSummary(type, data, job) {
  const d = data || {};
  switch (type) {
    case "JobSubmitted":
      return [d.model && `model ${d.model}`, d.gpu_type && `${d.gpu_type} × ${d.gpu_count}`,
        d.priority && `${d.priority} priority`, d.estimated_cost !== undefined && `estimate ${d.estimated_cost}`]
        .filter(Boolean).join(" · ");
    case "JobAssigned":
      return `to ${d.miner_id || (job && job.miner_id) || "a miner"}, attempt ${d.attempt ?? job?.attempt ?? ""}`;
    case "JobStarted":
      return `attempt ${d.attempt ?? job?.attempt ?? ""} running`;
    case "JobResultStored":
      return [d.size_bytes !== undefined && bytes(d.size_bytes), d.sha256 && `sha256 ${d.sha256.slice(0, 16)}…`]
        .filter(Boolean).join(" · ");
    case "JobCompleted":
      return `cost ${d.cost ?? job?.cost ?? "—"}${d.gpu_seconds !== undefined ? ` · ${d.gpu_seconds} GPU-seconds` : ""}`;
    case "JobFailed":
      return d.error || job?.error || "";
    case "JobCancelRequested":
    case "JobCanceled":
      return d.reason || "";
    case "JobTimedOut":
      return job?.error || "";
    case "JobRequeued":
      return `attempt ${d.attempt ?? ""}${d.cause ? `: ${d.cause}` : ""}`;
    case "JobReportRejected":
      return `${d.kind || "report"} from ${d.miner_id || "a miner"}: ${d.reason || ""}`;
    default:
      return "";
  }
}

/** The timeline: events in order; a run of progress reports reads as one line. */
function timelineItems(events) {
  const items = [];
  for (const event of events) {
    const last = items[items.length - 1];
    const progress = event.type === "JobProgressReported";
    const value = progress ? (event.data?.progress ?? event.job?.progress) : null;
    if (progress && last && last.type === "JobProgressReported") {
      last.to = event.sequence;
      last.last = value;
      last.count += 1;
      continue;
    }
    items.push({ ...event, to: event.sequence, first: value, last: value, count: 1 });
  }
  return items.map(timelineItem);
}

function timelineItem(item) {
  const type = item.type;
  const status = EVENT_STATUS[type] || "pending";
  const sequence = item.to !== item.sequence ? `#${item.sequence}–${item.to}` : `#${item.sequence}`;
  let summary;
  if (type === "JobProgressReported") {
    summary = item.count > 1
      ? `${item.first}% → ${item.last}% (${item.count} reports)` : `${item.last}%`;
  } else summary = eventSummary(type, item.data, item.job);
  return h("li", { class: `status-${status}`, dataset: { sequence: item.sequence, type } },
    h("div", { class: "event-head" },
      h("span", { class: "event-seq", text: sequence }),
      h("span", { class: "event-type", text: EVENT_LABELS[type] || type }),
      h("span", { class: "event-time" }, time(item.timestamp))),
    summary ? h("div", { class: "event-summary", text: summary }) : null,
    item.data && type !== "JobProgressReported"
      ? h("details", {}, h("summary", { text: "stored data" }),
        h("pre", { text: JSON.stringify(item.data, null, 2) }))
      : null);
}

function jobView(jobId, signal) {
  const state = { job: null, events: [], live: "connecting" };
  const head = h("div", { class: "page-head" });
  const progressCard = h("div", { class: "card" });
  const detailsCard = h("div", { class: "card" });
  const resultCard = h("div", { class: "card", id: "result" });
  const timeline = h("ol", { class: "timeline", id: "timeline" });
  const liveBadge = h("span", { class: "live", id: "live", dataset: { mode: "connecting" }, text: "connecting" });
  const message = h("div", { id: "job-message" });

  ui.view.replaceChildren(
    h("section", { class: "page", id: "job-page", dataset: { jobId } },
      h("div", { class: "crumbs" }, h("a", { href: "#/jobs", text: "Jobs" }), " / ", h("span", { class: "id", text: jobId })),
      head, message,
      h("div", { class: "grid" }, progressCard, detailsCard, resultCard),
      h("div", { class: "card" },
        h("div", { class: "card-head" }, h("h2", { text: "Timeline" }),
          h("span", { class: "muted", text: "every stored event of the job, in order" }),
          h("div", { class: "spacer" }), liveBadge),
        timeline)),
  );

  const setLive = (mode, text) => {
    liveBadge.dataset.mode = mode;
    liveBadge.textContent = text;
  };

  const renderJob = () => {
    const job = state.job;
    head.replaceChildren(h("h1", { class: "id", text: job.job_id }), pill(job.status));
    const notes = [];
    if (job.pending_reason) notes.push(h("p", { class: "muted", text: `Waiting: ${job.pending_reason}` }));
    if (job.error) notes.push(h("p", { class: "error", text: `${job.error_code ? `${job.error_code}: ` : ""}${job.error}` }));
    progressCard.replaceChildren(
      h("div", { class: "card-head" }, h("h2", { text: "Progress" })),
      h("div", { class: "card-body", id: "job-progress", dataset: { progress: job.progress, status: job.status } },
        progressBar(job.progress, job.status, true), notes),
    );
    detailsCard.replaceChildren(
      h("div", { class: "card-head" }, h("h2", { text: "Details" })),
      h("div", { class: "card-body" }, h("dl", { class: "facts" },
        fact("Model", job.model), fact("Priority", job.priority), fact("Attempt", job.attempt),
        fact("Miner", job.miner_id ? h("span", { class: "id", text: job.miner_id }) : "—"),
        fact("Created", time(job.created_at)), fact("Started", time(job.started_at)),
        fact("Finished", time(job.completed_at)),
        fact("Estimated cost", money(job.estimated_cost)), fact("Cost", money(job.cost)))),
    );
    renderResult(job);
  };

  const renderResult = (job) => {
    const body = h("div", { class: "card-body" });
    resultCard.replaceChildren(h("div", { class: "card-head" }, h("h2", { text: "Result" })), body);
    const result = job.result;
    if (job.status !== "completed" || !result) {
      body.append(h("p", { class: "muted", text: TERMINAL.has(job.status)
        ? `No result: the job ${label(job.status)}.` : "No result yet." }));
      return;
    }
    body.append(h("dl", { class: "facts" },
      fact("Format", result.format || "—"),
      fact("Stored", result.storage === "stored" ? (result.location || "stored") : "inline"),
      fact("Size", result.size_bytes !== undefined ? bytes(result.size_bytes) : "—"),
      fact("SHA-256", h("span", { class: "id", text: result.sha256 || "—" }))));
    const outcome = h("span", { class: "muted", id: "download-status", role: "status" });
    const button = h("button", {
      type: "button", class: "button button-primary", id: "download", text: "Download result",
      onclick: () => download(job, button, outcome),
    });
    body.append(h("div", { class: "download-row" }, button, outcome));
  };

  const renderTimeline = () => {
    timeline.replaceChildren(...timelineItems(state.events));
  };

  const loadAll = async () => {
    const [job, history] = await Promise.all([
      getJson(`/v1/jobs/${encodeURIComponent(jobId)}`, { signal }),
      getJson(`/v1/jobs/${encodeURIComponent(jobId)}/events`, { signal }),
    ]);
    state.job = job;
    state.events = history.events;
    renderJob();
    renderTimeline();
  };

  const lastSequence = () => (state.events.length ? state.events[state.events.length - 1].sequence : 0);

  const finish = async () => {
    setLive("final", `final: ${label(state.job.status)}`);
    // The stream carries the job, not each event's stored data: read the log once more.
    try {
      await loadAll();
    } catch (error) {
      if (!ignoreAbort(error)) message.replaceChildren(errorBox(error));
    }
  };

  const onMessage = (frame) => {
    if (frame.sequence <= lastSequence()) return; // already shown
    state.events.push({ sequence: frame.sequence, type: frame.type, timestamp: frame.timestamp, data: null, job: frame.job });
    state.job = { ...state.job, ...frame.job };
    renderJob();
    renderTimeline();
  };

  const poll = async () => {
    setLive("polling", `polling every ${POLL_MS / 1000} s`);
    let lastEvents = 0;
    const tick = async () => {
      try {
        const job = await getJson(`/v1/jobs/${encodeURIComponent(jobId)}`, { signal });
        const before = state.job;
        const moved = job.status !== before.status || job.attempt !== before.attempt;
        const changed = moved || job.progress !== before.progress;
        state.job = job;
        if (changed) renderJob();
        // The timeline at most every 10 s for progress alone, at once when the status moves.
        if (moved || (changed && Date.now() - lastEvents > REFRESH_MS) || TERMINAL.has(job.status)) {
          lastEvents = Date.now();
          const history = await getJson(`/v1/jobs/${encodeURIComponent(jobId)}/events`, { signal });
          state.events = history.events;
          renderTimeline();
        }
        message.replaceChildren();
        if (TERMINAL.has(job.status)) {
          setLive("final", `final: ${label(job.status)}`);
          return;
        }
        later(POLL_MS, tick);
      } catch (error) {
        if (ignoreAbort(error)) return;
        message.replaceChildren(errorBox(error));
        const wait = error.status === 429 && error.retryAfter ? Number(error.retryAfter) * 1000 : POLL_MS;
        later(Math.max(wait, POLL_MS), tick);
      }
    };
    later(POLL_MS, tick);
  };

  (async () => {
    try {
      await loadAll();
    } catch (error) {
      if (ignoreAbort(error)) return;
      setLive("final", "not loaded");
      head.replaceChildren(h("h1", { class: "id", text: jobId }));
      message.replaceChildren(errorBox(error.status === 404
        ? new ApiError(404, `job ${jobId} was not found (or this key may not see it)`) : error));
      return;
    }
    if (TERMINAL.has(state.job.status)) {
      setLive("final", `final: ${label(state.job.status)}`);
      return;
    }
    let streamed;
    try {
      streamed = await watch(jobId, lastSequence, signal, onMessage, () => setLive("stream", "live"));
    } catch (error) {
      if (ignoreAbort(error)) return;
      streamed = "failed";
    }
    if (streamed === "ended") await finish();
    else if (!signal.aborted) poll();
  })();
}

function fact(name, value) {
  return [h("dt", { text: name }), h("dd", {}, value === null || value === undefined ? "—" : value)];
}

/**
 * Follow GET /v1/jobs/{id}/watch (Server-Sent Events) with fetch, which, unlike
 * EventSource, can send the key. Resumes after `lastSequence()` with Last-Event-ID.
 * Returns "ended" after the server's `end` event, or "failed" if the stream cannot
 * be opened or drops three times in a row (the caller then polls).
 */
async function watch(jobId, lastSequence, signal, onMessage, onOpen) {
  let failures = 0;
  while (failures < 3 && !signal.aborted) {
    let response;
    try {
      response = await request(`/v1/jobs/${encodeURIComponent(jobId)}/watch`, {
        signal,
        extraHeaders: { Accept: "text/event-stream", "Last-Event-ID": String(lastSequence()) },
      });
    } catch (error) {
      if (ignoreAbort(error)) throw error;
      return "failed";
    }
    const type = response.headers.get("Content-Type") || "";
    if (!type.startsWith("text/event-stream") || !response.body) return "failed";
    onOpen();
    try {
      for await (const frame of sseFrames(response.body, signal)) {
        failures = 0; // anything, a keepalive too, shows the stream was alive
        if (frame.event === "end") return "ended";
        if (frame.event === "job" && frame.data) onMessage(JSON.parse(frame.data));
      }
    } catch (error) {
      if (ignoreAbort(error) || signal.aborted) throw error;
    }
    failures += 1; // the stream closed before `end`: reconnect where it stopped
    await new Promise((resolve) => setTimeout(resolve, 500 * failures));
  }
  return "failed";
}

/** Server-Sent Events frames from a byte stream: {event, data, id}; a comment-only block
 * (the server's keepalive) comes out as {event: "comment"}, so the caller sees the stream alive. */
async function* sseFrames(body, signal) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  const stop = () => reader.cancel().catch(() => {});
  signal.addEventListener("abort", stop, { once: true });
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      // Lines end in LF, CRLF or CR; a CR at the very end may be half of a CRLF.
      const pending = buffer.endsWith("\r") ? "\r" : "";
      buffer = buffer.slice(0, buffer.length - pending.length).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const frame = { event: "message", data: "", id: null };
        const data = [];
        for (const line of block.split("\n")) {
          if (!line || line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "event") frame.event = text;
          else if (field === "data") data.push(text);
          else if (field === "id") frame.id = text;
        }
        frame.data = data.join("\n");
        if (data.length || frame.event !== "message") yield frame;
        else if (block.startsWith(":")) yield { event: "comment", data: "", id: null };
      }
      buffer += pending;
    }
  } finally {
    signal.removeEventListener("abort", stop);
  }
}

/** Fetch the result with the key, check its SHA-256 where the browser can, and save it. */
async function download(job, button, outcome) {
  button.disabled = true;
  outcome.className = "muted";
  outcome.textContent = "Downloading…";
  try {
    const response = await request(`/v1/jobs/${encodeURIComponent(job.job_id)}/download`);
    const blob = await response.blob();
    const disposition = response.headers.get("Content-Disposition") || "";
    const named = /filename="?([^";]+)"?/.exec(disposition);
    const filename = named ? named[1] : `${job.job_id}.bin`;
    let check = "";
    const expected = job.result && job.result.sha256;
    if (expected && globalThis.crypto && crypto.subtle) {
      const digest = await crypto.subtle.digest("SHA-256", await blob.arrayBuffer());
      const actual = [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
      if (actual !== expected) {
        throw new Error(`the bytes do not match the recorded sha256 (${actual} ≠ ${expected})`);
      }
      check = ", sha256 verified";
    }
    const url = URL.createObjectURL(blob);
    const link = h("a", { href: url, download: filename, hidden: true });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
    outcome.className = "muted";
    outcome.textContent = `Saved ${filename} (${bytes(blob.size)}${check})`;
  } catch (error) {
    outcome.className = "error";
    outcome.textContent = describe(error);
  } finally {
    button.disabled = false;
  }
}

// ---------------------------------------------------------------- miners

let includeRetired = false;

function minersView(signal) {
  const total = h("span", { class: "muted", id: "miners-total" });
  const area = h("div", { id: "miners-area" }, h("div", { class: "card" }, h("div", { class: "empty", text: "Loading…" })));
  const pages = { cursors: [""] };
  const load = () => loadMiners(area, total, pages, signal);
  const retired = h("input", {
    type: "checkbox", id: "include-deregistered", checked: includeRetired,
    onchange: (event) => { includeRetired = event.target.checked; area.dataset.fingerprint = ""; load(); },
  });
  ui.view.replaceChildren(
    h("section", { class: "page", id: "miners-page" },
      h("div", { class: "page-head" },
        h("h1", { text: "Miners" }), total, h("div", { class: "spacer" }),
        h("label", { class: "check" }, retired, "show deregistered"),
        h("button", { type: "button", class: "button", text: "Refresh", onclick: load })),
      area),
  );
  load();
  const autoRefresh = () => {
    if (!document.hidden) load();
    later(REFRESH_MS, autoRefresh);
  };
  later(REFRESH_MS, autoRefresh);
}

async function loadMiners(area, total, pages, signal) {
  const miners = [];
  let page;
  try {
    // Every page up to the one shown ("Show more" adds a page).
    for (const cursor of pages.cursors) {
      const query = new URLSearchParams({ limit: "50" });
      if (cursor) query.set("cursor", cursor);
      if (includeRetired) query.set("include_deregistered", "true");
      page = await getJson(`/v1/miners?${query}`, { signal });
      miners.push(...page.miners);
      if (!page.has_more) break;
    }
  } catch (error) {
    if (ignoreAbort(error)) return;
    area.dataset.fingerprint = "";
    if (error.status === 403) {
      total.textContent = "";
      for (const control of area.parentElement.querySelectorAll(".page-head .check, .page-head .button")) {
        control.hidden = true;
      }
      area.replaceChildren(h("div", { class: "note", id: "miners-note", role: "note" },
        h("strong", { text: "Miners are visible to auditors and admins. " }),
        "This key may read its own jobs only; open the dashboard with an auditor or admin key to see the miners, their GPUs and their load."));
    } else area.replaceChildren(errorBox(error));
    return;
  }
  const fingerprint = JSON.stringify([miners.map((m) => ({ ...m, last_heartbeat_at: null })), page.has_more]);
  total.textContent = `${page.total} ${page.total === 1 ? "miner" : "miners"}`;
  if (area.dataset.fingerprint === fingerprint) {
    for (const cell of area.querySelectorAll("[data-heartbeat]")) {
      cell.textContent = ago(cell.dataset.heartbeat || null);
    }
    return;
  }
  area.dataset.fingerprint = fingerprint;
  if (miners.length === 0) {
    area.replaceChildren(h("div", { class: "card" }, h("div", { class: "empty", text: "No miners registered." })));
    return;
  }
  const more = page.has_more ? h("div", { class: "pager" }, h("button", {
    type: "button", class: "button", text: "Show more",
    onclick: () => {
      pages.cursors.push(page.next_cursor);
      loadMiners(area, total, pages, signal);
    },
  })) : null;
  area.replaceChildren(h("div", { class: "card" },
    h("div", { class: "table-wrap" },
      h("table", { class: "responsive", id: "miners-list" },
        h("thead", {}, h("tr", {},
          ["Miner", "Status", "Offers", "GPUs reported", "Load", "Location"].map((name) => h("th", { text: name })),
          h("th", { class: "num", text: "Price / h" }), h("th", { text: "Last heartbeat" }))),
        h("tbody", {}, miners.map(minerRow)))),
    more));
}

function minerRow(miner) {
  const gpus = miner.gpus && miner.gpus.length
    ? h("ul", { class: "gpus" }, miner.gpus.map((gpu) => h("li", { class: "gpu" },
      h("span", { class: "muted", text: `#${gpu.index ?? "?"} ` }),
      String(gpu.name ?? "GPU"),
      gpu.memory_total_mb !== undefined ? h("span", { class: "muted", text: ` · ${Math.round(gpu.memory_total_mb / 1024)} GiB` }) : null)))
    : h("span", { class: "muted", text: "none reported" });
  const load = h("div", { class: "progress" },
    h("progress", { class: "load", max: Math.max(1, miner.max_concurrent), value: miner.inflight }),
    h("span", { class: "progress-value", text: `${miner.inflight}/${miner.max_concurrent}` }));
  return h("tr", { dataset: { minerId: miner.miner_id, status: miner.status } },
    h("td", { dataset: { label: "Miner" } }, h("strong", { text: miner.name }),
      h("span", { class: "sub id", text: miner.miner_id })),
    h("td", { dataset: { label: "Status" } }, pill(miner.status)),
    h("td", { dataset: { label: "Offers" }, class: "offers" },
      h("span", { class: "nowrap", text: `${miner.gpu_type} × ${miner.gpu_count}` }),
      miner.vram_gb ? h("span", { class: "sub", text: `${miner.vram_gb} GB VRAM each` }) : null),
    h("td", { dataset: { label: "GPUs reported" } }, gpus),
    h("td", { dataset: { label: "Load" } }, load),
    h("td", { dataset: { label: "Location" }, text: miner.location }),
    h("td", { dataset: { label: "Price / h" }, class: "num", text: money(miner.price_per_hour) }),
    h("td", { dataset: { label: "Last heartbeat", heartbeat: miner.last_heartbeat_at || "" }, class: "nowrap",
      title: miner.last_heartbeat_at || "", text: ago(miner.last_heartbeat_at) }));
}

// ---------------------------------------------------------------- start

function start() {
  Object.assign(ui, {
    view: document.getElementById("view"),
    login: document.getElementById("login"),
    loginForm: document.getElementById("login-form"),
    loginError: document.getElementById("login-error"),
    loginButton: document.getElementById("login-button"),
    keyInput: document.getElementById("key-input"),
    session: document.getElementById("session"),
    keyHint: document.getElementById("key-hint"),
  });
  ui.loginForm.addEventListener("submit", signIn);
  document.getElementById("forget-key").addEventListener("click", forgetKey);
  window.addEventListener("hashchange", route);
  route();
}

start();
