# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Quickstart: the lake through DuckDB
#
# Opens the Delta tables that `lakehouse pipeline` writes, with the same views as `lakehouse sql`:
# `bronze` (raw Kafka records), `silver` (valid, deduplicated readings), `gold` (KPIs per second) and
# `quarantine` (what could not be used, and why). The lake is the one `LAKEHOUSE_LAKE_ROOT` points at.

# %%
import matplotlib.pyplot as plt

from lake.duck import connect
from lake.settings import Settings
from lake.tables import LakePaths

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
    UNION ALL SELECT 'quarantine', count(*) FROM quarantine
""").df()

# %%
lake.sql(
    'SELECT "partition", count(*) AS records, sum(octet_length(value)) AS bytes FROM bronze GROUP BY ALL ORDER BY 1'
).df()

# %%
lake.sql('SELECT * FROM silver ORDER BY "timestamp" LIMIT 5').df()

# %%
lake.sql("SELECT reason_code, count(*) AS n FROM quarantine GROUP BY ALL ORDER BY n DESC").df()

# %% [markdown]
# ## KPIs over time
#
# The average per second with its min–max band, and the number of readings behind each second.

# %%
gold = lake.sql('SELECT * FROM gold ORDER BY "timestamp"').df()
fig, (band, counts) = plt.subplots(2, 1, sharex=True, figsize=(11, 6), height_ratios=[2, 1])
band.fill_between(gold["timestamp"], gold["min_value"], gold["max_value"], alpha=0.25, label="min–max")
band.plot(gold["timestamp"], gold["average_value"], linewidth=1, label="average")
band.set_ylabel("value")
band.legend(loc="upper right")
counts.step(gold["timestamp"], gold["reading_count"], where="post", linewidth=1)
counts.set_ylabel("readings per second")
counts.set_xlabel("time (UTC)")
fig.suptitle(f"{len(gold):,} seconds, {int(gold['reading_count'].sum()):,} readings")
fig.tight_layout()
plt.show()

# %%
gold.describe()
