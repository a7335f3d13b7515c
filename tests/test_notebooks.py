"""The notebooks on a lake of named metrics: the demo's fleet (Makefile, DEMO_FLEET: pumps with four metrics, in
time order, a share of broken input) produced by `lakehouse produce` and run through the real pipeline. Each
notebook's script runs here, so that its tables and choices can be checked; tests/test_lake_tools.py keeps the
.ipynb pairs in sync and runs them as notebooks."""

from __future__ import annotations

import re
import shlex
from typing import Any

import pytest

from bench.processes import lakehouse
from lake.settings import Settings
from lake.tables import METRIC_NAME, LakePaths
from tests.conftest import REPO, sized_settings

pytestmark = [pytest.mark.kafka, pytest.mark.spark]

DEMO_METRICS = ["pressure_bar", "flow_m3h", "temperature_c", "battery_pct"]
# The demo's fleet, smaller: later flags win.
SMALLER = ["--devices", "8", "--messages", "600", "--full-batches", "0", "--span-seconds", "300", "--bad-share", "0.03"]


def demo_fleet_flags() -> list[str]:
    makefile = (REPO / "Makefile").read_text()
    found = re.search(r"^DEMO_FLEET :=((?:.*\\\n)*.*)$", makefile, re.MULTILINE)
    assert found, "the Makefile defines no DEMO_FLEET"
    return shlex.split(found.group(1).replace("\\\n", " "))


@pytest.fixture(scope="module")
def metrics_lake(broker, spark, tmp_path_factory: pytest.TempPathFactory) -> Settings:  # type: ignore[no-untyped-def]
    from pipeline.kafka.broker import ensure_topic
    from pipeline.stream.job import run

    settings = sized_settings(tmp_path_factory.mktemp("metrics_lake"), "notebook-metrics")
    ensure_topic(settings)
    flags = demo_fleet_flags()
    assert {"--in-order", "--metrics", "--bad-share"} <= set(flags)
    sent = lakehouse(settings, "produce", *flags, *SMALLER, timeout=300)
    assert sent.returncode == 0, sent.stderr
    run(settings, available_now=True, spark=spark)
    return settings


def run_script(name: str, lake: Settings, monkeypatch: pytest.MonkeyPatch, **choices: str) -> dict[str, Any]:
    """Run a notebook's script as the notebook runs it (the lake from LAKEHOUSE_LAKE_ROOT), with `choices` in place
    of its settings at the top (METRIC = None, ...); returns its variables."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setenv("LAKEHOUSE_LAKE_ROOT", lake.lake_root)
    monkeypatch.chdir(REPO)
    script = REPO / "notebooks" / f"{name}.py"
    source = script.read_text()
    for setting, value in choices.items():
        assert f"\n{setting} = None" in source, f"{name} has no {setting} at the top"
        source = source.replace(f"\n{setting} = None", f"\n{setting} = {value!r}", 1)
    plt.close("all")
    namespace: dict[str, Any] = {"__name__": "__main__", "__file__": str(script)}
    exec(compile(source, str(script), "exec"), namespace)  # noqa: S102 - the repository's own notebook
    namespace["figures"] = len(plt.get_fignums())
    plt.close("all")
    return namespace


def quarantine_counts(lake: Settings) -> dict[tuple[str | None, str], int]:
    from lake.duck import connect

    rows = connect(LakePaths.from_settings(lake)).sql(
        "SELECT metric, reason_code, count(*) FROM quarantine GROUP BY ALL"
    )
    return {(metric, code): n for metric, code, n in rows.fetchall()}


def test_quickstart_looks_at_the_busiest_metric_and_plots_every_metric(
    metrics_lake: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    found = run_script("01_quickstart", metrics_lake, monkeypatch)
    metrics = found["metrics"]
    assert sorted(metrics["metric"]) == sorted(DEMO_METRICS)
    assert found["metric"] == metrics.sort_values(["readings", "metric"], ascending=[False, True])["metric"].iloc[0]
    assert set(found["gold"]["metric"]) == {found["metric"]}
    assert sorted(found["shown"]) == sorted(DEMO_METRICS) and set(found["series"]["metric"]) == set(DEMO_METRICS)
    assert found["figures"] >= 2

    chosen = run_script("01_quickstart", metrics_lake, monkeypatch, METRIC="battery_pct")
    assert chosen["metric"] == "battery_pct" and set(chosen["gold"]["metric"]) == {"battery_pct"}
    with pytest.raises(ValueError, match="the lake knows no metric 'rpm'"):
        run_script("01_quickstart", metrics_lake, monkeypatch, METRIC="rpm")


def test_data_quality_counts_the_quarantine_per_metric_and_reason(
    metrics_lake: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    found = run_script("02_data_quality", metrics_lake, monkeypatch)
    per_metric = found["per_metric"]
    counted = {
        (None if row.metric is None or row.metric != row.metric else row.metric, row.reason_code): row.n
        for row in per_metric.itertuples()
    }
    assert counted == quarantine_counts(metrics_lake)
    codes = {code for _, code in counted}
    assert {"bad_metric", "bad_value", "bad_shape", "missing_timestamp", "not_json"} <= codes
    for metric, code in counted:
        if code in ("bad_metric", "bad_value"):
            assert metric is not None and bool(METRIC_NAME.fullmatch(metric)) == (code == "bad_value")
        else:
            assert metric is None, (metric, code)
    assert found["figures"] >= 3


def test_drilldown_plots_each_metric_the_device_sends_or_the_one_chosen(
    metrics_lake: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    found = run_script("03_device_drilldown", metrics_lake, monkeypatch)
    sends = list(found["sends"]["metric"])
    assert set(sends) <= set(DEMO_METRICS) and found["shown"] == sends
    assert set(found["readings"]["metric"]) == set(sends) == set(found["fleet"]["metric"])
    assert found["figures"] >= 2

    from lake.duck import connect

    lake = connect(LakePaths.from_settings(metrics_lake))
    (device,) = lake.sql("SELECT min(device_id) FROM silver WHERE metric = 'temperature_c'").fetchall()[0]
    chosen = run_script("03_device_drilldown", metrics_lake, monkeypatch, DEVICE=device, METRIC="temperature_c")
    assert chosen["device"] == device and chosen["shown"] == ["temperature_c"]
    assert set(chosen["readings"]["metric"]) == {"temperature_c"}
