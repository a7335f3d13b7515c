"""The messages a test sends to Kafka, each with the valid readings and the quarantine rows it must produce; the
Reference of a whole stream follows from them in send order (so duplicates and corrections count as they land)."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.reference import Reference

Quarantined = tuple[str, int | None]  # (reason code, reading index; None for the whole message)


def dumps(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def stamp(moment: datetime) -> str:
    """A timestamp as the tests spell it by default: UTC, microseconds, `Z`."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# A valid reading a message yields: (device_id, timestamp, value), of metric `value`, or with its metric last.
Reading = tuple[str, datetime, float] | tuple[str, datetime, float, str]


@dataclass(frozen=True)
class Message:
    payload: bytes
    readings: tuple[Reading, ...] = ()  # valid readings, in message order
    quarantined: tuple[Quarantined, ...] = ()


class Stream:
    """Builds a stream in send order; `spell` writes a reading's timestamp in the messages it builds."""

    def __init__(self, spell: Callable[[datetime], str] = stamp) -> None:
        self.spell = spell
        self.sent: list[Message] = []

    def send(
        self,
        payload: bytes,
        readings: Iterable[Reading] = (),
        quarantined: Iterable[Quarantined] = (),
    ) -> Message:
        """Any message as given, with what it must produce: valid readings, quarantine rows."""
        message = Message(payload, tuple(readings), tuple(quarantined))
        self.sent.append(message)
        return message

    def item(self, moment: datetime, value: object) -> dict[str, object]:
        """One reading of a batch, as the messages hold it."""
        return {"timestamp": self.spell(moment), "value": value}

    def single(
        self, device_id: str, moment: datetime, value: float, timestamp: str | None = None, **fields: object
    ) -> Message:
        """One reading in its own message; `timestamp` spells `moment` another way, `fields` are sent along."""
        text = self.spell(moment) if timestamp is None else timestamp
        document = {"device_id": device_id, "timestamp": text, "value": value, **fields}
        return self.send(dumps(document), [(device_id, moment, value)])

    def batch(self, device_id: str, readings: Sequence[tuple[datetime, float]], **fields: object) -> Message:
        """One device's valid readings in one message (`fields` come before `readings`)."""
        items = [self.item(moment, value) for moment, value in readings]
        document = {"device_id": device_id, **fields, "readings": items}
        return self.send(dumps(document), [(device_id, moment, value) for moment, value in readings])

    def metrics_batch(self, device_id: str, readings: Sequence[tuple[datetime, dict[str, float]]]) -> Message:
        """One device's readings of several metrics each (the `metrics` form) in one message."""
        items = [{"timestamp": self.spell(moment), "metrics": named} for moment, named in readings]
        document = {"device_id": device_id, "readings": items}
        found = [(device_id, moment, value, metric) for moment, named in readings for metric, value in named.items()]
        return self.send(dumps(document), found)

    def repeat(self, message: Message) -> Message:
        """The same message sent again: an exact duplicate."""
        self.sent.append(message)
        return message

    def shuffle(self, rng: random.Random) -> None:
        rng.shuffle(self.sent)

    @property
    def messages(self) -> list[bytes]:
        return [m.payload for m in self.sent]

    def reference(self) -> Reference:
        """The valid readings as the stream leaves them: a later message's reading of an identity wins."""
        return Reference.of(reading for message in self.sent for reading in message.readings)

    def quarantine(self) -> Counter[Quarantined]:
        return Counter(entry for message in self.sent for entry in message.quarantined)

    def write(self, path: Path, start: int = 0, stop: int | None = None) -> Path:
        """Messages [start:stop] as NDJSON, one a line, for `lakehouse produce`."""
        path.write_bytes(b"".join(payload + b"\n" for payload in self.messages[start:stop]))
        return path


def few_devices(start: datetime, messages: int = 120) -> Stream:
    """Single readings and batches of ten from six devices over two minutes from `start`, then a correction."""
    rng = random.Random(15)
    stream = Stream()
    for index in range(messages):
        device = f"pump-{rng.randrange(6)}"
        if index % 8 == 0:
            readings = [
                (start + timedelta(milliseconds=rng.randrange(120_000)), round(rng.gauss(40, 9), 4)) for _ in range(10)
            ]
            stream.batch(device, readings)
        else:
            stream.single(device, start + timedelta(milliseconds=rng.randrange(120_000)), round(rng.gauss(40, 9), 4))
    first = stream.sent[1]
    stream.single(first.readings[0][0], first.readings[0][1], -1.5)  # a correction: the later value wins
    return stream


# The fleet day of the pipeline-written test lake (tests/conftest.py's `pipeline_lake`).
FLEET_DAY = datetime(2024, 7, 30, tzinfo=UTC)
THERMOMETERS = ("thermo-0", "thermo-1", "thermo-2", "thermo-3")
METER = "meter-1e8"
# Pumps that send several metrics at once, each pump its own set.
PUMP_METRICS = {
    "pump-0": ("pressure_bar", "flow_m3h", "temperature_c"),
    "pump-1": ("pressure_bar", "flow_m3h"),
    "pump-2": ("temperature_c", "battery_pct"),
}
_PUMP_RANGES = {
    "pressure_bar": (1.0, 6.0),
    "flow_m3h": (0.0, 40.0),
    "temperature_c": (20.0, 95.0),
    "battery_pct": (0, 100),
}


def fleet_day(seed: int = 41) -> Stream:
    """A UTC day of a fleet whose numbers are hard on floating point, each hour holding readings in two minutes and
    each of those in a few seconds of many readings:
    - thermometers read temperatures around 0 degrees of both signs: thermo-0 and thermo-1 each read a value and
      its negation in the same second, so their sums cancel at every grain; thermo-3 reads the negation of each of
      thermo-2's readings in the same second, so the fleet's cancel where no meter reads;
    - a meter reads 1e8 +- 1 (to the microunit) in the day's first twelve hours, one to four readings a second, and
      alone in each morning hour's last minute: its standard deviation sits far from its mean at every grain, the
      fleet's too in those minutes, and without it the afternoon's fleet buckets are all thermometers and near zero;
    - pumps send several metrics at once (`metrics`), each its own set, so no metric's KPIs hold another's values
      and each metric's device_count counts the pumps that send it;
    - an exact duplicate and a correction, so the lake is what deduplication leaves, and a correction of one pump
      metric that leaves the same instant's other metrics as they were."""
    rng = random.Random(seed)
    stream = Stream()
    for hour in range(24):
        for minute in sorted({0, rng.randrange(1, 60)}):
            seconds = sorted(rng.sample(range(60), 3))
            start = FLEET_DAY + timedelta(hours=hour, minutes=minute)
            by_device: dict[str, list[tuple[datetime, float]]] = {device: [] for device in (*THERMOMETERS, METER)}
            for second in seconds:
                at = start + timedelta(seconds=second)

                def moment(at: datetime = at) -> datetime:
                    return at + timedelta(microseconds=rng.randrange(1_000_000))

                for _ in range(3):
                    temperature = round(rng.uniform(-12.0, 12.0), 2)
                    by_device["thermo-0"] += [(moment(), temperature), (moment(), -temperature)]
                    by_device["thermo-1"] += [(moment(), -temperature), (moment(), temperature)]
                for _ in range(rng.randrange(1, 5)):
                    temperature = round(rng.gauss(0.0, 4.0), 3)
                    by_device["thermo-2"].append((moment(), temperature))
                    by_device["thermo-3"].append((moment(), -temperature))
                if hour < 12:
                    by_device[METER] += [
                        (moment(), 1e8 + round(rng.uniform(-1, 1), 6)) for _ in range(rng.randrange(1, 5))
                    ]
            for device, readings in by_device.items():
                if readings:
                    stream.batch(device, sorted(set(readings)))
            for pump, names in PUMP_METRICS.items():
                instants = sorted(
                    {start + timedelta(seconds=s, microseconds=rng.randrange(1_000_000)) for s in seconds}
                )
                stream.metrics_batch(
                    pump, [(at, {n: round(rng.uniform(*_PUMP_RANGES[n]), 3) for n in names}) for at in instants]
                )
        if hour < 12:  # a minute of the meter alone: the fleet's seconds and minute far from zero too
            alone = FLEET_DAY + timedelta(hours=hour, minutes=59)
            stream.batch(
                METER,
                sorted(
                    {
                        (
                            alone + timedelta(seconds=second, microseconds=rng.randrange(1_000_000)),
                            1e8 + round(rng.uniform(-1, 1), 6),
                        )
                        for second in (10, 11, 40)
                        for _ in range(rng.randrange(2, 5))
                    }
                ),
            )
    stream.repeat(stream.sent[5])
    corrected = [m for m in stream.sent if m.readings and m.readings[0][0] in THERMOMETERS][7].readings[0]
    stream.single(corrected[0], corrected[1], corrected[2] + 0.25)
    pumped = next(m for m in stream.sent if m.readings and m.readings[0][0] == "pump-0").readings[0]
    flow = {"device_id": pumped[0], "timestamp": stamp(pumped[1]), "metric": pumped[3], "value": pumped[2] - 0.5}
    stream.send(dumps(flow), [(pumped[0], pumped[1], pumped[2] - 0.5, pumped[3])])  # one metric corrected alone
    return stream
