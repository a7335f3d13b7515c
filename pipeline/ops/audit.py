"""Accounting of every Kafka record: Kafka's offsets, bronze, readings accepted and quarantined, and the checks
that nothing was lost (contract section 2).

Bronze holds the raw message of every record, so the audit re-reads each one with the current rules and checks
that each reading is either in silver (by identity) or quarantined with its index, and each unreadable message
has exactly one message-level quarantine row. It runs on DuckDB, without Spark.

Offsets that hold no record a `read_committed` reader sees, a transaction's commit or abort marker or an aborted
transaction's record, are asked of Kafka while it still holds them and counted apart: they are not missing.

Records that retention removed (lake.retention: per partition every offset up to a line) are counted apart from
records missing for any other reason, and the checks leave out what retention took away: the quarantine rows of
records no longer in bronze cannot be re-read, nor can records whose quarantine rows are gone be matched to them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import duckdb
import pyarrow as pa
from confluent_kafka import KafkaException

from lake import duck, kafka
from lake.retention import RetentionState, retention_state
from lake.rows import fetch_one
from lake.settings import Settings
from lake.tables import LakePaths, Table
from pipeline.stream.offsets import REASON_CODE as OFFSETS_LOST
from pipeline.stream.parse import Reason, Rules, parse_messages

# Bronze is read in slices of this many records; a slice of 5 MiB messages stays within a few hundred MiB.
_SLICE_RECORDS = 64


@dataclass
class PartitionCounts:
    topic: str
    partition: int
    kafka_first_offset: int | None = None  # the earliest offset Kafka still holds
    kafka_end_offset: int | None = None  # the next offset Kafka will write
    bronze_records: int = 0
    bronze_last_offset: int | None = None
    readings_in_messages: int = 0
    readings_accepted: int = 0
    readings_quarantined: int = 0
    messages_quarantined: int = 0
    offsets_lost: int = 0
    removed_by_retention: int = 0  # bronze records that retention deleted
    retention_through_offset: int | None = None  # retention removed every offset up to this one
    quarantine_removed_by_retention: int = 0  # quarantine rows that retention deleted
    missing_from_bronze: int = 0  # offsets above the retention line and below bronze's last that bronze lacks
    transaction_markers: int = 0  # offsets of transactions' commit and abort markers
    aborted_records: int = 0  # records of aborted transactions, which are never ingested
    transaction_offsets_after_bronze: int = 0  # of those two, the offsets after bronze's last

    @property
    def not_yet_ingested(self) -> int | None:
        if self.kafka_end_offset is None:
            return None
        done = -1 if self.bronze_last_offset is None else self.bronze_last_offset
        return max(0, self.kafka_end_offset - done - 1 - self.transaction_offsets_after_bronze)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class AuditReport:
    partitions: list[PartitionCounts] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    kafka_error: str | None = None

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def totals(self) -> dict[str, int]:
        names = (
            "bronze_records",
            "readings_in_messages",
            "readings_accepted",
            "readings_quarantined",
            "messages_quarantined",
            "offsets_lost",
            "removed_by_retention",
            "quarantine_removed_by_retention",
            "missing_from_bronze",
            "transaction_markers",
            "aborted_records",
        )
        return {name: sum(getattr(p, name) for p in self.partitions) for name in names}

    def as_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "kafka_error": self.kafka_error,
            "partitions": [asdict(p) | {"not_yet_ingested": p.not_yet_ingested} for p in self.partitions],
            "totals": self.totals(),
            "checks": [asdict(c) for c in self.checks],
        }


_REPARSED_SCHEMA = pa.schema(
    [
        ("topic", pa.string()),
        ("partition", pa.int32()),
        ("offset", pa.int64()),
        ("reading_index", pa.int32()),
        ("device_id", pa.string()),
        ("timestamp_us", pa.int64()),
        ("reason_code", pa.string()),
        ("metric", pa.string()),
    ]
)


def _reparse_bronze(connection: duckdb.DuckDBPyConnection, rules: Rules, on_progress: Callable[[int], None]) -> None:
    """Fill the table `reparsed` (in memory): what each bronze record yields under the current rules."""
    connection.execute(
        'CREATE OR REPLACE TABLE reparsed (topic VARCHAR, "partition" INTEGER, "offset" BIGINT, '
        "reading_index INTEGER, device_id VARCHAR, timestamp_us BIGINT, reason_code VARCHAR, metric VARCHAR)"
    )
    reader = connection.execute('SELECT topic, "partition", "offset", value FROM bronze').to_arrow_reader(
        _SLICE_RECORDS
    )
    writer = connection.cursor()
    for batch in reader:
        parsed = parse_messages(batch.column("value").to_pylist(), rules)
        take = pa.array(parsed.source, type=pa.int32())
        slice_ = pa.Table.from_arrays(
            [
                batch.column("topic").take(take),
                batch.column("partition").take(take).cast(pa.int32()),
                batch.column("offset").take(take).cast(pa.int64()),
                pa.array(parsed.reading_index, type=pa.int32()),
                pa.array(parsed.device_id, type=pa.string()),
                pa.array(parsed.timestamp_us, type=pa.int64()),
                pa.array(parsed.reason_code, type=pa.string()),
                pa.array(parsed.metric, type=pa.string()),
            ],
            schema=_REPARSED_SCHEMA,
        )
        writer.register("reparsed_slice", slice_)
        writer.execute("INSERT INTO reparsed SELECT * FROM reparsed_slice")
        writer.unregister("reparsed_slice")
        on_progress(batch.num_rows)
    writer.close()
    # The parser alone does not know the lake's names: a valid reading of a name the `metrics` table lacks was
    # refused by the limit on names (contract section 2).
    known = "SELECT metric FROM metrics" if _has_view(connection, "metrics") else "SELECT NULL::VARCHAR"
    connection.execute(
        f"UPDATE reparsed SET reason_code = '{Reason.METRIC_LIMIT.value}' "
        f"WHERE reason_code IS NULL AND metric NOT IN ({known})"
    )


def _has_view(connection: duckdb.DuckDBPyConnection, name: str) -> bool:
    found = connection.execute("SELECT count(*) FROM duckdb_views() WHERE view_name = $name", {"name": name})
    return bool(fetch_one(found, "the views")[0])


_PER_PARTITION = """
WITH records AS (
    SELECT topic, "partition", count(*) AS records, max("offset") AS last_offset, min("offset") AS first_offset,
           count(*) FILTER (WHERE "offset" > bronze_line(topic, "partition")) AS above_line
    FROM bronze GROUP BY ALL
), readings AS (
    SELECT topic, "partition",
           count(*) FILTER (WHERE reading_index IS NOT NULL) AS in_messages,
           count(*) FILTER (WHERE reason_code IS NULL) AS accepted
    FROM reparsed GROUP BY ALL
), quarantined AS (
    SELECT topic, "partition",
           count(*) FILTER (WHERE reading_index IS NOT NULL AND reason_code <> $lost) AS readings,
           count(*) FILTER (WHERE reading_index IS NULL AND reason_code <> $lost) AS messages,
           count(*) FILTER (WHERE reason_code = $lost) AS gaps
    FROM quarantine GROUP BY ALL
)
SELECT topic, "partition", coalesce(r.records, 0), r.last_offset, coalesce(p.in_messages, 0), coalesce(p.accepted, 0),
       coalesce(q.readings, 0), coalesce(q.messages, 0), coalesce(q.gaps, 0),
       coalesce(l.bronze_rows, 0), l.bronze_through, coalesce(l.quarantine_rows, 0),
       -- the offsets from the first one retention did not remove (or bronze's first) to bronze's last
       coalesce(r.last_offset - CASE WHEN l.bronze_through IS NULL THEN r.first_offset ELSE l.bronze_through + 1 END
                + 1 - r.above_line, 0)
FROM records r FULL JOIN readings p USING (topic, "partition") FULL JOIN quarantined q USING (topic, "partition")
     FULL JOIN retention_lines l USING (topic, "partition")
ORDER BY topic, "partition"
"""

# Each check counts the rows that break it; zero is a pass.
_CHECKS: list[tuple[str, str, str]] = [
    (
        "each Kafka record once in bronze",
        'SELECT count(*) FROM (SELECT topic, "partition", "offset" FROM bronze GROUP BY ALL HAVING count(*) > 1)',
        "records held more than once in bronze",
    ),
    (
        "every valid reading is in silver",
        """SELECT count(*) FROM (SELECT DISTINCT device_id, metric, timestamp_us FROM reparsed
                                 WHERE reason_code IS NULL) r
           ANTI JOIN (SELECT device_id, metric, epoch_us("timestamp") AS timestamp_us FROM silver) s
                USING (device_id, metric, timestamp_us)""",
        "valid readings whose identity is missing from silver",
    ),
    (
        "every invalid reading or message is in quarantine",
        """SELECT count(*) FROM (SELECT * FROM reparsed WHERE reason_code IS NOT NULL
                                 AND "offset" > quarantine_line(topic, "partition")) r
           ANTI JOIN quarantine q ON q.topic = r.topic AND q."partition" = r."partition" AND q."offset" = r."offset"
                AND q.reading_index IS NOT DISTINCT FROM r.reading_index
                AND (q.metric IS NOT DISTINCT FROM r.metric OR q.metric IS NULL AND r.metric = 'value')""",
        "invalid readings or messages without a quarantine row",
    ),
    (
        "quarantine holds only what the current rules reject",
        """SELECT count(*) FROM (SELECT * FROM quarantine WHERE reason_code <> $lost
                                 AND "offset" > bronze_line(topic, "partition")) q
           ANTI JOIN (SELECT * FROM reparsed WHERE reason_code IS NOT NULL) r
                ON q.topic = r.topic AND q."partition" = r."partition" AND q."offset" = r."offset"
                AND q.reading_index IS NOT DISTINCT FROM r.reading_index
                AND (q.metric IS NOT DISTINCT FROM r.metric OR q.metric IS NULL AND r.metric = 'value')""",
        "quarantine rows the current rules accept (`lakehouse replay` moves them) or that match no bronze record",
    ),
    (
        "one quarantine row per reading or message",
        """SELECT count(*) FROM (SELECT topic, "partition", "offset", reading_index, metric FROM quarantine
           WHERE reason_code <> $lost GROUP BY ALL HAVING count(*) > 1)""",
        "readings or messages quarantined more than once",
    ),
    (
        "accepted + quarantined = readings in the message",
        """SELECT count(*) FROM (
             SELECT topic, "partition", "offset", count(*) FILTER (WHERE reason_code IS NULL) AS accepted,
                    count(*) FILTER (WHERE reason_code IS NOT NULL AND reading_index IS NULL) AS message_level,
                    count(*) FILTER (WHERE reading_index IS NOT NULL) AS readings
             FROM reparsed WHERE "offset" > quarantine_line(topic, "partition") GROUP BY ALL
           ) r LEFT JOIN (
             SELECT topic, "partition", "offset", count(*) FILTER (WHERE reading_index IS NOT NULL) AS quarantined,
                    count(*) FILTER (WHERE reading_index IS NULL) AS message_level
             FROM quarantine WHERE reason_code <> $lost GROUP BY ALL
           ) q USING (topic, "partition", "offset")
           WHERE CASE WHEN r.message_level > 0 THEN coalesce(q.message_level, 0) <> 1 OR coalesce(q.quarantined, 0) <> 0
                      ELSE r.accepted + coalesce(q.quarantined, 0) <> r.readings OR coalesce(q.message_level, 0) <> 0 END""",
        "bronze records whose accepted and quarantined readings do not add up to the readings in the message",
    ),
]


def _retention_lines(connection: duckdb.DuckDBPyConnection, bronze: RetentionState, quarantine: RetentionState) -> None:
    """The table `retention_lines` (per partition what retention removed from bronze and quarantine) and the macros
    `bronze_line` and `quarantine_line`: the partition's highest offset retention removed, -1 for none."""
    keys = sorted(set(bronze.lines()) | set(quarantine.lines()))
    lines = pa.table(
        {
            "topic": pa.array([topic for topic, _ in keys], pa.string()),
            "partition": pa.array([partition for _, partition in keys], pa.int32()),
            "bronze_through": pa.array([bronze.lines().get(key) for key in keys], pa.int64()),
            "bronze_rows": pa.array(
                [bronze.removed[key].rows if key in bronze.removed else 0 for key in keys], pa.int64()
            ),
            "quarantine_through": pa.array([quarantine.lines().get(key) for key in keys], pa.int64()),
            "quarantine_rows": pa.array(
                [quarantine.removed[key].rows if key in quarantine.removed else 0 for key in keys], pa.int64()
            ),
        }
    )
    connection.register("retention_lines_arrow", lines)
    connection.execute("CREATE OR REPLACE TABLE retention_lines AS SELECT * FROM retention_lines_arrow")
    connection.unregister("retention_lines_arrow")
    # The macros' own copy names its key columns apart: in a macro's subquery, `topic` would bind to its own table.
    connection.execute(
        'CREATE OR REPLACE TABLE retention_lookup AS SELECT topic AS line_topic, "partition" AS line_partition, '
        "bronze_through, quarantine_through FROM retention_lines"
    )
    for table in ("bronze", "quarantine"):
        connection.execute(
            f"""CREATE OR REPLACE MACRO {table}_line(t, p) AS coalesce((SELECT {table}_through FROM retention_lookup
                WHERE line_topic = t AND line_partition = p), -1)"""
        )


def _unfinished_runs(states: dict[str, RetentionState]) -> Check:
    unfinished = [name for name, state in states.items() if state.pending is not None]
    if not unfinished:
        return Check("retention runs finished", True, "ok")
    return Check(
        "retention runs finished",
        False,
        f"a retention run on {' and '.join(unfinished)} was interrupted (bronze may accept deletes until it is "
        "finished); run `lakehouse maintain` to finish it",
    )


def _kafka_offsets(settings: Settings, partitions: dict[tuple[str, int], PartitionCounts]) -> str | None:
    """Fill Kafka's first and end offsets per partition of the topic; an error message if Kafka cannot be asked."""
    from confluent_kafka import KafkaException

    try:
        found = kafka.watermarks(settings, timeout_s=10, group="kpi-lakehouse-audit")
    except KafkaException as exc:
        return f"cannot read offsets from Kafka at {settings.kafka_bootstrap}: {exc}"
    for (topic, number), marks in found.items():
        counts = partitions.setdefault((topic, number), PartitionCounts(topic, number))
        counts.kafka_first_offset, counts.kafka_end_offset = marks.low, marks.high
    return None


# The offsets after bronze's last are read for transaction markers up to this many; past it, a backlog.
_TAIL_OFFSETS = 10_000
_GAPS = """
SELECT topic, "partition", "offset" + 1 AS first, next_offset - 1 AS last FROM (
    SELECT topic, "partition", "offset", lead("offset") OVER (PARTITION BY topic, "partition" ORDER BY "offset") AS next_offset
    FROM bronze WHERE "offset" > bronze_line(topic, "partition")
) WHERE next_offset > "offset" + 1 ORDER BY ALL
"""


def _transaction_offsets(
    settings: Settings, connection: duckdb.DuckDBPyConnection, partitions: dict[tuple[str, int], PartitionCounts]
) -> None:
    """Count the offsets bronze lacks that hold a transaction's marker or an aborted record, between bronze's
    records and after its last one, where Kafka still holds them; those between are no longer `missing`."""
    gaps = [kafka.OffsetRange(*row) for row in connection.execute(_GAPS).fetchall()]
    tail_from = len(gaps)
    for counts in partitions.values():
        if counts.kafka_end_offset is not None:
            first = 0 if counts.bronze_last_offset is None else counts.bronze_last_offset + 1
            # A backlog is not read here: its offsets stay "not yet ingested".
            if 0 < counts.kafka_end_offset - first <= _TAIL_OFFSETS:
                gaps.append(kafka.OffsetRange(counts.topic, counts.partition, first, counts.kafka_end_offset - 1))
    # Only what Kafka still holds. Kafka's end offset, as a read_committed client is told it, is the last stable
    # offset: an open transaction's records, which may still commit, lie past it and are read by nobody yet.
    held = []
    for index, gap in enumerate(gaps):
        known = partitions.get((gap.topic, gap.partition))
        if known is not None and known.kafka_first_offset is not None:
            first = max(gap.first, known.kafka_first_offset)
            if first <= gap.last:
                held.append((index, kafka.OffsetRange(gap.topic, gap.partition, first, gap.last)))
    if not held:
        return
    ranges = [gap for _, gap in held]
    committed = kafka.records_in(settings, ranges, committed=True)
    seen = kafka.records_in(settings, ranges, committed=False)
    for (index, gap), readable, any_record in zip(held, committed, seen, strict=True):
        counts = partitions[(gap.topic, gap.partition)]
        markers, aborted = gap.size - any_record, any_record - readable
        counts.transaction_markers += markers
        counts.aborted_records += aborted
        if index >= tail_from:
            counts.transaction_offsets_after_bronze += markers + aborted
        else:
            counts.missing_from_bronze -= markers + aborted


def audit(settings: Settings, on_progress: Callable[[int, int], None] | None = None, kafka: bool = True) -> AuditReport:
    """Count and check the lake; `on_progress(done, total)` follows the re-reading of bronze."""
    paths = LakePaths.from_settings(settings)
    missing = [t.value for t in Table if not duck.table_exists(paths, t)]
    if missing:
        raise duck.LakeError(
            f"the lake at {paths.root} has no {', '.join(missing)} table yet; run `lakehouse pipeline`"
        )
    connection = duck.connect(paths)
    total = fetch_one(connection.execute("SELECT count(*) FROM bronze"), "the count of bronze")[0]
    done = 0

    def advance(rows: int) -> None:
        nonlocal done
        done += rows
        if on_progress:
            on_progress(done, total)

    _reparse_bronze(connection, Rules.from_settings(settings), advance)
    retained = {table.value: retention_state(paths, table) for table in (Table.BRONZE, Table.QUARANTINE)}
    _retention_lines(connection, retained["bronze"], retained["quarantine"])
    report = AuditReport()
    partitions: dict[tuple[str, int], PartitionCounts] = {}
    for row in connection.execute(_PER_PARTITION, {"lost": OFFSETS_LOST}).fetchall():
        topic, partition, *numbers = row
        counts = PartitionCounts(topic, partition)
        (
            counts.bronze_records,
            counts.bronze_last_offset,
            counts.readings_in_messages,
            counts.readings_accepted,
            counts.readings_quarantined,
            counts.messages_quarantined,
            counts.offsets_lost,
            counts.removed_by_retention,
            counts.retention_through_offset,
            counts.quarantine_removed_by_retention,
            counts.missing_from_bronze,
        ) = numbers
        partitions[(topic, partition)] = counts
    if kafka:
        report.kafka_error = _kafka_offsets(settings, partitions)
        if report.kafka_error is None:
            try:
                _transaction_offsets(settings, connection, partitions)
            except KafkaException as exc:
                report.kafka_error = f"cannot read offsets bronze lacks from Kafka at {settings.kafka_bootstrap}: {exc}"
    report.partitions = [partitions[key] for key in sorted(partitions)]
    for name, query, meaning in _CHECKS:
        parameters = {"lost": OFFSETS_LOST} if "$lost" in query else {}
        failures = fetch_one(connection.execute(query, parameters), f"the check {name!r}")[0]
        report.checks.append(Check(name, failures == 0, "ok" if failures == 0 else f"{failures:,} {meaning}"))
    report.checks.append(_unfinished_runs(retained))
    connection.close()
    return report
