"""A generated device fleet: single readings and batch messages, some filled to the message size limit."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta


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

    def device_ids(self) -> list[str]:
        kinds = ("pump", "valve", "meter", "sensor")
        return [f"{kinds[i % len(kinds)]}-{i:04d}" for i in range(self.devices)]


def _timestamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class _Generator:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.random = random.Random(fleet.seed)
        self.devices = fleet.device_ids()
        # Each device measures around its own level.
        self.level = {d: self.random.uniform(10, 100) for d in self.devices}

    def reading(self, device: str) -> dict[str, object]:
        offset_ms = self.random.randrange(self.fleet.span_seconds * 1000)
        moment = self.fleet.start + timedelta(milliseconds=offset_ms)
        return {"timestamp": _timestamp(moment), "value": round(self.random.gauss(self.level[device], 5.0), 4)}

    def single(self) -> bytes:
        device = self.random.choice(self.devices)
        return json.dumps({"device_id": device, **self.reading(device)}, separators=(",", ":")).encode()

    def batch(self, count: int) -> bytes:
        device = self.random.choice(self.devices)
        readings = [self.reading(device) for _ in range(count)]
        return json.dumps(
            {"device_id": device, "firmware": "1.4.2", "readings": readings}, separators=(",", ":")
        ).encode()

    def full_batch(self) -> bytes:
        """A batch as close to the limit as whole readings allow."""
        device = self.random.choice(self.devices)
        head = json.dumps({"device_id": device, "readings": []}, separators=(",", ":")).encode()[: -len(b"[]}")]
        parts: list[bytes] = []
        size = len(head) + len(b"[]}")
        while True:
            item = json.dumps(self.reading(device), separators=(",", ":")).encode()
            if size + len(item) + 1 > self.fleet.max_message_bytes:
                break
            parts.append(item)
            size += len(item) + 1
        return head + b"[" + b",".join(parts) + b"]}"


def generate(fleet: Fleet) -> Iterator[bytes]:
    """Messages (no trailing newline), deterministic for a given fleet and seed."""
    generator = _Generator(fleet)
    full_at = {int((i + 1) * fleet.messages / (fleet.full_batches + 1)) for i in range(fleet.full_batches)}
    for index in range(fleet.messages):
        if index in full_at:
            yield generator.full_batch()
        elif generator.random.random() < fleet.batch_share:
            yield generator.batch(generator.random.randint(2, fleet.batch_size))
        else:
            yield generator.single()
