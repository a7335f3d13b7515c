"""Sends messages to the topic: NDJSON lines or a synthetic fleet, keyed by device, idempotent, zstd-compressed."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgspec

from lake.kafka import ClientConfig, librdkafka_properties, security_problem
from lake.settings import Settings
from pipeline.errors import MessageTooLarge, PipelineError


class _KeyItem(msgspec.Struct):
    device_id: object = None


class _KeyMessage(msgspec.Struct):
    device_id: object = None
    readings: object = None


_decode_key_object = msgspec.json.Decoder(_KeyMessage).decode
_decode_key_array = msgspec.json.Decoder(list[_KeyItem]).decode


def message_key(payload: bytes) -> bytes | None:
    """The message's device_id (for an array, its first reading's), so one device's messages share a partition."""
    try:
        start = payload.lstrip()[:1]
        if start == b"{":
            message = _decode_key_object(payload)
            device = message.device_id
            if device is None and isinstance(message.readings, list) and message.readings:
                first = message.readings[0]
                device = first.get("device_id") if isinstance(first, dict) else None
        elif start == b"[":
            items = _decode_key_array(payload)
            device = items[0].device_id if items else None
        else:
            return None
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return device.encode() if isinstance(device, str) and device else None


def producer_config(settings: Settings) -> ClientConfig:
    return {
        **librdkafka_properties(settings),  # security and the like, from LAKEHOUSE_KAFKA_PROPERTIES; the keys below win
        "bootstrap.servers": settings.kafka_bootstrap,
        # librdkafka warns on transient states (a fresh broker's coordinator loading); delivery errors still surface.
        "log_level": 3,
        "enable.idempotence": True,
        "acks": "all",
        "compression.type": "zstd",
        "linger.ms": 20,
        # librdkafka's request limit must hold a message at the limit plus its framing.
        "message.max.bytes": settings.kafka_limit_bytes,
        "batch.size": settings.kafka_limit_bytes,
        "queue.buffering.max.kbytes": max(1048576, 4 * settings.kafka_limit_bytes // 1024),
    }


@dataclass
class ProduceReport:
    sent: int = 0
    bytes: int = 0
    blank_lines: int = 0
    too_large: list[tuple[int, int]] = field(default_factory=list)  # (line number, size)
    failed: list[str] = field(default_factory=list)

    def raise_for_problems(self, limit: int) -> None:
        problems = []
        for line_number, size in self.too_large[:10]:
            problems.append(
                f"line {line_number}: message of {size:,} bytes exceeds LAKEHOUSE_MAX_MESSAGE_BYTES={limit:,}; "
                "split it or raise the limit (see README, 'Message size')"
            )
        if len(self.too_large) > 10:
            problems.append(f"... and {len(self.too_large) - 10} more lines over the limit")
        problems.extend(self.failed[:10])
        if problems:
            raise MessageTooLarge("\n".join(problems)) if self.too_large else PipelineError("\n".join(problems))


def produce(
    settings: Settings,
    messages: Iterable[bytes],
    on_progress: Callable[[int], None] | None = None,
    rate: float = 0.0,
) -> ProduceReport:
    """Send each message (one per item, trailing newline ignored); over-limit messages are reported, not sent."""
    import time

    from confluent_kafka import KafkaException, Producer

    report = ProduceReport()
    # Kafka refused the principal (a wrong password, a missing ACL): retrying cannot help, so sending stops.
    refused: list[str] = []

    def on_error(error: object) -> None:
        problem = security_problem(error, settings, "write to")
        if problem is not None and not refused:
            refused.append(problem)

    producer = Producer(producer_config(settings) | {"error_cb": on_error})

    def delivered(error: object, _message: object) -> None:
        if error is None:
            return
        on_error(error)
        hint = ""
        if "UNKNOWN_TOPIC" in str(error):
            hint = f" (topic {settings.topic!r} does not exist: `lakehouse kafka start` creates it on the local broker)"
        if len(report.failed) < 100:
            report.failed.append(f"delivery failed: {error}{hint}")

    limit = settings.max_message_bytes
    started = time.monotonic()
    try:
        for line_number, raw in enumerate(messages, start=1):
            if refused:
                break
            payload = raw.rstrip(b"\r\n")
            if not payload.strip():
                report.blank_lines += 1
                continue
            if len(payload) > limit:
                report.too_large.append((line_number, len(payload)))
                continue
            while True:
                try:
                    producer.produce(settings.topic, payload, key=message_key(payload), on_delivery=delivered)
                    break
                except BufferError:
                    producer.poll(0.1)  # the local queue is full: wait for deliveries
                except KafkaException as exc:
                    report.failed.append(f"line {line_number}: {exc}")
                    break
            report.sent += 1
            report.bytes += len(payload)
            producer.poll(0)
            if on_progress:
                on_progress(len(raw))
            if rate > 0:
                ahead = report.sent / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
        deadline = time.monotonic() + 120
        remaining = len(producer)
        while remaining and not refused and time.monotonic() < deadline:
            remaining = producer.flush(0.5)
    except (KafkaException, SystemError) as exc:
        # Kafka refused the principal for good (a fatal error, such as no right to write): the next poll or flush
        # raises it, as a SystemError when a delivery callback ran after it.
        fatal = exc.__cause__ if isinstance(exc, SystemError) else exc
        if not isinstance(fatal, KafkaException):
            raise
        refused.insert(0, security_problem(fatal, settings, "write to") or f"Kafka stopped the producer: {fatal}")
    if refused:
        producer.purge()
        raise PipelineError(refused[0]) from None
    if remaining:
        report.failed.append(f"{remaining} messages were not delivered within 120 s; is the broker up?")
    return report
