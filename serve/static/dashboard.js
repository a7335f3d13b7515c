// The dashboard: KPIs from GET /kpis drawn with uPlot (vendored under /static/vendor), refreshed while open.
"use strict";

const GRAIN_SECONDS = { second: 1, minute: 60, hour: 3600, day: 86400 };
const DEFAULT_BUCKETS = 600; // a new view shows this many buckets up to the newest data
const REFRESH_MS = 3000;
const MAX_PAGES = 20; // at 10,000 buckets a page, enough for any range the chart can show legibly

const state = { etag: null, url: null, chart: null, data: null, final: null, freshness: null, loads: 0, asked: 0 };
window.kpiDashboard = state; // read by the browser test and handy in the console

const $ = (id) => document.getElementById(id);

function isoSeconds(epochSeconds) {
  return new Date(epochSeconds * 1000).toISOString().replace(".000Z", "Z");
}

function seriesUrl(start, end, grain, device) {
  const query = new URLSearchParams({ start, end, grain, limit: "10000" });
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

// When following the newest data, the range ends at the bucket after the newest event gold holds.
function followRange(freshness) {
  const grain = $("grain").value;
  const step = GRAIN_SECONDS[grain];
  const newest = freshness && freshness.newest_event ? Date.parse(freshness.newest_event) / 1000 : Date.now() / 1000;
  const end = Math.floor(newest / step) * step + step;
  $("start").value = isoSeconds(end - DEFAULT_BUCKETS * step);
  $("end").value = isoSeconds(end);
}

async function loadDevices() {
  const response = await fetch("/devices?limit=10000");
  if (!response.ok) throw new Error(await problemText(response));
  const body = await response.json();
  const select = $("device");
  const chosen = select.value;
  select.replaceChildren(new Option("all devices", ""));
  for (const device of body.items) select.add(new Option(`${device.device_id} (${device.reading_count})`, device.device_id));
  select.value = chosen;
  return body.freshness;
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

function makeChart(data) {
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
      { scale: "value", label: "value" },
      { scale: "count", side: 1, label: "readings", grid: { show: false } },
    ],
  };
  return new uPlot(options, data, $("chart"));
}

function showFreshness(freshness) {
  state.freshness = freshness;
  $("freshness").textContent =
    `gold version ${freshness.gold_version} · newest event ${freshness.newest_event || "none"} · ` +
    `final up to ${freshness.watermark || "nothing yet"} · ` +
    `last pipeline commit ${freshness.last_gold_commit || "never"}`;
  $("freshness").dataset.goldVersion = String(freshness.gold_version);
}

async function draw({ force = false } = {}) {
  const url = seriesUrl($("start").value.trim(), $("end").value.trim(), $("grain").value, $("device").value);
  const sameView = url === state.url && !force;
  const ticket = ++state.asked;
  const answer = await fetchSeries(url, sameView ? state.etag : null);
  if (answer === null) return; // 304: the snapshot did not change
  if (ticket !== state.asked) return; // a newer view was asked for while this one loaded: it draws instead
  const data = columns(answer.items);
  const final = answer.items.map((item) => item.final);
  state.url = url;
  state.final = final;
  state.etag = answer.etag;
  state.data = data;
  state.loads += 1;
  showFreshness(answer.body.freshness);
  if (state.chart) state.chart.destroy();
  state.chart = makeChart(plotColumns(data, final));
  const total = data[4].reduce((a, b) => a + b, 0);
  $("summary").textContent =
    `${data[0].length} ${answer.body.grain} buckets with readings from ${answer.body.start} to ${answer.body.end}, ` +
    `${total} readings`;
  $("summary").dataset.buckets = String(data[0].length);
  $("message").textContent = data[0].length ? "" : "no readings in this range";
}

async function tick() {
  try {
    if ($("follow").checked) {
      const freshness = await loadDevices();
      followRange(freshness);
    }
    await draw();
  } catch (error) {
    $("message").textContent = String(error.message || error);
  }
}

async function start() {
  try {
    const freshness = await loadDevices();
    followRange(freshness);
    await draw({ force: true });
  } catch (error) {
    $("message").textContent = String(error.message || error);
  }
  $("controls").addEventListener("submit", (event) => {
    event.preventDefault();
    draw({ force: true }).catch((error) => { $("message").textContent = String(error.message || error); });
  });
  for (const id of ["start", "end"]) $(id).addEventListener("input", () => { $("follow").checked = false; });
  $("grain").addEventListener("change", () => { if ($("follow").checked) followRange(state.freshness); draw({ force: true }); });
  $("device").addEventListener("change", () => draw({ force: true }));
  setInterval(tick, REFRESH_MS);
}

start();
