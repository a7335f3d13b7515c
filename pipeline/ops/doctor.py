"""`lakehouse doctor`: checks the set-up facts users get wrong, message size limits first, and says what to change.

A message at LAKEHOUSE_MAX_MESSAGE_BYTES must pass the producer, the topic, the broker and Spark's Kafka consumer;
each layer has its own setting, and the smallest one wins.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lake import checkpoint, kafka, objectstore
from lake.errors import LakeError, ObjectStoreError
from lake.settings import Settings, local_path
from lake.tables import LakePaths

if TYPE_CHECKING:
    from confluent_kafka.admin import AdminClient, ConfigEntry, ConfigResource

OK, WARN, FAIL = "ok", "warn", "fail"
# What a record batch holding one message adds to the message's own size (headers, key, batch framing).
FRAMING_BYTES = 1024
GIB = 1024**3


@dataclass
class Finding:
    check: str
    status: str
    detail: str
    fix: str = ""


def _size(n: int) -> str:
    return f"{n:,} B ({n / 1024 / 1024:.2f} MiB)"


def _java() -> Finding:
    if shutil.which("java") is None:
        return Finding(
            "Java", FAIL, "no `java` on PATH", "install a JDK 17+ (Debian: apt-get install openjdk-17-jre-headless)"
        )
    out = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr
    match = re.search(r'version "(\d+)', out)
    major = int(match.group(1)) if match else 0
    if major < 17:
        return Finding("Java", FAIL, f"java {major or 'of unknown version'} found", "Spark 4 needs Java 17 or 21")
    return Finding("Java", OK, f"java {major}")


def _jars(settings: Settings) -> Finding:
    from pipeline.jvm import jars

    try:
        spark_jars = jars.spark_jars(settings.home)
    except Exception as exc:  # noqa: BLE001 - the message of a missing folder is the finding
        return Finding("JVM jars", FAIL, str(exc), "run `lakehouse setup`")
    return Finding("JVM jars", OK, f"{len(spark_jars)} jars for Spark under {settings.home / 'jars'}")


def _duckdb() -> Finding:
    from lake import duck

    try:
        path = duck.delta_extension()
    except duck.LakeError as exc:
        return Finding("DuckDB delta extension", FAIL, str(exc), "pip install duckdb-extension-delta==<duckdb version>")
    return Finding("DuckDB delta extension", OK, str(path.name))


def _configs(admin: AdminClient, resource: ConfigResource) -> dict[str, ConfigEntry]:
    futures = admin.describe_configs([resource])
    entries: dict[str, ConfigEntry] = next(iter(futures.values())).result(timeout=10)
    return entries


def _int_config(entries: dict[str, ConfigEntry], name: str) -> int:
    value = entries[name].value
    if value is None:  # a sensitive setting; these limits never are
        raise TypeError(f"Kafka reported no value for {name}")
    return int(value)


def _kafka(settings: Settings) -> list[Finding]:
    from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

    from pipeline.kafka.produce import producer_config
    from pipeline.stream.source import kafka_options

    logged: list[str] = []  # errors the client only logs (a refused login) explain the time-out that follows
    config: dict[str, Any] = kafka.admin_config(settings) | {"log_level": 0}  # with the client properties' security
    admin = AdminClient(config | {"error_cb": lambda error: logged.append(str(error))})
    try:
        metadata = admin.list_topics(timeout=8)
    except Exception as exc:  # noqa: BLE001
        admin.poll(0)  # serves the error callbacks
        refused = kafka.security_problem(" ".join([str(exc), *logged]), settings, "read")
        if refused is not None:
            return [Finding("Kafka", FAIL, refused, "fix LAKEHOUSE_KAFKA_PROPERTIES or the broker's users and ACLs")]
        return [
            Finding(
                "Kafka",
                FAIL,
                f"cannot reach {settings.kafka_bootstrap}: {exc}",
                "start the local broker (`lakehouse kafka start`) or set LAKEHOUSE_KAFKA_BOOTSTRAP",
            )
        ]
    findings = [Finding("Kafka", OK, f"{len(metadata.brokers)} broker(s) at {settings.kafka_bootstrap}")]
    topic = metadata.topics.get(settings.topic)
    if topic is None or topic.error is not None:
        findings.append(
            Finding(
                "topic",
                FAIL,
                f"topic {settings.topic!r} does not exist",
                "`lakehouse kafka start` creates it (or create it with the settings in README, 'Message size')",
            )
        )
        return findings
    findings.append(Finding("topic", OK, f"{settings.topic!r}, {len(topic.partitions)} partitions"))

    need = settings.max_message_bytes + FRAMING_BYTES
    topic_config = _configs(admin, ConfigResource(ResourceType.TOPIC, settings.topic))
    broker_id = min(metadata.brokers)
    broker_config = _configs(admin, ConfigResource(ResourceType.BROKER, str(broker_id)))
    producer_limit = int(producer_config(settings)["message.max.bytes"])
    topic_limit = _int_config(topic_config, "max.message.bytes")
    broker_limit = _int_config(broker_config, "message.max.bytes")
    socket_limit = _int_config(broker_config, "socket.request.max.bytes")
    consumer_limit = int(kafka_options(settings)["kafka.max.partition.fetch.bytes"])
    limit_name = f"LAKEHOUSE_MAX_MESSAGE_BYTES={settings.max_message_bytes:,}"
    chain = (
        f"message {_size(settings.max_message_bytes)} <= producer {_size(producer_limit)}, "
        f"topic {_size(topic_limit)}, broker {_size(broker_limit)}, consumer fetch {_size(consumer_limit)}"
    )
    findings.append(Finding("size limits", OK, chain))
    if producer_limit < need:
        findings.append(
            Finding(
                "producer limit",
                FAIL,
                f"producer message.max.bytes {producer_limit:,} < {need:,}",
                "the producer derives it from LAKEHOUSE_MAX_MESSAGE_BYTES; report this",
            )
        )
    if topic_limit < need:
        findings.append(
            Finding(
                "topic limit",
                FAIL,
                f"topic {settings.topic!r} max.message.bytes is {topic_limit:,}: a message at {limit_name} plus framing "
                f"({need:,}) is refused",
                "`lakehouse kafka start` raises it on the local broker; elsewhere: kafka-configs.sh --alter --entity-type "
                f"topics --entity-name {settings.topic} --add-config max.message.bytes={settings.kafka_limit_bytes}",
            )
        )
    if broker_limit < need:
        status = WARN if topic_limit >= need else FAIL
        findings.append(
            Finding(
                "broker limit",
                status,
                f"broker {broker_id} message.max.bytes is {broker_limit:,} < {need:,} (topics without their own "
                "max.message.bytes refuse messages at the limit)",
                f"set message.max.bytes={settings.kafka_limit_bytes} in the broker's server.properties; the local broker: "
                "`lakehouse kafka stop && lakehouse kafka start` with the same settings",
            )
        )
    if socket_limit < need:
        findings.append(
            Finding(
                "broker request size",
                FAIL,
                f"broker {broker_id} socket.request.max.bytes is {socket_limit:,} < {need:,}",
                f"set socket.request.max.bytes >= {2 * settings.kafka_limit_bytes} on the brokers",
            )
        )
    if consumer_limit < topic_limit:
        findings.append(
            Finding(
                "consumer fetch size",
                WARN,
                f"max.partition.fetch.bytes {consumer_limit:,} < topic limit {topic_limit:,}",
                "raise LAKEHOUSE_MAX_MESSAGE_BYTES to the topic's limit, so Spark fetches whole batches",
            )
        )
    timestamps = topic_config["message.timestamp.type"].value
    if timestamps != "LogAppendTime":
        findings.append(
            Finding(
                "topic timestamps",
                WARN,
                f"message.timestamp.type is {timestamps}: corrections in different partitions are ordered by producer "
                "clocks, not by arrival",
                f"kafka-configs.sh --alter --entity-type topics --entity-name {settings.topic} "
                "--add-config message.timestamp.type=LogAppendTime",
            )
        )
    findings.extend(_checkpoint(settings))
    return findings


def _checkpoint(settings: Settings) -> list[Finding]:
    """The streaming checkpoint belongs to this topic, and Kafka still holds the offsets it would read next."""
    paths = LakePaths.from_settings(settings)
    processed = checkpoint.processed_offsets(paths)
    if processed is None:  # no batch committed yet, or a checkpoint on object storage
        return []
    where = checkpoint.ingest_checkpoint(paths)
    topics = sorted({topic for topic, _ in processed.next_offsets})
    if settings.topic not in topics:
        return [
            Finding(
                "checkpoint",
                FAIL,
                f"the checkpoint at {where} reads topic(s) {topics}, not {settings.topic!r}",
                "use the topic it was made for, or another LAKEHOUSE_CHECKPOINT_ROOT / LAKEHOUSE_LAKE_ROOT",
            )
        ]
    held = kafka.watermarks(settings, timeout_s=8, group="kpi-lakehouse-doctor")
    lost = [
        f"partition {partition}: offsets {next_offset}..{held[(topic, partition)].low - 1}"
        for (topic, partition), next_offset in sorted(processed.next_offsets.items())
        if topic == settings.topic and (topic, partition) in held and next_offset < held[(topic, partition)].low
    ]
    if lost:
        return [
            Finding(
                "checkpoint",
                FAIL,
                "Kafka deleted records the pipeline has not read: " + "; ".join(lost),
                "run `lakehouse pipeline --no-fail-on-data-loss` once (gaps are recorded in quarantine)",
            )
        ]
    return [Finding("checkpoint", OK, f"batch {processed.batch_id}, Kafka still holds every offset it reads next")]


def _lake(settings: Settings) -> list[Finding]:
    root = LakePaths.from_settings(settings).root
    folder = local_path(root)
    if folder is None:
        return _object_store(root) if objectstore.is_s3(root) else [Finding("lake", OK, f"{root} (not checked here)")]
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(existing).free
    findings = []
    if not os.access(existing, os.W_OK):
        findings.append(
            Finding("lake", FAIL, f"{existing} is not writable", "set LAKEHOUSE_LAKE_ROOT to a writable folder")
        )
    status = OK if free >= 5 * GIB else WARN
    findings.append(
        Finding(
            "disk",
            status,
            f"{free / GIB:.1f} GiB free at {existing}",
            "" if status == OK else "free space or move LAKEHOUSE_LAKE_ROOT; `lakehouse maintain` vacuums old files",
        )
    )
    return findings


def _retention(settings: Settings) -> list[Finding]:
    """No retention run was left unfinished: bronze is append-only, and what retention removed so far."""
    from lake import duck
    from lake.retention import retention_state
    from lake.tables import Table

    paths = LakePaths.from_settings(settings)
    findings = []
    for table in (Table.BRONZE, Table.QUARANTINE):
        if not duck.table_exists(paths, table):
            continue
        try:
            state = retention_state(paths, table)
        except LakeError as exc:
            findings.append(Finding(f"{table.value} retention", FAIL, str(exc), "see the lake finding above"))
            continue
        kept = settings.retention(table.value)
        keeps = "kept forever" if kept is None else f"kept {getattr(settings, f'{table.value}_retention')}"
        if state.pending is not None or state.append_only is False:
            findings.append(
                Finding(
                    f"{table.value} retention",
                    FAIL,
                    f"a retention run (cutoff {state.pending_cutoff}) was interrupted"
                    + (
                        "; bronze accepts deletes (delta.appendOnly=false) until it is finished"
                        if table is Table.BRONZE
                        else ""
                    ),
                    "run `lakehouse maintain`: it finishes the run first",
                )
            )
        else:
            removed = f"{state.rows_removed:,} rows removed so far" + (
                f", last cutoff {state.last_cutoff:%Y-%m-%d %H:%M:%S} UTC" if state.last_cutoff else ""
            )
            findings.append(Finding(f"{table.value} retention", OK, f"rows {keeps}; {removed}"))
    return findings


def _metrics(settings: Settings) -> list[Finding]:
    """How many metric names the lake knows against LAKEHOUSE_MAX_METRICS, how many readings the limit refused, and
    whether the lake still waits for its upgrade to metrics."""
    from lake import duck, upgrade
    from lake.deltars import open_table
    from lake.tables import Table

    paths = LakePaths.from_settings(settings)
    findings = []
    try:
        waiting = upgrade.pending(paths)
    except LakeError as exc:
        return [Finding("metrics", FAIL, str(exc), "see the lake finding above")]
    if waiting:
        findings.append(
            Finding(
                "metrics upgrade",
                WARN,
                f"the lake was written before metrics: {', '.join(t.value for t in waiting)} not upgraded yet",
                "the pipeline, the API or `lakehouse sql` upgrades it in place when it starts (README, Metrics)",
            )
        )
    if not duck.table_exists(paths, Table.METRICS):
        return findings
    known = open_table(paths.table(Table.METRICS)).to_pyarrow_table(columns=["metric"]).num_rows
    refused = 0
    if duck.table_exists(paths, Table.QUARANTINE):
        rows = open_table(paths.table(Table.QUARANTINE)).to_pyarrow_dataset()
        import pyarrow.dataset as ds

        refused = rows.count_rows(filter=ds.field("reason_code") == "metric_limit")
    limit = settings.max_metrics
    detail = f"the lake knows {known:,} metric names of LAKEHOUSE_MAX_METRICS={limit:,}"
    if refused:
        detail += f"; {refused:,} readings of new names were quarantined as metric_limit"
    if known >= limit:
        findings.append(
            Finding(
                "metric names",
                FAIL if refused else WARN,
                detail,
                "readings of a new name are quarantined: raise LAKEHOUSE_MAX_METRICS if the names are real, then "
                "`lakehouse replay --reason metric_limit`; or fix the devices that invent names",
            )
        )
    else:
        findings.append(Finding("metric names", OK, detail))
    return findings


def _object_store(root: str) -> list[Finding]:
    """The bucket answers with these credentials, a probe object can be written, listed and deleted, and which
    writers the Delta log store allows."""
    access = objectstore.access()
    try:
        objectstore.check_access(root)
        probe = objectstore.probe_write_list_delete(root)
    except ObjectStoreError as exc:
        return [Finding("object store", FAIL, str(exc), "see DEPLOY.md, section 4, for the AWS_* settings")]
    return [
        Finding("object store", OK, f"bucket {objectstore.bucket_of(root)!r} at {access.where}"),
        Finding("object store write", OK, f"wrote, listed and deleted {probe}"),
        Finding(
            "Delta log store",
            OK,
            "single writer (S3SingleDriverLogStore): one Spark process writes a table at a time; stop the pipeline "
            "while `lakehouse replay` or `maintain` runs",
            "for several writers at once, S3DynamoDBLogStore on every Spark writer (DEPLOY.md, section 4)",
        ),
    ]


def _memory(settings: Settings) -> Finding:
    per_trigger = settings.max_offsets_per_trigger * settings.max_message_bytes
    heap = parse_memory(settings.spark_driver_memory)
    detail = (
        f"a micro-batch reads at most {settings.max_offsets_per_trigger:,} records x "
        f"{_size(settings.max_message_bytes)} = {per_trigger / GIB:.1f} GiB; driver heap {settings.spark_driver_memory}"
    )
    if heap and per_trigger > 8 * heap:
        return Finding(
            "micro-batch bound",
            WARN,
            detail + " (Spark spills to disk, but a batch of large messages takes long before its first commit)",
            "lower LAKEHOUSE_MAX_OFFSETS_PER_TRIGGER for backlogs of large messages",
        )
    return Finding("micro-batch bound", OK, detail)


def parse_memory(text: str) -> int | None:
    match = re.fullmatch(r"(\d+)([kmgt]?)b?", text.strip().lower())
    if not match:
        return None
    return int(match.group(1)) * 1024 ** " kmgt".index(match.group(2) or " ")


def diagnose(settings: Settings, on_step: Callable[[str], None] | None = None) -> list[Finding]:
    steps: list[tuple[str, Callable[[], list[Finding]]]] = [
        ("Java", lambda: [_java()]),
        ("jars", lambda: [_jars(settings)]),
        ("DuckDB", lambda: [_duckdb()]),
        ("Kafka", lambda: _kafka(settings)),
        ("lake", lambda: _lake(settings)),
        ("retention", lambda: _retention(settings)),
        ("metrics", lambda: _metrics(settings)),
        ("memory", lambda: [_memory(settings)]),
    ]
    findings: list[Finding] = []
    for name, step in steps:
        if on_step:
            on_step(name)
        findings.extend(step())
    return findings


def as_dicts(findings: list[Finding]) -> list[dict[str, str]]:
    return [asdict(f) for f in findings]
