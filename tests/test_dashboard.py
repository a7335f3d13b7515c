"""The dashboard in a real headless Chromium (Debian's package, driven by Playwright): it loads from this service
alone, its chart holds the values the API returns, it redraws when new data lands, and its chart, table and
freshness line follow the metric chosen in its picker."""

from __future__ import annotations

import shutil
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest

from lake.tables import LakePaths
from lake.watermark import USER_METADATA_CONF, Watermark
from tests.conftest import REPO
from tests.reference import Reference
from tests.serve_lake import METRICS, START, LakeWriter, Reading, api_settings, iso, make_readings, serving

pytestmark = pytest.mark.spark
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = REPO / ".lakehouse" / "artifacts" / "dashboard.png"


def _chart_columns(page) -> list[list[float]]:  # type: ignore[no-untyped-def]
    return page.evaluate("() => window.kpiDashboard.data.map((column) => Array.from(column))")


def _api_columns(base: str, url: str) -> list[list[float]]:
    items, next_page = [], url
    while next_page:
        body = httpx.get(base + next_page).json()
        items += body["items"]
        next_page = body["next"]
    return [
        [_epoch(i["timestamp"]) for i in items],
        [i["average_value"] for i in items],
        [i["min_value"] for i in items],
        [i["max_value"] for i in items],
        [i["reading_count"] for i in items],
    ]


def _newest_version(table: Path) -> int:
    return max(int(log.stem) for log in (table / "_delta_log").glob("*.json"))


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def _table(page, selector: str) -> list[list[str]]:  # type: ignore[no-untyped-def]
    return page.eval_on_selector_all(
        f"{selector} tbody tr", "rows => rows.map((r) => Array.from(r.cells).map((c) => c.textContent))"
    )


def _check_metric_picker(page, base: str, readings: list[Reading]) -> None:  # type: ignore[no-untyped-def]
    """The picker lists the catalog's metrics, `value` chosen first; choosing another draws that metric's series and
    lists its buckets, its devices and its freshness; a metric's name in the every-metric table picks it."""
    catalog = httpx.get(base + "/catalog/metrics").json()["items"]
    options = page.eval_on_selector_all("#metric option", "options => options.map((o) => o.value)")
    assert options == [m["metric"] for m in catalog] == sorted(METRICS)
    assert page.input_value("#metric") == "value" and "metric=value" in page.evaluate("() => window.kpiDashboard.url")
    value_chart = _chart_columns(page)

    page.select_option("#metric", "pressure_bar")
    page.wait_for_function("() => window.kpiDashboard.url.includes('metric=pressure_bar')", timeout=20_000)
    url = page.evaluate("() => window.kpiDashboard.url")
    chart = _chart_columns(page)
    assert chart == _api_columns(base, url) and chart != value_chart
    pressure = Reference.of(readings).buckets("second", metric="pressure_bar")
    assert chart[4] == [k["reading_count"] for k in pressure.values()]
    assert max(chart[3]) <= 4.0  # pressures, not values
    # The table: the newest buckets of pressure first, as the series holds them.
    rows = _table(page, "#kpi-table")
    newest = list(pressure.items())[::-1][: len(rows)]
    assert len(rows) == min(20, len(pressure))
    assert [(row[0], int(row[1])) for row in rows] == [(iso(t), k["reading_count"]) for t, k in newest]
    assert page.text_content("#table-title").startswith("pressure_bar")
    # The freshness line names the metric and its newest reading, from the catalog.
    summary = next(m for m in catalog if m["metric"] == "pressure_bar")
    freshness = page.text_content("#freshness")
    assert freshness.startswith(f"pressure_bar: newest reading {summary['last_reading']}, 2 devices")
    # The device picker offers the devices that send pressure: meter-3 sends none.
    devices = page.eval_on_selector_all("#device option", "options => options.map((o) => o.value)")
    assert devices == ["", "pump-1", "pump-2"]
    # Every metric of the newest bucket, from GET /kpis/{timestamp}/metrics, pressure's row marked.
    bucket = httpx.get(f"{base}/kpis/{iso(list(pressure)[-1])}/metrics").json()
    shown = _table(page, "#metrics-table")
    assert [row[0] for row in shown] == [m["metric"] for m in bucket["metrics"]]
    assert [int(row[1]) for row in shown] == [m["reading_count"] for m in bucket["metrics"]]
    assert page.eval_on_selector_all("#metrics-table tr.chosen", "rows => rows.map((r) => r.cells[0].textContent)") == [
        "pressure_bar"
    ]

    # A metric's name in that table picks it (`value` is measured at every instant: that second has it).
    other = "temperature_c" if "temperature_c" in [row[0] for row in shown] else "value"
    page.click(f"#metrics-table button:text-is('{other}')")
    page.wait_for_function("(m) => window.kpiDashboard.url.includes('metric=' + m)", arg=other, timeout=20_000)
    assert page.input_value("#metric") == other
    assert _chart_columns(page)[4] == [
        k["reading_count"] for k in Reference.of(readings).buckets("second", metric=other).values()
    ]
    assert page.evaluate("() => document.getElementById('freshness').dataset.metric") == other


def test_dashboard_draws_the_api_values_and_follows_new_data(spark, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is needed: apt-get install -y chromium (make install does it)")
    root = tmp_path / "lake"
    readings = make_readings(seed=3, seconds=90, stragglers=False)
    writer = LakeWriter(spark, LakePaths.from_settings(api_settings(root)))
    # Gold's commit records a watermark 45 s into the readings, as the pipeline's do: the buckets before it are final.
    mark = Watermark("test", 0, None, int((START + timedelta(seconds=45)).timestamp() * 1_000_000))
    spark.conf.set(USER_METADATA_CONF, mark.user_metadata())
    try:
        writer.append(readings, readings)
    finally:
        spark.conf.unset(USER_METADATA_CONF)
    with serving(api_settings(root)) as base, sync_playwright() as playwright:
        profile = tempfile.mkdtemp(prefix="dashboard-profile-")
        browser = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1200, "height": 800},
        )
        try:
            page = browser.pages[0] if browser.pages else browser.new_page()
            requested: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(base + "/")
            page.wait_for_function("() => window.kpiDashboard && window.kpiDashboard.loads >= 1", timeout=20_000)

            url = page.evaluate("() => window.kpiDashboard.url")
            chart = _chart_columns(page)
            assert chart == _api_columns(base, url)
            # The buckets that may still change are drawn as series of their own.
            final = page.evaluate("() => Array.from(window.kpiDashboard.final)")
            assert final == [i["final"] for i in httpx.get(base + url).json()["items"]]
            assert final == [x + 1 <= (START + timedelta(seconds=45)).timestamp() for x in chart[0]]
            assert True in final and False in final
            labels = page.evaluate("() => window.kpiDashboard.chart.series.map((s) => s.label)")
            assert "readings, may still change" in labels and "average, may still change" in labels
            expected = Reference.of(readings).buckets("second")
            assert [int(x) for x in chart[0]] == [int(s.timestamp()) for s in expected]
            assert chart[4] == [k["reading_count"] for k in expected.values()]
            # The canvas really has a drawing on it, not just data behind it.
            painted = page.evaluate(
                """() => { const c = document.querySelector('#chart canvas');
                     const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                     let n = 0; for (let i = 3; i < px.length; i += 4) if (px[i] > 0) n++; return n; }"""
            )
            assert painted > 5000

            # New data lands: a later second from a new device; the page redraws on its own.
            late = [Reading("pump-7", START + timedelta(seconds=95, milliseconds=500), 250.0)]
            readings += late
            writer.append(late, readings)
            page.wait_for_function(
                "(n) => window.kpiDashboard.data[0].length === n", arg=len(expected) + 1, timeout=30_000
            )
            chart = _chart_columns(page)
            assert chart == _api_columns(base, page.evaluate("() => window.kpiDashboard.url"))
            assert chart[1][-1] == 250.0 and chart[4][-1] == 1

            # The append commits gold before it rewrites the rollups, so the page may have drawn the new second
            # while the API still served the older rollups. Wait until the API serves the newest rollups version:
            # the minute view below must compare the chart and the API at one snapshot (a rewrite may move an
            # average by a rounding step).
            newest = _newest_version(root / "rollups")
            deadline = time.monotonic() + 30
            while (
                httpx.get(base + page.evaluate("() => window.kpiDashboard.url")).json()["freshness"]["rollups_version"]
                != newest
            ):
                assert time.monotonic() < deadline, f"the API did not load rollups version {newest}"
                time.sleep(0.1)

            # Choosing a grain and a device draws that series.
            page.select_option("#grain", "minute")
            page.select_option("#device", "pump-1")
            page.wait_for_function("() => window.kpiDashboard.url.includes('device_id=pump-1')", timeout=20_000)
            page.wait_for_function("() => window.kpiDashboard.url.includes('grain=minute')", timeout=20_000)
            minute = Reference.of(readings).buckets("minute", "pump-1")
            chart = _chart_columns(page)
            assert chart[4] == [k["reading_count"] for k in minute.values()]
            assert chart == _api_columns(base, page.evaluate("() => window.kpiDashboard.url"))
            page.select_option("#grain", "second")
            page.select_option("#device", "")
            page.wait_for_function("() => !window.kpiDashboard.url.includes('device_id')", timeout=20_000)
            page.wait_for_function(
                "(n) => window.kpiDashboard.data[0].length === n", arg=len(expected) + 1, timeout=20_000
            )
            _check_metric_picker(page, base, readings)

            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            assert SCREENSHOT.stat().st_size > 10_000
            assert not errors, errors
            # Nothing came from anywhere but this service (no CDN).
            assert requested and all(u.startswith(base) for u in requested), [
                u for u in requested if not u.startswith(base)
            ]
        finally:
            browser.close()
            shutil.rmtree(profile, ignore_errors=True)
    with capsys.disabled():
        print(f"\ndashboard screenshot: {SCREENSHOT}")
