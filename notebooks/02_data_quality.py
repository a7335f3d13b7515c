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
# # Data quality: what lands in quarantine, and does every record add up?
#
# Every Kafka record is in bronze. Each one yields readings in silver, rows in quarantine, or both: a batch with
# one bad reading keeps its good siblings, and a reading with one bad metric keeps its other metrics. This notebook
# shows the reasons, per metric, and checks the accounting.

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
# ## Per metric
#
# A bad metric name (`bad_metric`) or value (`bad_value`) sets that metric aside alone, named in `metric`, and the
# reading's other metrics are kept. `metric` is null when the problem is not about one metric: a message that
# cannot be read (`reading_index` null too), or a reading without a timestamp or with both `value` and `metrics`.

# %%
per_metric = lake.sql("""
    SELECT metric, reason_code, count(*) AS n, count(*) FILTER (WHERE reading_index IS NULL) AS whole_messages
    FROM quarantine GROUP BY ALL ORDER BY metric NULLS FIRST, n DESC
""").df()
per_metric

# %%
if per_metric.empty:
    print("nothing in quarantine")
else:
    labelled = per_metric.fillna({"metric": "(not one metric)"})
    pivot = labelled.pivot_table(index="metric", columns="reason_code", values="n", aggfunc="sum", fill_value=0)
    pivot.plot(kind="barh", stacked=True, figsize=(10, 1 + 0.4 * len(pivot)), title="quarantined per metric")
    plt.xlabel("rows")
    plt.tight_layout()
    plt.show()

# %% [markdown]
# ## Per device
#
# A reading that could be attributed to a device (its own `device_id`, or its batch's, read from the message in
# bronze once per record) is counted against it.

# %%
per_device = lake.sql("""
    WITH records AS (SELECT DISTINCT topic, "partition", "offset" FROM quarantine WHERE reading_index IS NOT NULL),
         batches AS (SELECT topic, "partition", "offset", json_extract_string(decode(b.value), '$.device_id') AS batch
                     FROM bronze b JOIN records USING (topic, "partition", "offset"))
    SELECT coalesce(json_extract_string(q.raw, '$.device_id'), batches.batch, '(unknown)') AS device_id,
           reason_code, count(*) AS n
    FROM quarantine q LEFT JOIN batches USING (topic, "partition", "offset")
    WHERE q.reading_index IS NOT NULL GROUP BY ALL ORDER BY n DESC, device_id, reason_code
""").df()
per_device.head(20)

# %% [markdown]
# ## Accounting: records to readings
#
# For every bronze record: metric readings accepted (rows of silver that came from it, one per metric of each
# reading, after deduplication removed repeats, so at most as many as it carried) plus readings or single metrics
# quarantined, or exactly one message-level quarantine row.

# %%
accounting = lake.sql("""
    WITH accepted AS (SELECT "partition", "offset", count(*) AS n FROM silver GROUP BY ALL),
         rejected AS (SELECT "partition", "offset", count(*) FILTER (WHERE reading_index IS NOT NULL) AS readings,
                             count(*) FILTER (WHERE reading_index IS NULL) AS messages
                      FROM quarantine WHERE reason_code <> 'offsets_lost' GROUP BY ALL)
    SELECT b."partition", count(*) AS records,
           coalesce(sum(a.n), 0) AS silver_rows,
           coalesce(sum(r.readings), 0) AS readings_or_metrics_quarantined,
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
totals = accounting[["records", "silver_rows", "readings_or_metrics_quarantined", "messages_quarantined"]].sum()
totals.plot(kind="barh", figsize=(8, 3), title="records and what they became")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Lateness: event time against Kafka time
#
# A reading's delay is its Kafka record's time (the broker's append time) minus its own `timestamp`. A reading is
# *late* when it arrived after the watermark had passed its second (README, "Late data"): it still counts, and its
# buckets show `late_readings` and a higher `revision`. A negative delay means the device's clock runs ahead.
# Silver holds a row per metric of a reading; the readings below are the instants, counted once.

# %%
watermark = lake.sql("SELECT watermark FROM watermark").fetchone()[0]
print(f"watermark (buckets ending at or before it are final): {watermark}")
lake.sql("""
    CREATE OR REPLACE TEMP VIEW arrivals AS
    SELECT DISTINCT device_id, "timestamp", kafka_timestamp, arrival_watermark FROM silver
    WHERE kafka_timestamp IS NOT NULL
""")
delays = lake.sql("""
    SELECT device_id, epoch(kafka_timestamp - "timestamp") AS delay_s,
           coalesce(arrival_watermark >= date_trunc('second', "timestamp") + INTERVAL 1 SECOND, false) AS late
    FROM arrivals
""").df()
if delays.empty:
    print("no readings with a Kafka time yet")
else:
    fig, axis = plt.subplots(figsize=(10, 4))
    on_time, late = delays[~delays.late].delay_s, delays[delays.late].delay_s
    bins = 50
    axis.hist([on_time, late], bins=bins, stacked=True, label=["on time", "late"], color=["#8fb8f0", "#d9822b"])
    axis.set_xlabel("delay: Kafka time - event time (s)")
    axis.set_ylabel("readings")
    axis.set_yscale("log")
    axis.legend()
    axis.set_title("how late readings reach Kafka")
    plt.tight_layout()
    plt.show()

# %% [markdown]
# The worst offenders: devices by late readings, with their median and worst delay.

# %%
offenders = lake.sql("""
    SELECT device_id, count(*) AS readings,
           count(*) FILTER (WHERE arrival_watermark >= date_trunc('second', "timestamp") + INTERVAL 1 SECOND) AS late,
           round(100.0 * late / readings, 2) AS late_percent,
           round(median(epoch(kafka_timestamp - "timestamp")), 3) AS median_delay_s,
           round(max(epoch(kafka_timestamp - "timestamp")), 3) AS worst_delay_s
    FROM arrivals GROUP BY ALL ORDER BY late DESC, worst_delay_s DESC LIMIT 15
""").df()
offenders

# %% [markdown]
# Buckets that changed after they were final (per metric and second), by how many late readings.

# %%
lake.sql("""
    SELECT metric, "timestamp", reading_count, revision, late_readings
    FROM gold WHERE final AND late_readings > 0 ORDER BY late_readings DESC, "timestamp", metric LIMIT 20
""").df()
