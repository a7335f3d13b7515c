# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Quickstart: the lake through DuckDB
#
# Opens the Delta tables that `lakehouse pipeline` writes, with the same views as `lakehouse sql`:
# `bronze` (raw Kafka records), `silver` (valid, deduplicated readings, one row per metric), `gold` (KPIs per
# metric and second), `metrics` (the metric names the lake knows) and `quarantine` (what could not be used, and
# why). The lake is the one `LAKEHOUSE_LAKE_ROOT` points at.
#
# Set `METRIC` to the metric to look at closely; the last plot shows every metric of the fleet side by side.

# %%
import math

import matplotlib.pyplot as plt

from lake.duck import connect
from lake.settings import Settings
from lake.tables import LakePaths

METRIC = None  # e.g. "temperature_c"; None takes the metric with the most readings

settings = Settings()
lake = connect(LakePaths.from_settings(settings))
print("lake:", settings.lake_root)

# %% [markdown]
# ## What arrived, what was kept, what was set aside

# %%
lake.sql("""
    SELECT 'bronze' AS "table", count(*) AS "rows" FROM bronze
    UNION ALL SELECT 'silver', count(*) FROM silver
    UNION ALL SELECT 'gold', count(*) FROM gold
    UNION ALL SELECT 'metrics', count(*) FROM metrics
    UNION ALL SELECT 'quarantine', count(*) FROM quarantine
""").df()

# %%
lake.sql(
    'SELECT "partition", count(*) AS records, sum(octet_length(value)) AS bytes FROM bronze GROUP BY ALL ORDER BY 1'
).df()

# %%
lake.sql('SELECT * FROM silver ORDER BY "timestamp", device_id, metric LIMIT 5').df()

# %% [markdown]
# Quarantined rows by metric and reason: `metric` names the metric whose name or value was bad, and is empty when
# the problem was not about one metric (a message that could not be read, a reading without a timestamp).

# %%
lake.sql("SELECT metric, reason_code, count(*) AS n FROM quarantine GROUP BY ALL ORDER BY n DESC").df()

# %% [markdown]
# ## Metrics
#
# The names the lake knows, with how many readings and devices each has.

# %%
metrics = lake.sql("""
    SELECT m.metric, count(s.metric) AS readings, count(DISTINCT s.device_id) AS devices,
           min(s."timestamp") AS first_reading, max(s."timestamp") AS last_reading, m.first_seen
    FROM metrics m LEFT JOIN silver s USING (metric)
    GROUP BY ALL ORDER BY readings DESC, m.metric
""").df()
metric = METRIC or (metrics["metric"].iloc[0] if len(metrics) else "value")
if metric not in set(metrics["metric"]):
    raise ValueError(f"the lake knows no metric {metric!r}; it knows {sorted(metrics['metric'])[:20]}")
print("METRIC:", metric)
metrics

# %% [markdown]
# ## KPIs of one metric over time
#
# The average per second with its min–max band, and the number of readings behind each second.

# %%
gold = lake.sql('SELECT * FROM gold WHERE metric = $metric ORDER BY "timestamp"', params={"metric": metric}).df()
fig, (band, counts) = plt.subplots(2, 1, sharex=True, figsize=(11, 6), height_ratios=[2, 1])
band.fill_between(gold["timestamp"], gold["min_value"], gold["max_value"], alpha=0.25, label="min–max")
band.plot(gold["timestamp"], gold["average_value"], linewidth=1, label="average")
band.set_ylabel(metric)
band.legend(loc="upper right")
counts.step(gold["timestamp"], gold["reading_count"], where="post", linewidth=1)
counts.set_ylabel("readings per second")
counts.set_xlabel("time (UTC)")
fig.suptitle(f"{metric}: {len(gold):,} seconds, {int(gold['reading_count'].sum()):,} readings")
fig.tight_layout()
plt.show()

# %%
gold.describe()

# %% [markdown]
# ## Every metric of the fleet
#
# One panel per metric (the twelve with the most readings): the fleet's average per second and its min–max band.
# Values of different metrics are never combined, so each panel has its own scale.

# %%
shown = list(metrics["metric"][:12])
series = lake.sql(
    """
    SELECT metric, "timestamp", average_value, min_value, max_value FROM gold
    WHERE list_contains($shown, metric) ORDER BY metric, "timestamp"
""",
    params={"shown": shown},
).df()
columns = min(3, max(1, len(shown)))
rows = max(1, math.ceil(len(shown) / columns))
fig, axes = plt.subplots(rows, columns, figsize=(4 * columns + 1, 2.6 * rows), sharex=True, squeeze=False)
for axis, name in zip(axes.flat, shown, strict=False):
    one = series[series["metric"] == name]
    axis.fill_between(one["timestamp"], one["min_value"], one["max_value"], alpha=0.25)
    axis.plot(one["timestamp"], one["average_value"], linewidth=0.8)
    axis.set_title(name, fontsize=10)
    axis.tick_params(axis="x", labelrotation=30, labelsize=8)
for axis in axes.flat[len(shown) :]:
    axis.set_visible(False)
fig.suptitle("the fleet's metrics: average per second and min–max band (UTC)")
fig.tight_layout()
plt.show()
