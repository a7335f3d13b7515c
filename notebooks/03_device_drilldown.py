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
# # One device against the fleet
#
# Picks the device with the most readings (or `DEVICE` below), plots its readings of each metric it sends (or of
# `METRIC` alone) over the fleet's per-second average and band of that metric, and shows which of its readings
# were sent more than once or corrected.

# %%
import math

import matplotlib.pyplot as plt

from lake.duck import connect
from lake.settings import Settings
from lake.tables import LakePaths

lake = connect(LakePaths.from_settings(Settings()))
DEVICE = None  # e.g. "pump-0003"
METRIC = None  # e.g. "temperature_c"; None plots every metric the device sends

# %%
device = (
    DEVICE
    or lake.sql("SELECT device_id FROM silver GROUP BY ALL ORDER BY count(*) DESC, device_id LIMIT 1").fetchone()[0]
)
sends = lake.sql(
    """
    SELECT metric, count(*) AS readings, min("timestamp") AS first_reading, max("timestamp") AS last_reading
    FROM silver WHERE device_id = $d GROUP BY ALL ORDER BY metric
""",
    params={"d": device},
).df()
if METRIC is not None and METRIC not in set(sends["metric"]):
    raise ValueError(f"{device} sends no metric {METRIC!r}; it sends {list(sends['metric'])}")
shown = [METRIC] if METRIC is not None else list(sends["metric"][:12])
readings = lake.sql(
    """
    SELECT metric, "timestamp", value FROM silver WHERE device_id = $d AND list_contains($shown, metric)
    ORDER BY metric, "timestamp"
""",
    params={"d": device, "shown": shown},
).df()
fleet = lake.sql(
    """
    SELECT g.metric, g."timestamp", g.average_value, g.min_value, g.max_value FROM gold g
    WHERE list_contains($shown, g.metric)
      AND g."timestamp" BETWEEN (SELECT date_trunc('second', min("timestamp")) FROM silver WHERE device_id = $d)
                            AND (SELECT max("timestamp") FROM silver WHERE device_id = $d)
    ORDER BY 1, 2
""",
    params={"d": device, "shown": shown},
).df()
print(f"{device}: {int(sends['readings'].sum()):,} readings of {len(sends)} metrics")
sends

# %%
columns = min(2, len(shown))
rows = math.ceil(len(shown) / columns)
fig, axes = plt.subplots(rows, columns, figsize=(11, 3.2 * rows), sharex=True, squeeze=False)
for axis, name in zip(axes.flat, shown, strict=False):
    band, own = fleet[fleet["metric"] == name], readings[readings["metric"] == name]
    axis.fill_between(band["timestamp"], band["min_value"], band["max_value"], alpha=0.15, label="fleet min–max")
    axis.plot(band["timestamp"], band["average_value"], linewidth=0.8, label="fleet average")
    axis.scatter(own["timestamp"], own["value"], s=4, color="crimson", label=device)
    axis.set_title(name, fontsize=10)
    axis.tick_params(axis="x", labelrotation=30, labelsize=8)
for axis in axes.flat[len(shown) :]:
    axis.set_visible(False)
axes.flat[0].legend(loc="upper right", fontsize=8)
fig.suptitle(f"{device} against the fleet (UTC)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Duplicates and corrections
#
# Bronze holds every record as sent. Records of this device whose readings were superseded by a later record
# (an exact resend, or a correction with another value) no longer appear in silver's lineage columns; records
# whose readings were all set aside are in quarantine instead.

# %%
lineage = lake.sql(
    """
    WITH kept AS (SELECT topic, "partition", "offset", count(*) AS n FROM silver GROUP BY ALL),
         set_aside AS (SELECT topic, "partition", "offset", count(*) AS n FROM quarantine GROUP BY ALL)
    SELECT b."partition", b."offset", b.kafka_timestamp, octet_length(b.value) AS bytes,
           coalesce(kept.n, 0) AS rows_it_holds_in_silver, coalesce(set_aside.n, 0) AS rows_in_quarantine
    FROM bronze b
    LEFT JOIN kept USING (topic, "partition", "offset")
    LEFT JOIN set_aside USING (topic, "partition", "offset")
    WHERE b.key = encode($d)
    ORDER BY b."partition", b."offset"
""",
    params={"d": device},
).df()
superseded = lineage[(lineage["rows_it_holds_in_silver"] == 0) & (lineage["rows_in_quarantine"] == 0)]
print(f"{len(lineage)} records keyed {device!r}; {len(superseded)} fully superseded by later records")
superseded.head(20)

# %%
per_minute = lake.sql(
    """
    SELECT date_trunc('minute', "timestamp") AS minute, metric, count(*) AS readings
    FROM silver WHERE device_id = $d GROUP BY ALL ORDER BY 1, 2
""",
    params={"d": device},
).df()
fig, ax = plt.subplots(figsize=(11, 3))
for name, counts in per_minute.groupby("metric"):
    ax.step(counts["minute"], counts["readings"], where="post", linewidth=1, label=name)
ax.set_ylabel("readings")
ax.set_xlabel("minute (UTC)")
ax.set_title(f"{device}: readings per minute, per metric")
ax.legend(loc="upper right", fontsize=8)
fig.tight_layout()
plt.show()
