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
# Picks the device with the most readings (or `DEVICE` below), plots its readings over the fleet's per-second
# average and band, and shows which of its readings were sent more than once or corrected.

# %%
import matplotlib.pyplot as plt

from lake.duck import connect
from lake.settings import Settings
from lake.tables import LakePaths

lake = connect(LakePaths.from_settings(Settings()))
DEVICE = None  # e.g. "pump-0003"

# %%
device = (
    DEVICE
    or lake.sql("SELECT device_id FROM silver GROUP BY ALL ORDER BY count(*) DESC, device_id LIMIT 1").fetchone()[0]
)
readings = lake.sql('SELECT "timestamp", value FROM silver WHERE device_id = $d ORDER BY 1', params={"d": device}).df()
fleet = lake.sql(
    """
    SELECT g."timestamp", g.average_value, g.min_value, g.max_value FROM gold g
    WHERE g."timestamp" BETWEEN (SELECT date_trunc('second', min("timestamp")) FROM silver WHERE device_id = $d)
                            AND (SELECT max("timestamp") FROM silver WHERE device_id = $d)
    ORDER BY 1
""",
    params={"d": device},
).df()
print(f"{device}: {len(readings):,} readings")

# %%
fig, ax = plt.subplots(figsize=(11, 4))
ax.fill_between(fleet["timestamp"], fleet["min_value"], fleet["max_value"], alpha=0.15, label="fleet min–max")
ax.plot(fleet["timestamp"], fleet["average_value"], linewidth=0.8, label="fleet average")
ax.scatter(readings["timestamp"], readings["value"], s=4, color="crimson", label=device)
ax.set_xlabel("time (UTC)")
ax.legend(loc="upper right")
ax.set_title(f"{device} against the fleet")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Duplicates and corrections
#
# Bronze holds every record as sent. Records of this device whose readings were superseded by a later record
# (an exact resend, or a correction with another value) no longer appear in silver's lineage columns.

# %%
lineage = lake.sql(
    """
    SELECT b."partition", b."offset", b.kafka_timestamp, octet_length(b.value) AS bytes,
           count(s."offset") AS readings_it_holds_in_silver
    FROM bronze b LEFT JOIN silver s ON s."partition" = b."partition" AND s."offset" = b."offset"
    WHERE b.key = encode($d)
    GROUP BY ALL ORDER BY b."partition", b."offset"
""",
    params={"d": device},
).df()
superseded = lineage[lineage["readings_it_holds_in_silver"] == 0]
print(f"{len(lineage)} records keyed {device!r}; {len(superseded)} fully superseded by later records")
superseded.head(20)

# %%
per_minute = lake.sql(
    """
    SELECT date_trunc('minute', "timestamp") AS minute, count(*) AS readings, avg(value) AS average
    FROM silver WHERE device_id = $d GROUP BY ALL ORDER BY 1
""",
    params={"d": device},
).df()
fig, ax = plt.subplots(figsize=(11, 3))
ax.bar(per_minute["minute"], per_minute["readings"], width=0.9 / 1440, align="edge")
ax.set_ylabel("readings")
ax.set_xlabel("minute (UTC)")
ax.set_title(f"{device}: readings per minute")
fig.tight_layout()
plt.show()
