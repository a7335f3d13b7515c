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
# # Data quality: what lands in quarantine, and does every record add up?
#
# Every Kafka record is in bronze. Each one yields readings in silver, rows in quarantine, or both: a batch with
# one bad reading keeps its good siblings. This notebook shows the reasons and checks the accounting.

# %%
import matplotlib.pyplot as plt

from lake.duck import connect
from lake.settings import Settings
from lake.tables import LakePaths

lake = connect(LakePaths.from_settings(Settings()))

# %% [markdown]
# ## Reasons

# %%
reasons = lake.sql("""
    SELECT reason_code, count(*) AS n, count(*) FILTER (WHERE reading_index IS NULL) AS whole_messages,
           any_value(reason) AS example
    FROM quarantine GROUP BY ALL ORDER BY n DESC
""").df()
reasons

# %%
over_time = lake.sql("""
    SELECT date_trunc('minute', kafka_timestamp) AS minute, reason_code, count(*) AS n
    FROM quarantine WHERE kafka_timestamp IS NOT NULL GROUP BY ALL ORDER BY minute
""").df()
if over_time.empty:
    print("nothing in quarantine")
else:
    pivot = over_time.pivot_table(index="minute", columns="reason_code", values="n", aggfunc="sum", fill_value=0)
    pivot.plot(kind="bar", stacked=True, figsize=(10, 4), title="quarantined per minute of arrival")
    plt.tight_layout()
    plt.show()

# %% [markdown]
# ## Per device
#
# A reading that could be attributed to a device (its own `device_id`, or its batch's) is counted against it.

# %%
per_device = lake.sql("""
    SELECT coalesce(json_extract_string(raw, '$.device_id'), '(unknown)') AS device_id, reason_code, count(*) AS n
    FROM quarantine WHERE reading_index IS NOT NULL GROUP BY ALL ORDER BY n DESC
""").df()
per_device.head(20)

# %% [markdown]
# ## Accounting: records to readings
#
# For every bronze record: readings accepted (rows of silver that came from it, before deduplication removed
# repeats, so at most that many) plus readings quarantined, or exactly one message-level quarantine row.

# %%
accounting = lake.sql("""
    WITH accepted AS (SELECT "partition", "offset", count(*) AS n FROM silver GROUP BY ALL),
         rejected AS (SELECT "partition", "offset", count(*) FILTER (WHERE reading_index IS NOT NULL) AS readings,
                             count(*) FILTER (WHERE reading_index IS NULL) AS messages
                      FROM quarantine WHERE reason_code <> 'offsets_lost' GROUP BY ALL)
    SELECT b."partition", count(*) AS records,
           coalesce(sum(a.n), 0) AS readings_in_silver,
           coalesce(sum(r.readings), 0) AS readings_quarantined,
           coalesce(sum(r.messages), 0) AS messages_quarantined,
           count(*) FILTER (WHERE a.n IS NULL AND r."offset" IS NULL) AS records_with_nothing_left
    FROM bronze b
    LEFT JOIN accepted a USING ("partition", "offset")
    LEFT JOIN rejected r USING ("partition", "offset")
    GROUP BY ALL ORDER BY 1
""").df()
accounting

# %% [markdown]
# `records_with_nothing_left` counts records whose every reading was superseded later (exact duplicates and
# corrections keep the winning record in silver); a record with no trace and no later duplicate would be a loss.

# %%
totals = accounting[["records", "readings_in_silver", "readings_quarantined", "messages_quarantined"]].sum()
totals.plot(kind="barh", figsize=(8, 3), title="records and what they became")
plt.tight_layout()
plt.show()
