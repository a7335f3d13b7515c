// The dashboard: one metric's KPIs from GET /kpis drawn with uPlot (vendored under /static/vendor), its newest
// buckets in a table, and every metric of the newest bucket beside it; refreshed while open.
"use strict";

const GRAIN_SECONDS = { second: 1, minute: 60, hour: 3600, day: 86400 };
const DEFAULT_BUCKETS = 600; // a new view shows this many buckets up to the newest data
const REFRESH_MS = 3000;
const MAX_PAGES = 20; // at 10,000 buckets a page, enough for any range the chart can show legibly
const TABLE_ROWS = 20; // the newest buckets the table lists
const DEFAULT_METRIC = "value"; // the reading's bare `value`: the metric a request that names none gets

const state = {
  etag: null, url: null, chart: null, data: null, final: null, freshness: null, loads: 0, asked: 0,
  metric: null, catalog: [], bucketMetrics: null,
};
window.kpiDashboard = state; // read by the browser test and handy in the console

const $ = (id) => document.getElementById(id);

function isoSeconds(epochSeconds) {
  return new Date(epochSeconds * 1000).toISOString().replace(".000Z", "Z");
}

function seriesUrl(start, end, grain, device, metric) {
  const query = new URLSearchParams({ start, end, grain, metric, limit: "10000" });
  if (device) query.set("device_id", device);
  return `/kpis?${query}`;
}

async function problemText(response) {
  try {
    const problem = await response.json();
    return `${problem.title || response.status}: ${problem.detail || ""}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

async function getJson(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(await problemText(response));
  return response.json();
}

function chosenMetric() {
  return $("metric").value || DEFAULT_METRIC;
}

function metricSummary() {
  return state.catalog.find((m) => m.metric === chosenMetric()) || null;
}

// The metrics the lake knows, in the picker: the one chosen stays chosen; at first `value` if the lake has it, else
// the first by name.
async function loadCatalog() {
  const body = await getJson("/catalog/metrics");
  state.catalog = body.items;
  const select = $("metric");
  const chosen = select.value;
  const names = body.items.map((m) => m.metric);
  select.replaceChildren();
  for (const m of body.items) select.add(new Option(`${m.metric} (${m.device_count} devices)`, m.metric));
  if (!names.length) select.add(new Option(`${DEFAULT_METRIC} (no readings yet)`, DEFAULT_METRIC));
  select.value = names.includes(chosen) ? chosen : names.includes(DEFAULT_METRIC) || !names.length ? DEFAULT_METRIC : names[0];
  state.metric = select.value;
  return body.freshness;
}

// The devices that sent the chosen metric, with their readings of it; "all devices" when the one chosen sent none.
async function loadDevices() {
  const metric = chosenMetric();
  const body = await getJson(`/devices?${new URLSearchParams({ limit: "10000", metric })}`).catch((error) => {
    if (!state.catalog.length) return { items: [] }; // an empty lake knows no metric yet
    throw error;
  });
  const select = $("device");
  const chosen = select.value;
  select.replaceChildren(new Option("all devices", ""));
  for (const device of body.items) select.add(new Option(`${device.device_id} (${device.reading_count})`, device.device_id));
  select.value = body.items.some((d) => d.device_id === chosen) ? chosen : "";
}

// When following the newest data, the range ends at the bucket after the chosen metric's newest reading.
function followRange(freshness) {
  const grain = $("grain").value;
  const step = GRAIN_SECONDS[grain];
  const summary = metricSummary();
  const newestText = summary ? summary.last_reading : freshness && freshness.newest_event;
  const newest = newestText ? Date.parse(newestText) / 1000 : Date.now() / 1000;
  const end = Math.floor(newest / step) * step + step;
  $("start").value = isoSeconds(end - DEFAULT_BUCKETS * step);
  $("end").value = isoSeconds(end);
}

async function fetchSeries(url, etag) {
  // Pages are joined; the ETag of the first page tells whether anything changed since the last draw.
  const first = await fetch(url, { headers: etag ? { "If-None-Match": etag } : {} });
  if (first.status === 304) return null;
  if (!first.ok) throw new Error(await problemText(first));
  const body = await first.json();
  const items = body.items;
  let next = body.next;
  for (let page = 1; next && page < MAX_PAGES; page++) {
    const more = await fetch(next);
    if (!more.ok) throw new Error(await problemText(more));
    const moreBody = await more.json();
    items.push(...moreBody.items);
    next = moreBody.next;
  }
  return { etag: first.headers.get("ETag"), body, items };
}

function columns(items) {
  const x = [], average = [], low = [], high = [], counts = [];
  for (const item of items) {
    x.push(Date.parse(item.timestamp) / 1000);
    average.push(item.average_value);
    low.push(item.min_value);
    high.push(item.max_value);
    counts.push(item.reading_count);
  }
  return [x, average, low, high, counts];
}

// What the chart draws: the API's columns, with the buckets that may still change (not final: the watermark has
// not passed their end) in series of their own, so that they look provisional. The dashed average joins the last
// final bucket, so the line stays continuous.
function plotColumns(data, final) {
  const [x, average, low, high, counts] = data;
  const settled = [], open = [], settledCounts = [], openCounts = [];
  for (let i = 0; i < x.length; i++) {
    const joins = !final[i] || (i + 1 < x.length && !final[i + 1]);
    settled.push(final[i] ? average[i] : null);
    open.push(joins ? average[i] : null);
    settledCounts.push(final[i] ? counts[i] : null);
    openCounts.push(final[i] ? null : counts[i]);
  }
  return [x, settled, low, high, settledCounts, openCounts, open];
}

function makeChart(data, metric) {
  const width = Math.max(600, $("chart").clientWidth - 16);
  const options = {
    width,
    height: 420,
    tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"),
    scales: { x: { time: true }, count: { range: (u, min, max) => [0, Math.max(1, max) * 3] } },
    series: [
      { label: "bucket (UTC)" },
      { label: "average", stroke: "#1f6feb", width: 2, scale: "value" },
      { label: "min", stroke: "#8fb8f0", width: 1, scale: "value" },
      { label: "max", stroke: "#8fb8f0", width: 1, scale: "value" },
      { label: "readings", stroke: "#b0711a", fill: "rgba(176,113,26,0.35)", scale: "count",
        paths: uPlot.paths.bars({ size: [0.7, 40] }), points: { show: false } },
      { label: "readings, may still change", stroke: "#b0711a", dash: [4, 3], fill: "rgba(176,113,26,0.08)",
        scale: "count", paths: uPlot.paths.bars({ size: [0.7, 40] }), points: { show: false } },
      { label: "average, may still change", stroke: "#1f6feb", dash: [6, 4], width: 2, scale: "value" },
    ],
    bands: [{ series: [3, 2], fill: "rgba(31,111,235,0.15)" }],
    axes: [
      {},
      { scale: "value", label: metric },
      { scale: "count", side: 1, label: "readings", grid: { show: false } },
    ],
  };
  return new uPlot(options, data, $("chart"));
}

function showFreshness(freshness) {
  state.freshness = freshness;
  const summary = metricSummary();
  const metric = chosenMetric();
  $("freshness").textContent =
    `${metric}: newest reading ${summary ? summary.last_reading : "none"}, ` +
    `${summary ? summary.device_count : 0} devices · gold version ${freshness.gold_version} · ` +
    `final up to ${freshness.watermark || "nothing yet"} · ` +
    `last pipeline commit ${freshness.last_gold_commit || "never"}`;
  $("freshness").dataset.goldVersion = String(freshness.gold_version);
  $("freshness").dataset.metric = metric;
}

function number(value) {
  return value === null || value === undefined ? "–" : Number(value.toPrecision(6)).toString();
}

function cells(row, values) {
  for (const value of values) {
    const cell = row.insertCell();
    cell.textContent = value; // text, never markup: device ids and metric names come from the data
  }
}

function kpiCells(item) {
  return [
    item.reading_count, item.device_count, number(item.average_value), number(item.min_value),
    number(item.max_value), number(item.stddev_value), item.final ? "final" : "may still change",
  ];
}

// The chosen metric's newest buckets of the drawn series, newest first.
function showTable(items, metric) {
  $("table-title").textContent = `${metric}: the newest ${Math.min(TABLE_ROWS, items.length)} buckets`;
  const body = $("kpi-table").tBodies[0];
  body.replaceChildren();
  for (const item of items.slice(-TABLE_ROWS).reverse()) {
    const row = body.insertRow();
    cells(row, [item.timestamp, ...kpiCells(item)]);
  }
}

// Every metric of the newest bucket drawn (GET /kpis/{timestamp}/metrics); null when nothing is drawn.
async function fetchBucketMetrics(items, grain, device) {
  if (!items.length) return null;
  const query = new URLSearchParams({ grain });
  if (device) query.set("device_id", device);
  return getJson(`/kpis/${encodeURIComponent(items[items.length - 1].timestamp)}/metrics?${query}`);
}

// That bucket's metrics in a table, each name a button that picks it.
function showBucketMetrics(answer, grain) {
  const body = $("metrics-table").tBodies[0];
  body.replaceChildren();
  if (answer === null) {
    $("metrics-title").textContent = "Every metric of the newest bucket: no bucket drawn";
    return;
  }
  $("metrics-title").textContent = `Every metric of the ${grain} starting ${answer.timestamp}`;
  for (const item of answer.metrics) {
    const row = body.insertRow();
    const name = document.createElement("button");
    name.type = "button";
    name.textContent = item.metric;
    name.addEventListener("click", () => chooseMetric(item.metric));
    row.insertCell().append(name);
    if (item.metric === chosenMetric()) row.classList.add("chosen");
    cells(row, kpiCells(item));
  }
}

async function draw({ force = false } = {}) {
  const metric = chosenMetric();
  const grain = $("grain").value;
  const device = $("device").value;
  const url = seriesUrl($("start").value.trim(), $("end").value.trim(), grain, device, metric);
  const sameView = url === state.url && !force;
  const ticket = ++state.asked;
  const answer = await fetchSeries(url, sameView ? state.etag : null);
  if (answer === null) return; // 304: the snapshot did not change
  if (ticket !== state.asked) return; // a newer view was asked for while this one loaded: it draws instead
  const bucketMetrics = await fetchBucketMetrics(answer.items, grain, device);
  if (ticket !== state.asked) return;
  // From here on nothing waits: the page and `state` change together, so a reader never sees half a view.
  const data = columns(answer.items);
  const final = answer.items.map((item) => item.final);
  Object.assign(state, { url, metric, final, etag: answer.etag, data, bucketMetrics });
  showFreshness(answer.body.freshness);
  if (state.chart) state.chart.destroy();
  state.chart = makeChart(plotColumns(data, final), metric);
  $("chart-title").textContent = `${metric}: average, with the min–max band, and reading counts`;
  const total = data[4].reduce((a, b) => a + b, 0);
  $("summary").textContent =
    `${data[0].length} ${answer.body.grain} buckets with readings of ${metric} from ${answer.body.start} to ` +
    `${answer.body.end}, ${total} readings`;
  $("summary").dataset.buckets = String(data[0].length);
  $("message").textContent = data[0].length ? "" : `no readings of ${metric} in this range`;
  showTable(answer.items, metric);
  showBucketMetrics(bucketMetrics, grain);
  state.loads += 1;
}

async function chooseMetric(metric) {
  $("metric").value = metric;
  await metricChanged();
}

async function metricChanged() {
  try {
    state.metric = chosenMetric();
    await loadDevices();
    if ($("follow").checked) followRange(state.freshness);
    await draw({ force: true });
  } catch (error) {
    $("message").textContent = String(error.message || error);
  }
}

async function tick() {
  try {
    if ($("follow").checked) {
      const freshness = await loadCatalog();
      await loadDevices();
      followRange(freshness);
    }
    await draw();
  } catch (error) {
    $("message").textContent = String(error.message || error);
  }
}

async function start() {
  try {
    const freshness = await loadCatalog();
    state.freshness = freshness;
    await loadDevices();
    followRange(freshness);
    await draw({ force: true });
  } catch (error) {
    $("message").textContent = String(error.message || error);
  }
  const redraw = () => draw({ force: true }).catch((error) => { $("message").textContent = String(error.message || error); });
  $("controls").addEventListener("submit", (event) => {
    event.preventDefault();
    redraw();
  });
  for (const id of ["start", "end"]) $(id).addEventListener("input", () => { $("follow").checked = false; });
  $("metric").addEventListener("change", metricChanged);
  $("grain").addEventListener("change", () => { if ($("follow").checked) followRange(state.freshness); redraw(); });
  $("device").addEventListener("change", redraw);
  setInterval(tick, REFRESH_MS);
}

start();
