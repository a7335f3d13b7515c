"""Kafka as users run it: a topic they created with Kafka's default `CreateTime`, producers whose clocks run hours
and days behind, and a transactional producer that aborts one transaction and commits the next (contract sections
1 and 3). Offsets decide within a partition whatever the clocks say; the Kafka timestamp only between partitions;
aborted records are never ingested, and their offsets and the markers' are neither lost nor missing."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from bench.processes import lakehouse
from lake.settings import Settings
from lake.tables import LakePaths
from tests.reference import Reference, assert_kpis_equal, gold_kpis

pytestmark = [pytest.mark.kafka, pytest.mark.spark]

T0 = datetime(2024, 7, 30, 12, 0, tzinfo=UTC)
HOUR_MS, DAY_MS = 3_600_000, 86_400_000


def create_topic(settings: Settings) -> None:
    """The topic as a user creates it: two partitions, the broker's defaults but the message size (CreateTime)."""
    from confluent_kafka.admin import AdminClient, NewTopic

    from lake.kafka import admin_config

    admin = AdminClient(admin_config(settings))
    topic = NewTopic(settings.topic, num_partitions=2, replication_factor=1, config={"max.message.bytes": "6291456"})
    admin.create_topics([topic])[settings.topic].result(timeout=30)
    described = admin.describe_configs([_topic_resource(settings.topic)])
    config = next(iter(described.values())).result(timeout=30)
    assert config["message.timestamp.type"].value == "CreateTime"


def _topic_resource(name: str):  # type: ignore[no-untyped-def]
    from confluent_kafka.admin import ConfigResource, ResourceType

    return ConfigResource(ResourceType.TOPIC, name)


class Fleet:
    """What is sent, partition by partition, with the producer's own timestamp on each record; the expected
    readings follow the contract's rule, worked out here from what was sent."""

    def __init__(self, settings: Settings) -> None:
        from confluent_kafka import Producer

        from lake.kafka import admin_config

        self.topic = settings.topic
        self.producer = Producer(admin_config(settings) | {"message.max.bytes": 6_000_000})
        self.now_ms = int(time.time() * 1000)
        # Every committed record: (partition, sequence within the partition, record ms, device, moment, value).
        self.records: list[tuple[int, int, int, str, datetime, float]] = []

    def send(self, partition: int, clock_ms: int, readings: list[tuple[str, datetime, float]]) -> None:
        items = [{"device_id": d, "timestamp": m.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "value": v} for d, m, v in readings]
        payload = json.dumps(items[0] if len(items) == 1 else items).encode()
        self.producer.produce(self.topic, payload, partition=partition, timestamp=clock_ms)
        self.producer.flush(30)
        sequence = len(self.records)
        self.records.extend((partition, sequence, clock_ms, d, m, v) for d, m, v in readings)

    def expected(self) -> Reference:
        """Per identity the latest record: within a partition by send order (offsets), then between partitions by
        the record's timestamp, then partition and send order."""
        last_in_partition: dict[tuple[str, datetime, int], tuple[int, int, int, float]] = {}
        for partition, sequence, clock_ms, device, moment, value in self.records:
            last_in_partition[(device, moment, partition)] = (clock_ms, partition, sequence, value)
        winners: dict[tuple[str, datetime], tuple[int, int, int, float]] = {}
        for (device, moment, _), candidate in last_in_partition.items():
            if (device, moment) not in winners or candidate[:3] > winners[(device, moment)][:3]:
                winners[(device, moment)] = candidate
        return Reference.of((device, moment, value[3]) for (device, moment), value in winners.items())


def transaction(
    settings: Settings, fleet: Fleet, commit: bool, readings: list[tuple[int, str, datetime, float]]
) -> None:
    """One transaction of a transactional producer (as Kafka Connect, Flink or Kafka Streams write)."""
    from confluent_kafka import Producer

    from lake.kafka import admin_config

    producer = Producer(admin_config(settings) | {"transactional.id": f"gateway-{uuid.uuid4().hex[:6]}"})
    producer.init_transactions(30)
    producer.begin_transaction()
    for partition, device, moment, value in readings:
        document = {"device_id": device, "timestamp": moment.strftime("%Y-%m-%dT%H:%M:%SZ"), "value": value}
        producer.produce(settings.topic, json.dumps(document).encode(), partition=partition)
    producer.flush(30)  # on the broker before the end, or an abort would drop them unsent
    if commit:
        producer.commit_transaction(30)
        for partition, device, moment, value in readings:
            fleet.records.append((partition, len(fleet.records), fleet.now_ms, device, moment, value))
    else:
        producer.abort_transaction(30)


def check_lake(settings: Settings, expected: Reference) -> None:
    from lake import duck

    lake = duck.connect(LakePaths.from_settings(settings))
    silver = {
        (device, moment.astimezone(UTC), metric): value
        for device, moment, value, metric in lake.execute(
            'SELECT device_id, "timestamp", value, metric FROM silver'
        ).fetchall()
    }
    assert silver == expected.readings
    got, want = gold_kpis(lake), expected.buckets("second")
    assert set(got) == set(want)
    for second, kpis in want.items():
        assert_kpis_equal(got[second], kpis, f"gold {second}")
    quarantined = lake.execute("SELECT reason_code, reason FROM quarantine").fetchall()
    assert quarantined == [], "a transaction's offsets were taken as lost, or a valid reading was quarantined"
    lake.close()


def test_offsets_decide_within_a_partition_and_aborted_records_never_count(broker, lake_settings: Settings) -> None:  # type: ignore[no-untyped-def]
    settings = lake_settings
    create_topic(settings)
    fleet = Fleet(settings)
    now = fleet.now_ms
    second = [T0 + timedelta(seconds=s) for s in range(8)]

    # First run: originals on the producers' correct clocks, and a transaction aborted, then one committed.
    fleet.send(0, now, [("pump-1", second[0], 1.0)])
    fleet.send(0, now, [("pump-1", second[1], 5.0), ("pump-2", second[1], 7.0)])
    fleet.send(1, now, [("pump-3", second[2], 20.0)])
    transaction(settings, fleet, False, [(0, "pump-1", second[0], 666.0), (1, "ghost-1", second[3], 1e6)])
    transaction(settings, fleet, True, [(0, "pump-5", second[3], 3.0), (1, "pump-5", second[4], 4.0)])
    run = lakehouse(settings, "pipeline", "--available-now")
    assert run.returncode == 0, run.stderr[-5000:]
    check_lake(settings, fleet.expected())

    # Second run, against silver's stored readings and inside one batch: corrections from a gateway whose clock is
    # an hour behind and one days behind, in the partition of the record they correct, win; between partitions
    # the later timestamp wins whatever the send order; and another aborted and committed transaction.
    fleet.send(0, now - HOUR_MS, [("pump-1", second[0], 2.0)])
    fleet.send(0, now - 3 * DAY_MS, [("pump-1", second[1], 6.0), ("pump-2", second[1], 8.0)])
    fleet.send(0, now, [("pump-4", second[5], 1.0)])
    fleet.send(0, now - DAY_MS, [("pump-4", second[5], 1.5)])  # in the same batch as the reading it corrects
    fleet.send(1, now - 2 * HOUR_MS, [("pump-3", second[2], 21.0)])
    fleet.send(0, now - 3 * HOUR_MS, [("pump-3", second[2], 22.0)])  # older clock, other partition: loses
    fleet.send(0, now - HOUR_MS, [("pump-6", second[6], 9.0)])
    fleet.send(1, now - 2 * HOUR_MS, [("pump-6", second[6], 10.0)])  # sent later, but an older clock: loses
    transaction(settings, fleet, False, [(1, "pump-3", second[2], -5.0), (0, "pump-5", second[3], 99.0)])
    transaction(settings, fleet, True, [(1, "pump-7", second[7], 11.0)])
    expected = fleet.expected()
    assert expected.value("pump-1", second[0]) == 2.0 and expected.value("pump-3", second[2]) == 21.0
    assert expected.value("pump-6", second[6]) == 9.0 and expected.value("pump-4", second[5]) == 1.5
    # Offsets skipped for transactions are told apart from lost ones only when the pipeline looks for lost ones.
    run = lakehouse(settings, "pipeline", "--available-now", env_extra={"LAKEHOUSE_FAIL_ON_DATA_LOSS": "false"})
    assert run.returncode == 0, run.stderr[-5000:]
    check_lake(settings, expected)

    audited = lakehouse(settings, "audit", "--json")
    assert audited.returncode == 0, audited.stdout[-3000:] + audited.stderr[-3000:]
    report = json.loads(audited.stdout)
    assert report["ok"] and report["kafka_error"] is None, report
    totals = report["totals"]
    # Four transactions: one marker per partition each wrote to (2 + 2 + 2 + 1); two aborted, of two records each.
    assert (totals["transaction_markers"], totals["aborted_records"], totals["missing_from_bronze"]) == (7, 4, 0)
    assert [p["not_yet_ingested"] for p in report["partitions"]] == [0, 0]
