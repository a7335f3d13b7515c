"""A generated device fleet: readings of `value` or of named metrics, single and in batches, some batches filled to
the message size limit; optionally each device in time order, and a share of broken input for the quarantine."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta


@dataclass(frozen=True)
class MetricRange:
    """A metric and the range its readings stay in."""

    name: str
    low: float
    high: float


# Quantities that pumps, valves, meters and sensors report, with plausible ranges (units in the name, as the README
# advises). `--metrics N` sends the first N; names beyond the list are `metric_<n>`, between 0 and 100.
CATALOGUE: tuple[MetricRange, ...] = (
    MetricRange("pressure_bar", 0.5, 10.0),
    MetricRange("flow_m3h", 0.0, 250.0),
    MetricRange("temperature_c", -10.0, 90.0),
    MetricRange("battery_pct", 0.0, 100.0),
    MetricRange("vibration_mm_s", 0.0, 25.0),
    MetricRange("rpm", 0.0, 3600.0),
    MetricRange("power_kw", 0.0, 400.0),
    MetricRange("humidity_pct", 0.0, 100.0),
    MetricRange("voltage_v", 207.0, 253.0),
    MetricRange("current_a", 0.0, 120.0),
    MetricRange("level_m", 0.0, 12.0),
    MetricRange("valve_open_pct", 0.0, 100.0),
    MetricRange("ph", 0.0, 14.0),
    MetricRange("conductivity_us_cm", 50.0, 2000.0),
    MetricRange("turbidity_ntu", 0.0, 100.0),
    MetricRange("signal_dbm", -120.0, -40.0),
    MetricRange("motor.temperature_c", 0.0, 130.0),
    MetricRange("motor.current_a", 0.0, 120.0),
)
_GENERIC_RANGE = (0.0, 100.0)
_BY_NAME = {metric.name: metric for metric in CATALOGUE}


def metric_names(count: int) -> list[str]:
    """The first `count` names of the catalogue, then `metric_<n>` (n counting from 1 over all names)."""
    return [metric.name for metric in CATALOGUE[:count]] + [f"metric_{n}" for n in range(len(CATALOGUE) + 1, count + 1)]


def metric_range(name: str) -> MetricRange:
    return _BY_NAME.get(name) or MetricRange(name, *_GENERIC_RANGE)


# What a broken reading gets wrong, and the quarantine reason the pipeline gives it (README, "Quarantine").
BAD_READINGS = {
    "bad_metric": "bad_metric",  # a metric name that breaks the rule ("flow m3h")
    "bad_value": "bad_value",  # a metric's value is a string ("n/a")
    "both": "bad_shape",  # `value` and `metrics` in one reading
    "no_timestamp": "missing_timestamp",
}
BAD_MESSAGES = {"cut": "not_json"}  # a single reading's message cut short: the whole message is quarantined
_BAD_VALUES = ("n/a", "NaN", "")

# In time order, a reading is dated at most this long before its message is sent: a single reading just before; a
# batch holds what the device measured since its previous message, and a full batch is a device's backlog after
# it was offline this long. Both stay well within LAKEHOUSE_ALLOWED_LATENESS (5 minutes), so nothing looks late.
_SINGLE_DELAY_US = 1_000_000
_BACKLOG_US = 120_000_000
# Stands for a reading's time until the second pass dates it; as long as every time it is replaced with.
_UNDATED = b"0000-00-00T00:00:00.000000Z"


@dataclass(frozen=True)
class Fleet:
    devices: int = 20
    messages: int = 2000
    batch_share: float = 0.1  # share of messages that are batches of several readings
    batch_size: int = 50  # readings in an ordinary batch
    full_batches: int = 1  # batches filled up to `max_message_bytes`
    max_message_bytes: int = 5 * 1024 * 1024
    start: datetime = datetime(2024, 7, 30, 12, 0, tzinfo=UTC)
    span_seconds: int = 600
    seed: int = 7
    # Named metrics (metric_names), in the `metrics` form; 0 sends `value` alone, the tutorial's form. Each device
    # sends a stable subset of them (most devices all), and every metric is sent by at least one device.
    metrics: int = 0
    max_metrics_per_reading: int = 100  # LAKEHOUSE_MAX_METRICS_PER_READING: no device sends more in one reading
    # Each device's readings in time order, each message dated shortly before it is sent, as real devices send;
    # otherwise each reading's time is drawn at random from the span, so many arrive late.
    in_order: bool = False
    bad_share: float = 0.0  # share of readings (and single messages) broken on purpose, of the kinds above
    kinds: tuple[str, ...] = ("pump", "valve", "meter", "sensor")

    def __post_init__(self) -> None:
        if self.devices < 1 or self.messages < 0 or self.span_seconds < 1:
            raise ValueError(
                "a synthetic fleet needs at least one device, a span of at least one second, and no "
                "negative number of messages"
            )
        if not 0.0 <= self.bad_share <= 1.0 or not 0.0 <= self.batch_share <= 1.0:
            raise ValueError("--bad-share and --batch-share are shares: between 0 and 1")
        if self.metrics < 0:
            raise ValueError("--metrics must be 0 (readings of `value`) or a number of named metrics")
        if not self.kinds or not all(self.kinds):
            raise ValueError("--kinds needs at least one device kind, such as pump")
        if self.metrics > self.devices * self.max_metrics_per_reading:
            raise ValueError(
                f"{self.metrics} metrics over {self.devices} devices that send at most "
                f"LAKEHOUSE_MAX_METRICS_PER_READING={self.max_metrics_per_reading} each leave some metrics unsent; "
                "use more devices"
            )

    def device_ids(self) -> list[str]:
        return [f"{self.kinds[i % len(self.kinds)]}-{i:04d}" for i in range(self.devices)]

    def device_metrics(self) -> dict[str, list[str]]:
        """The metrics each device sends (empty lists for a fleet of `value`)."""
        return _device_metrics(self)


def _device_metrics(fleet: Fleet) -> dict[str, list[str]]:
    devices, names = fleet.device_ids(), metric_names(fleet.metrics)
    if not names:
        return {device: [] for device in devices}
    # A random source of its own, so that the subsets do not depend on the readings drawn.
    profile = random.Random(f"metrics-{fleet.seed}")
    cap = fleet.max_metrics_per_reading
    if len(names) <= cap:
        sent = {device: set(names) for device in devices}
        if len(names) > 1 and len(devices) > 1:
            # A quarter of the fleet (at least one device) sends some of the metrics only; the others send all.
            for device in profile.sample(devices, max(1, len(devices) // 4)):
                sent[device] = set(profile.sample(names, profile.randint(1, len(names) - 1)))
    else:
        # More metrics than one reading may carry: each device sends `cap` of them, dealt so that all are sent
        # (Fleet checked that the devices have room for all).
        sent = {device: set() for device in devices}
        for index, name in enumerate(profile.sample(names, len(names))):
            sent[devices[index % len(devices)]].add(name)
        for chosen in sent.values():
            chosen.update(profile.sample(sorted(set(names) - chosen), cap - len(chosen)))
    order = {name: index for index, name in enumerate(names)}
    return {device: sorted(chosen, key=order.__getitem__) for device, chosen in sent.items()}


def _timestamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _timestamp_us(moment: datetime) -> str:
    """To the microsecond, always as long as _UNDATED."""
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _dumps(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


class _Generator:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.random = random.Random(fleet.seed)
        self.devices = fleet.device_ids()
        # Each device measures around its own level.
        self.level = {d: self.random.uniform(10, 100) for d in self.devices}
        self.sends = fleet.device_metrics()
        # Per device and metric: a level within the metric's range, and the phase of a slow swing around it.
        profile = random.Random(f"levels-{fleet.seed}")
        self.swing: dict[tuple[str, str], tuple[float, float]] = {}
        for device, names in self.sends.items():
            for name in names:
                metric = metric_range(name)
                width = metric.high - metric.low
                level = profile.uniform(metric.low + 0.25 * width, metric.high - 0.25 * width)
                self.swing[device, name] = (level, profile.uniform(0, 2 * math.pi))
        self.offline = self._offline_windows() if fleet.in_order else []

    def _offline_windows(self) -> list[tuple[int, int, str]]:
        """(first, last position, device): a device is silent for the backlog before its full batch."""
        fleet = self.fleet
        backlog = min(_BACKLOG_US, fleet.span_seconds * 1_000_000 // 4)
        positions = math.ceil(backlog * fleet.messages / (fleet.span_seconds * 1_000_000))
        return [(max(0, at - positions), at, self.random.choice(self.devices)) for at in sorted(full_positions(fleet))]

    def device(self, index: int) -> str:
        if not self.fleet.in_order:
            return self.random.choice(self.devices)
        for first, last, device in self.offline:
            if index == last:
                return device
        silent = {device for first, last, device in self.offline if first <= index < last}
        return self.random.choice([d for d in self.devices if d not in silent] or self.devices)

    def quantities(self, device: str, index: int) -> dict[str, object]:
        if not self.fleet.metrics:
            return {"value": round(self.random.gauss(self.level[device], 5.0), 4)}
        values: dict[str, float] = {}
        turn = 2 * math.pi * index / max(1, self.fleet.messages)
        for name in self.sends[device]:
            metric = metric_range(name)
            width = metric.high - metric.low
            level, phase = self.swing[device, name]
            value = level + 0.1 * width * math.sin(turn + phase) + self.random.gauss(0, 0.02 * width)
            values[name] = round(min(metric.high, max(metric.low, value)), 2)
        return {"metrics": values}

    def reading(self, device: str, index: int, single: bool = False) -> tuple[dict[str, object], bool]:
        """A reading, and whether its message is to be cut short (a single reading broken that way)."""
        if self.fleet.in_order:
            timestamp = _UNDATED.decode()
        else:
            offset_ms = self.random.randrange(self.fleet.span_seconds * 1000)
            timestamp = _timestamp(self.fleet.start + timedelta(milliseconds=offset_ms))
        reading = {"timestamp": timestamp, **self.quantities(device, index)}
        if self.fleet.bad_share and self.random.random() < self.fleet.bad_share:
            return self.broken(reading, single)
        return reading, False

    def broken(self, reading: dict[str, object], single: bool) -> tuple[dict[str, object], bool]:
        kind = self.random.choice([*BAD_READINGS, *BAD_MESSAGES] if single else list(BAD_READINGS))
        metrics = reading.get("metrics")
        named = metrics if isinstance(metrics, dict) else {}
        victim = self.random.choice(list(named)) if named else "value"
        if kind == "bad_metric":
            bad_name = victim.replace("_", " ", 1) if "_" in victim else f"{victim}!"
            if named:
                reading["metrics"] = {bad_name if k == victim else k: v for k, v in named.items()}
            else:
                reading = {"timestamp": reading["timestamp"], "metric": bad_name, "value": reading["value"]}
        elif kind == "bad_value":
            (named or reading)[victim] = self.random.choice(_BAD_VALUES)
        elif kind == "both":
            if named:
                reading["value"] = named[victim]
            else:
                reading["metrics"] = {"value": reading["value"]}
        elif kind == "no_timestamp":
            del reading["timestamp"]
        return reading, kind == "cut"

    def single(self, index: int) -> tuple[str, bytes]:
        device = self.device(index)
        reading, cut = self.reading(device, index, single=True)
        message = _dumps({"device_id": device, **reading})
        return device, message[:-2] if cut else message

    def batch(self, index: int, count: int) -> tuple[str, bytes]:
        device = self.device(index)
        readings = [self.reading(device, index)[0] for _ in range(count)]
        return device, _dumps({"device_id": device, "firmware": "1.4.2", "readings": readings})

    def full_batch(self, index: int) -> tuple[str, bytes]:
        """A batch as close to the limit as whole readings allow."""
        device = self.device(index)
        head = _dumps({"device_id": device, "readings": []})[: -len(b"[]}")]
        parts: list[bytes] = []
        size = len(head) + len(b"[]}")
        while True:
            item = _dumps(self.reading(device, index)[0])
            if size + len(item) + 1 > self.fleet.max_message_bytes:
                break
            parts.append(item)
            size += len(item) + 1
        return device, head + b"[" + b",".join(parts) + b"]}"


def full_positions(fleet: Fleet) -> set[int]:
    """The positions of the full batches among the messages, evenly spread."""
    return {int((i + 1) * fleet.messages / (fleet.full_batches + 1)) for i in range(fleet.full_batches)}


def _dated(fleet: Fleet, undated: list[tuple[str, bytes]]) -> Iterator[bytes]:
    """Dates the readings of messages sent in this order: message i is sent at start + span * (i + 1) / messages,
    each device's readings are strictly in time order and none is dated after its message is sent."""
    dates = random.Random(f"dates-{fleet.seed}")
    span_us = fleet.span_seconds * 1_000_000
    backlog = min(_BACKLOG_US, span_us // 4)
    last: dict[str, int] = {}  # the newest reading's offset from the start, per device
    for index, (device, message) in enumerate(undated):
        pieces = message.split(_UNDATED)
        count = len(pieces) - 1
        if not count:
            yield message
            continue
        sent = span_us * (index + 1) // max(1, fleet.messages)
        after = max(last.get(device, -1), sent - (_SINGLE_DELAY_US if count == 1 else backlog))
        sent = max(sent, after + count)  # more messages than microseconds in the span: later than planned
        offsets = sorted(dates.sample(range(after + 1, sent + 1), count))
        last[device] = offsets[-1]
        times = [_timestamp_us(fleet.start + timedelta(microseconds=offset)).encode() for offset in offsets]
        yield b"".join(piece for pair in zip(pieces, [*times, b""], strict=True) for piece in pair)


def generate(fleet: Fleet) -> Iterator[bytes]:
    """Messages (no trailing newline), deterministic for a given fleet and seed."""
    generator = _Generator(fleet)
    full_at = full_positions(fleet)

    def messages() -> Iterator[tuple[str, bytes]]:
        for index in range(fleet.messages):
            if index in full_at:
                yield generator.full_batch(index)
            elif generator.random.random() < fleet.batch_share:
                yield generator.batch(index, generator.random.randint(2, fleet.batch_size))
            else:
                yield generator.single(index)

    if fleet.in_order:
        # Times are given once every message is known, since a device's readings must rise across its messages.
        yield from _dated(fleet, list(messages()))
    else:
        yield from (message for _, message in messages())
