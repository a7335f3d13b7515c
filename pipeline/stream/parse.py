"""Reads one Kafka message into readings of metrics and quarantine entries (contract sections 1 and 2).

Pure Python over bytes so that it is testable without Spark; `parse_arrow_batches` runs it inside Spark's
`mapInArrow`. Valid messages take a typed msgspec fast path; any message with a problem is re-read generically
so that each invalid reading gets its own reason and its valid siblings are kept.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from functools import partial
from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

from lake.settings import Settings
from lake.tables import DEFAULT_METRIC, METRIC_NAME
from lake.timestamps import EPOCH, MAX_US, MIN_US, TimestampError, parse_timestamp_us


class Reason(str, Enum):
    """Quarantine reason codes (documented in the README)."""

    NOT_UTF8 = "not_utf8"
    NOT_JSON = "not_json"
    TOO_DEEP = "too_deep"
    BAD_SHAPE = "bad_shape"
    NO_READINGS = "no_readings"
    BAD_READING_SHAPE = "bad_reading_shape"
    MISSING_DEVICE_ID = "missing_device_id"
    BAD_DEVICE_ID = "bad_device_id"
    MISSING_TIMESTAMP = "missing_timestamp"
    BAD_TIMESTAMP = "bad_timestamp"
    MISSING_VALUE = "missing_value"
    BAD_VALUE = "bad_value"
    BAD_METRIC = "bad_metric"
    TOO_MANY_METRICS = "too_many_metrics"
    METRIC_LIMIT = "metric_limit"  # set by the stream, which knows the lake's names (pipeline.stream.names)
    PARSER_ERROR = "parser_error"  # a bug: the parser failed; `lakehouse replay` re-reads the message once fixed


_ONE_US = datetime.resolution


@dataclass(frozen=True)
class Rules:
    """What the parser accepts beyond the contract's formats; a change of rules is what `lakehouse replay` applies."""

    extra_timestamp_formats: tuple[str, ...] = ()  # strptime patterns tried after ISO 8601; no zone = UTC
    max_metrics_per_reading: int = 100  # a reading with more is quarantined whole

    @classmethod
    def from_settings(cls, settings: Settings) -> Rules:
        return cls(
            extra_timestamp_formats=tuple(settings.extra_timestamp_formats),
            max_metrics_per_reading=settings.max_metrics_per_reading,
        )

    def timestamp_us(self, text: str) -> int:
        try:
            return parse_timestamp_us(text)
        except TimestampError:
            if not self.extra_timestamp_formats:
                raise
        for pattern in self.extra_timestamp_formats:
            try:
                moment = datetime.strptime(text, pattern)
            except ValueError:
                continue
            moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
            micros = (moment - EPOCH) // _ONE_US
            if MIN_US <= micros <= MAX_US:
                return micros
        raise TimestampError(
            f"timestamp {text[:64]!r} is neither ISO 8601 nor one of LAKEHOUSE_EXTRA_TIMESTAMP_FORMATS "
            f"{list(self.extra_timestamp_formats)}"
        )


CONTRACT_RULES = Rules()


class InvalidReading(ValueError):
    def __init__(self, reason: Reason, message: str, metric: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.metric = metric


def check_device_id(device_id: object) -> str:
    if device_id is None or device_id is UNSET:
        raise InvalidReading(Reason.MISSING_DEVICE_ID, "device_id is missing")
    if not isinstance(device_id, str) or not device_id:
        raise InvalidReading(Reason.BAD_DEVICE_ID, f"device_id must be a non-empty string, got {device_id!r:.64}")
    if not _is_unicode(device_id):
        raise InvalidReading(
            Reason.BAD_DEVICE_ID, f"device_id {device_id!r:.64} holds a lone surrogate escape, which is not text"
        )
    return device_id


def _is_unicode(text: str) -> bool:
    """False for a string with a lone surrogate (JSON's "\\ud800" decodes to one), which no table can store."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_value(value: object, metric: str | None = None) -> float:
    """The number of `value`, or of the metric named `metric` in `metrics` (the quarantine row names it)."""
    what = "value" if metric in (None, DEFAULT_METRIC) else f"metric {metric!r}"
    if value is UNSET:
        raise InvalidReading(Reason.MISSING_VALUE, f"{what} is missing", metric)
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidReading(Reason.BAD_VALUE, f"{what} must be a JSON number, got {value!r:.64}", metric)
    try:
        number = float(value)
    except OverflowError:
        raise InvalidReading(Reason.BAD_VALUE, f"{what} is out of the range of a double", metric) from None
    if not math.isfinite(number):
        raise InvalidReading(Reason.BAD_VALUE, f"{what} must be finite, got {value!r}", metric)
    return number


# A quarantine row's `metric` for a name that breaks the rule: as much of it as a person needs to find it.
_SHOWN_NAME = 200


def check_metric(name: object) -> str:
    """A metric name as the contract's rule allows it (1-64 characters: a letter, then letters, digits, _ . -)."""
    if isinstance(name, str) and METRIC_NAME.fullmatch(name):
        return name
    raise InvalidReading(
        Reason.BAD_METRIC,
        f"metric name {name!r:.80} is not 1-64 characters of a letter then letters, digits, '_', '.' or '-'",
        _shown(name),
    )


def check_timestamp(timestamp: object, rules: Rules = CONTRACT_RULES) -> int:
    if timestamp is None or timestamp is UNSET:
        raise InvalidReading(Reason.MISSING_TIMESTAMP, "timestamp is missing")
    if not isinstance(timestamp, str):
        raise InvalidReading(Reason.BAD_TIMESTAMP, f"timestamp must be a string, got {timestamp!r:.64}")
    try:
        return rules.timestamp_us(timestamp)
    except TimestampError as exc:
        raise InvalidReading(Reason.BAD_TIMESTAMP, str(exc)) from None


# Typed shapes for the fast path. UNSET tells a missing field from an explicit null.
class _Item(msgspec.Struct):
    device_id: str | None | UnsetType = UNSET
    timestamp: str | None | UnsetType = UNSET
    value: float | None | UnsetType = UNSET
    metric: str | None | UnsetType = UNSET
    metrics: dict[str, float] | None | UnsetType = UNSET


class _Message(msgspec.Struct):
    device_id: str | None | UnsetType = UNSET
    timestamp: str | None | UnsetType = UNSET
    value: float | None | UnsetType = UNSET
    metric: str | None | UnsetType = UNSET
    metrics: dict[str, float] | None | UnsetType = UNSET
    readings: list[_Item] | None | UnsetType = UNSET


_decode_object = msgspec.json.Decoder(_Message).decode
_decode_array = msgspec.json.Decoder(list[_Item]).decode


class ParsedMessage:
    """Columns of what one or more messages yield: readings (reason None) and quarantine entries."""

    __slots__ = (
        "device_id",
        "metric",
        "raw",
        "reading_index",
        "reason",
        "reason_code",
        "source",
        "timestamp_us",
        "value",
    )

    def __init__(self) -> None:
        self.source: list[int] = []  # row of the input (Kafka record) each entry comes from
        self.device_id: list[str | None] = []
        self.timestamp_us: list[int | None] = []
        self.metric: list[str | None] = []
        self.value: list[float | None] = []
        self.reading_index: list[int | None] = []
        self.reason_code: list[str | None] = []
        self.reason: list[str | None] = []
        self.raw: list[str | None] = []

    def reading(self, source: int, device_id: str, timestamp_us: int, metric: str, value: float, index: int) -> None:
        self.source.append(source)
        self.device_id.append(device_id)
        self.timestamp_us.append(timestamp_us)
        self.metric.append(metric)
        self.value.append(value)
        self.reading_index.append(index)
        self.reason_code.append(None)
        self.reason.append(None)
        self.raw.append(None)

    def quarantine(
        self, source: int, index: int | None, reason: Reason, message: str, raw: str | None, metric: str | None = None
    ) -> None:
        self.source.append(source)
        self.device_id.append(None)
        self.timestamp_us.append(None)
        self.metric.append(metric)
        self.value.append(None)
        self.reading_index.append(index)
        self.reason_code.append(reason.value)
        self.reason.append(message)
        self.raw.append(raw)

    def __len__(self) -> int:
        return len(self.source)

    def truncate(self, length: int) -> None:
        """Drop the entries after the first `length` (what a message that failed halfway appended)."""
        for name in self.__slots__:
            del getattr(self, name)[length:]


def _fast_path(payload: bytes, source: int, out: ParsedMessage, rules: Rules) -> bool:
    """Decode a message that is valid throughout; False (nothing appended) if anything needs the slow path."""
    start = payload.lstrip()[:1]
    try:
        if start == b"{":
            message = _decode_object(payload)
            if message.readings is UNSET:
                items: list[Any] = [message]
                default_device: object = UNSET
            elif message.readings:
                items = message.readings
                default_device = message.device_id
            else:
                return False
        elif start == b"[":
            items = _decode_array(payload)
            default_device = UNSET
            if not items:
                return False
        else:
            return False
        rows = []
        for index, item in enumerate(items):
            device = item.device_id if item.device_id is not UNSET and item.device_id is not None else default_device
            if not isinstance(device, str) or not device or not isinstance(item.timestamp, str):
                return False
            if not _is_unicode(device):
                return False
            timestamp_us = parse_timestamp_us(item.timestamp)
            if item.metrics is UNSET:
                if not isinstance(item.value, float):
                    return False
                if item.metric is UNSET:  # the tutorial's form: no name to check
                    metric = DEFAULT_METRIC
                elif isinstance(item.metric, str) and METRIC_NAME.fullmatch(item.metric):
                    metric = item.metric
                else:
                    return False
                rows.append((device, timestamp_us, metric, item.value, index))
            else:
                named = item.metrics
                if not named or item.value is not UNSET or item.metric is not UNSET:
                    return False
                if len(named) > rules.max_metrics_per_reading:
                    return False
                for metric, value in named.items():
                    if not METRIC_NAME.fullmatch(metric):
                        return False
                    rows.append((device, timestamp_us, metric, value, index))
    except (msgspec.DecodeError, msgspec.ValidationError, TimestampError, RecursionError, UnicodeDecodeError):
        return False
    for device, timestamp_us, metric, value, index in rows:
        out.reading(source, device, timestamp_us, metric, value, index)
    return True


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _slow_path(payload: bytes, source: int, out: ParsedMessage, rules: Rules) -> None:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        out.quarantine(
            source, None, Reason.NOT_UTF8, f"message is not UTF-8: {exc}", payload.decode("utf-8", "backslashreplace")
        )
        return
    try:
        document = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        out.quarantine(source, None, Reason.TOO_DEEP, "message is nested too deeply to read", text)
        return
    except ValueError as exc:
        out.quarantine(source, None, Reason.NOT_JSON, f"message is not JSON: {exc}", text)
        return
    if isinstance(document, dict) and "readings" in document:
        items = document["readings"]
        if not isinstance(items, list):
            out.quarantine(source, None, Reason.BAD_SHAPE, "'readings' must be an array of readings", text)
            return
        default_device = document.get("device_id", UNSET)
    elif isinstance(document, dict):
        items, default_device = [document], UNSET
    elif isinstance(document, list):
        items, default_device = document, UNSET
    else:
        out.quarantine(
            source,
            None,
            Reason.BAD_SHAPE,
            f"message must be a JSON object or array, got {type(document).__name__}",
            text,
        )
        return
    if not items:
        out.quarantine(source, None, Reason.NO_READINGS, "message holds no readings", text)
        return
    for index, item in enumerate(items):
        try:
            if not isinstance(item, dict):
                raise InvalidReading(
                    Reason.BAD_READING_SHAPE, f"a reading must be a JSON object, got {type(item).__name__}"
                )
            own_device = item.get("device_id")
            device = check_device_id(own_device if own_device is not None else default_device)
            timestamp_us = check_timestamp(item.get("timestamp", UNSET), rules)
            quantities = _quantities(item, rules)
        except InvalidReading as problem:
            out.quarantine(
                source, index, problem.reason, str(problem), json.dumps(item, allow_nan=True), problem.metric
            )
            continue
        raw = None
        for quantity in quantities:
            if isinstance(quantity, InvalidReading):  # one bad metric: quarantined alone, its siblings kept
                raw = raw or json.dumps(item, allow_nan=True)
                out.quarantine(source, index, quantity.reason, str(quantity), raw, quantity.metric)
            else:
                out.reading(source, device, timestamp_us, quantity[0], quantity[1], index)


def _quantities(item: dict[str, Any], rules: Rules) -> list[tuple[str, float] | InvalidReading]:
    """A reading's metrics (contract section 1), each a (name, value) or the problem that quarantines it alone;
    raises InvalidReading for a problem of the whole reading."""
    has_value, named = "value" in item, item.get("metrics")
    if named is not None and (has_value or "metric" in item):
        raise InvalidReading(
            Reason.BAD_SHAPE, "a reading carries either 'value' (with or without 'metric') or 'metrics', not both"
        )
    if named is None:
        if not has_value and "metrics" not in item:
            if "metric" in item:
                raise InvalidReading(Reason.MISSING_VALUE, "value is missing", _shown(item["metric"]))
            raise InvalidReading(Reason.MISSING_VALUE, "the reading has neither 'value' nor 'metrics'")
        if "metrics" in item:  # "metrics": null
            raise InvalidReading(Reason.MISSING_VALUE, "'metrics' is null: it must hold at least one metric")
        metric = check_metric(item["metric"]) if "metric" in item else DEFAULT_METRIC
        return [(metric, check_value(item["value"], metric))]
    if not isinstance(named, dict):
        raise InvalidReading(
            Reason.BAD_SHAPE, f"'metrics' must be a JSON object of names and numbers, got {type(named).__name__}"
        )
    if not named:
        raise InvalidReading(Reason.MISSING_VALUE, "'metrics' is empty: it must hold at least one metric")
    if len(named) > rules.max_metrics_per_reading:
        raise InvalidReading(
            Reason.TOO_MANY_METRICS,
            f"the reading carries {len(named)} metrics, more than LAKEHOUSE_MAX_METRICS_PER_READING="
            f"{rules.max_metrics_per_reading}; split it, or raise the setting",
        )
    quantities: list[tuple[str, float] | InvalidReading] = []
    for name, value in named.items():
        try:
            quantities.append((check_metric(name), check_value(value, name)))
        except InvalidReading as problem:
            quantities.append(problem)
    return quantities


def _shown(name: object) -> str | None:
    """A metric name as a quarantine row shows it (one that breaks the rule too, cut to a readable length)."""
    if not isinstance(name, str):
        return None
    return name[:_SHOWN_NAME].encode("utf-8", "backslashreplace").decode()


def parse_message(payload: bytes | None, source: int, out: ParsedMessage, rules: Rules = CONTRACT_RULES) -> None:
    """Append what one Kafka message value yields to `out`."""
    if payload is None or not payload.strip():
        out.quarantine(source, None, Reason.NOT_JSON, "message is empty", None if payload is None else "")
        return
    mark = len(out)
    try:
        if not _fast_path(payload, source, out, rules):
            _slow_path(payload, source, out, rules)
    except Exception as exc:  # noqa: BLE001 - no message may stop the stream, not even one that finds a bug
        out.truncate(mark)
        out.quarantine(
            source,
            None,
            Reason.PARSER_ERROR,
            f"the parser failed on this message: {exc!r:.500}",
            payload.decode("utf-8", "backslashreplace"),
        )


def parse_messages(payloads: list[bytes | None], rules: Rules = CONTRACT_RULES) -> ParsedMessage:
    out = ParsedMessage()
    for source, payload in enumerate(payloads):
        parse_message(payload, source, out, rules)
    return out


# Columns that mapInArrow passes through from the Kafka record to every row it yields.
PASSTHROUGH = ("topic", "partition", "offset", "kafka_timestamp")

OUTPUT_DDL = (
    "topic STRING, `partition` INT, `offset` BIGINT, kafka_timestamp TIMESTAMP, device_id STRING, "
    "`timestamp` TIMESTAMP, value DOUBLE, reading_index INT, reason_code STRING, reason STRING, raw STRING, "
    "metric STRING, opens_record BOOLEAN"
)
# The columns of OUTPUT_DDL that are not a reading's (`opens_record`: the first row a Kafka record yields, which
# counts records now that a reading may yield a row per metric).
NOT_READING_COLUMNS = ("reason_code", "reason", "raw", "opens_record")


def parse_arrow_batches(batches: Iterator[Any], rules: Rules = CONTRACT_RULES) -> Iterator[Any]:
    """mapInArrow body: Kafka records (PASSTHROUGH + value) in, parsed rows (OUTPUT_DDL) out."""
    import numpy as np
    import pyarrow as pa

    for batch in batches:
        parsed = parse_messages(batch.column("value").to_pylist(), rules)
        take = pa.array(parsed.source, type=pa.int32())
        columns = {name: batch.column(name).take(take) for name in PASSTHROUGH}
        columns["device_id"] = pa.array(parsed.device_id, type=pa.string())
        columns["timestamp"] = pa.array(parsed.timestamp_us, type=pa.int64()).cast(pa.timestamp("us", tz="UTC"))
        columns["value"] = pa.array(parsed.value, type=pa.float64())
        columns["reading_index"] = pa.array(parsed.reading_index, type=pa.int32())
        columns["reason_code"] = pa.array(parsed.reason_code, type=pa.string())
        columns["reason"] = pa.array(parsed.reason, type=pa.string())
        columns["raw"] = pa.array(parsed.raw, type=pa.string())
        columns["metric"] = pa.array(parsed.metric, type=pa.string())
        sources = take.to_numpy()
        opens = np.ones(len(sources), dtype=bool)
        opens[1:] = sources[1:] != sources[:-1]
        columns["opens_record"] = pa.array(opens, type=pa.bool_())
        yield pa.RecordBatch.from_pydict(columns)


def arrow_parser(rules: Rules) -> Any:
    """The mapInArrow function for these rules (a partial pickles with the rules into Spark's Python workers)."""
    return partial(parse_arrow_batches, rules=rules)
