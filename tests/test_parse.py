"""Parsing and validation of Kafka messages (contract sections 1 and 2), without Spark."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lake.timestamps import TimestampError, parse_general_us, parse_timestamp_us
from pipeline.stream.parse import ParsedMessage, parse_message, parse_messages


def micros(text: str) -> int:
    """Independent reference: datetime does the calendar and offset arithmetic."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def rows(parsed: ParsedMessage) -> list[tuple[object, ...]]:
    return list(
        zip(parsed.device_id, parsed.timestamp_us, parsed.value, parsed.reading_index, parsed.reason_code, strict=True)
    )


@pytest.mark.parametrize(
    ("text", "same_as"),
    [
        ("2024-07-30T12:00:00Z", "2024-07-30T12:00:00+00:00"),
        ("2024-07-30T12:00:00z", "2024-07-30T12:00:00+00:00"),
        ("2024-07-30T14:00:00+02:00", "2024-07-30T12:00:00+00:00"),
        ("2024-07-30T06:30:00-05:30", "2024-07-30T12:00:00+00:00"),
        ("2024-07-30T12:00:00", "2024-07-30T12:00:00+00:00"),  # no offset means UTC
        ("2024-07-30 12:00:00.5Z", "2024-07-30T12:00:00.500000+00:00"),
        ("2024-07-30T12:00:00.123456789Z", "2024-07-30T12:00:00.123456+00:00"),  # truncated, not rounded
        ("2024-07-30T12:00:00.999999999Z", "2024-07-30T12:00:00.999999+00:00"),
        ("2024-07-30T12:00Z", "2024-07-30T12:00:00+00:00"),
        ("2024-07-31T01:00:00+13:00", "2024-07-30T12:00:00+00:00"),
        ("1969-12-31T23:59:59.999999Z", "1969-12-31T23:59:59.999999+00:00"),
        ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00+00:00"),
        ("9999-12-31T23:59:59.999999Z", "9999-12-31T23:59:59.999999+00:00"),
    ],
)
def test_timestamp_formats(text: str, same_as: str) -> None:
    assert parse_timestamp_us(text) == micros(same_as)


def _outcome(parse: Callable[[str], int], text: str) -> int | str:
    try:
        return parse(text)
    except TimestampError:
        return "rejected"


def _two(valid_up_to: int, valid_from: int = 0) -> st.SearchStrategy[str]:
    """Two digits: half the draws in the field's valid range, half anywhere in 00-99."""
    return st.one_of(st.integers(valid_from, valid_up_to), st.integers(0, 99)).map(lambda n: f"{n:02d}")


@given(
    year=st.integers(0, 9999).map(lambda n: f"{n:04d}"),
    month=_two(12, 1),
    day=_two(31, 1),
    hour=_two(23),
    minute=_two(59),
    second=_two(59),
    fraction=st.text("0123456789", max_size=8),
    separator=st.sampled_from(["T", "t", " "]),
    zone=st.sampled_from(["Z", "z", "", "+00:00", "-01:30"]),
)
def test_the_quick_timestamp_path_agrees_with_the_general_one(
    year: str, month: str, day: str, hour: str, minute: str, second: str, fraction: str, separator: str, zone: str
) -> None:
    """Canonical strings take `datetime.fromisoformat`; every string must get what the contract's general path
    gives it: the same instant, or a rejection. Calendar edges (day 0, 29-31 February, hour 24, second 60, year 0)
    and the forms around the canonical one (no or long fractions, other separators and zones) are all drawn."""
    text = f"{year}-{month}-{day}{separator}{hour}:{minute}:{second}{'.' + fraction if fraction else ''}{zone}"
    assert _outcome(parse_timestamp_us, text) == _outcome(parse_general_us, text)


@given(day=st.integers(1, date.max.toordinal()), micros=st.integers(0, 86_399_999_999), digits=st.integers(0, 6))
def test_valid_canonical_timestamps_round_trip(day: int, micros: int, digits: int) -> None:
    """Every valid instant written canonically (with 0-6 fractional digits) reads back to itself, on both paths."""
    moment = datetime.combine(date.fromordinal(day), datetime.min.time(), UTC) + timedelta(microseconds=micros)
    kept = moment.microsecond - moment.microsecond % 10 ** (6 - digits)
    moment = moment.replace(microsecond=kept)
    fraction = f".{kept:06d}"[: digits + 1] if digits else ""
    text = f"{moment.year:04d}-{moment:%m-%dT%H:%M:%S}{fraction}Z"  # %Y does not pad years before 1000
    expected = (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    assert parse_timestamp_us(text) == parse_general_us(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "2024-07-30",
        "0000-01-01T00:00:00Z",
        "10000-01-01T00:00:00Z",
        "2024-13-01T00:00:00Z",
        "2024-02-30T00:00:00Z",
        "2024-07-30T24:00:00Z",
        "2024-07-30T12:00:60Z",
        "yesterday",
        "",
        "2024-07-30T12:00:00+25:00",
        "1722340800",
        "0001-01-01T00:00:00+01:00",
        "9999-12-31T23:59:59-00:01",
    ],
)
def test_bad_timestamps(text: str) -> None:
    parsed = parse_messages([json.dumps({"device_id": "d", "timestamp": text, "value": 1}).encode()])
    assert parsed.reason_code == ["bad_timestamp"]
    assert parsed.reading_index == [0]


def test_three_shapes_and_device_override() -> None:
    single = {"device_id": "pump-7", "timestamp": "2024-07-30T12:00:00Z", "value": 42, "site": "north"}
    batch = {
        "device_id": "pump-7",
        "readings": [
            {"timestamp": "2024-07-30T12:00:01Z", "value": 1.5},
            {"device_id": "valve-1", "timestamp": "2024-07-30T12:00:02Z", "value": -2e3},
        ],
    }
    array = [{"device_id": "meter-3", "timestamp": "2024-07-30T12:00:03Z", "value": 0}]
    parsed = parse_messages([json.dumps(m).encode() for m in (single, batch, array)])
    assert rows(parsed) == [
        ("pump-7", micros("2024-07-30T12:00:00+00:00"), 42.0, 0, None),
        ("pump-7", micros("2024-07-30T12:00:01+00:00"), 1.5, 0, None),
        ("valve-1", micros("2024-07-30T12:00:02+00:00"), -2000.0, 1, None),
        ("meter-3", micros("2024-07-30T12:00:03+00:00"), 0.0, 0, None),
    ]
    assert parsed.source == [0, 1, 1, 2]


def test_invalid_readings_keep_their_valid_siblings() -> None:
    readings = [{"timestamp": f"2024-07-30T12:00:{i:02d}Z", "value": i} for i in range(10)]
    readings.insert(3, {"timestamp": "2024-07-30T12:00:00Z", "value": "12"})
    readings.insert(6, {"timestamp": "not a time", "value": 1})
    readings.insert(9, {"device_id": "", "timestamp": "2024-07-30T12:00:00Z", "value": 1})
    parsed = parse_messages([json.dumps({"device_id": "d", "readings": readings}).encode()])
    valid = [r for r in rows(parsed) if r[4] is None]
    invalid = [(r[3], r[4]) for r in rows(parsed) if r[4] is not None]
    assert len(valid) == 10
    assert [v[2] for v in valid] == [float(i) for i in range(10)]
    assert invalid == [(3, "bad_value"), (6, "bad_timestamp"), (9, "bad_device_id")]
    # the quarantined reading's own JSON is kept
    assert json.loads(parsed.raw[parsed.reason_code.index("bad_value")]) == {
        "timestamp": "2024-07-30T12:00:00Z",
        "value": "12",
    }


@pytest.mark.parametrize(
    ("payload", "reason", "index"),
    [
        (b"not json", "not_json", None),
        (b'{"device_id": "d", "timestamp": "2024-07-30T12:00:00Z", "value": 1', "not_json", None),
        (b"\xff\xfe{}", "not_utf8", None),
        (b"", "not_json", None),
        (b"null", "bad_shape", None),
        (b"42", "bad_shape", None),
        (b'"text"', "bad_shape", None),
        (b"[]", "no_readings", None),
        (b'{"device_id": "d", "readings": []}', "no_readings", None),
        (b'{"device_id": "d", "readings": {"a": 1}}', "bad_shape", None),
        (b"[1]", "bad_reading_shape", 0),
        (b'{"timestamp": "2024-07-30T12:00:00Z", "value": 1}', "missing_device_id", 0),
        (b'{"device_id": 5, "timestamp": "2024-07-30T12:00:00Z", "value": 1}', "bad_device_id", 0),
        (b'{"device_id": "d", "value": 1}', "missing_timestamp", 0),
        (b'{"device_id": "d", "timestamp": 1722340800, "value": 1}', "bad_timestamp", 0),
        (b'{"device_id": "d", "timestamp": "2024-07-30T12:00:00Z"}', "missing_value", 0),
        (b'{"device_id": "d", "timestamp": "2024-07-30T12:00:00Z", "value": null}', "bad_value", 0),
        (b'{"device_id": "d", "timestamp": "2024-07-30T12:00:00Z", "value": true}', "bad_value", 0),
        (b'{"device_id": "d", "timestamp": "2024-07-30T12:00:00Z", "value": 1e999}', "bad_value", 0),
        (b'{"device_id": "d", "timestamp": "2024-07-30T12:00:00Z", "value": NaN}', "not_json", None),
        (b"[" * 10_000 + b"]" * 10_000, "too_deep", None),
    ],
)
def test_quarantine_reasons(payload: bytes, reason: str, index: int | None) -> None:
    parsed = ParsedMessage()
    parse_message(payload, 0, parsed)
    assert parsed.reason_code == [reason]
    assert parsed.reading_index == [index]
    assert parsed.reason[0]  # a human-readable message


def test_duplicate_keys_last_wins_and_extra_fields_are_ignored() -> None:
    payload = b'{"device_id": "a", "device_id": "b", "timestamp": "2024-07-30T12:00:00Z", "value": 1, "x": {"y": [1]}}'
    parsed = parse_messages([payload])
    assert parsed.device_id == ["b"]
    assert parsed.reason_code == [None]


def test_big_batch_is_read_whole() -> None:
    readings = [
        {"timestamp": f"2024-07-30T12:{i // 60000 % 60:02d}:{i // 1000 % 60:02d}.{i % 1000:03d}Z", "value": i * 0.5}
        for i in range(80_000)
    ]
    payload = json.dumps({"device_id": "big", "readings": readings}).encode()
    assert len(payload) > 4 * 1024 * 1024
    parsed = parse_messages([payload])
    assert len(parsed) == 80_000
    assert parsed.reason_code.count(None) == 80_000
    assert sum(parsed.value) == pytest.approx(sum(i * 0.5 for i in range(80_000)), rel=1e-12)


def test_invalid_utf8_inside_a_string_is_quarantined_not_raised() -> None:
    # msgspec raises UnicodeDecodeError (not a DecodeError) for bad bytes inside a JSON string.
    parsed = parse_messages([b'{"device_id": "caf\xe9", "timestamp": "2024-07-30T12:00:00Z", "value": 1}'])
    assert parsed.reason_code == ["not_utf8"] and parsed.reading_index == [None]


def test_a_lone_surrogate_escape_in_device_id_is_quarantined_not_raised() -> None:
    # json and msgspec both decode "\ud800" to a str that cannot be written as UTF-8 (it failed the Arrow batch).
    parsed = parse_messages([b'{"device_id": "\\ud800", "timestamp": "2024-07-30T12:00:00Z", "value": 1}'])
    assert parsed.reason_code == ["bad_device_id"] and parsed.reading_index == [0]


def test_a_parser_failure_quarantines_the_message_instead_of_stopping_the_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pipeline.stream import parse

    def broken(*_args: object) -> None:
        raise KeyError("a bug")

    monkeypatch.setattr(parse, "_slow_path", broken)
    good = b'{"device_id": "d", "timestamp": "2024-07-30T12:00:00Z", "value": 1}'
    parsed = parse_messages([good, b'[{"device_id": "d", "timestamp": "2024-07-30T12:00:00Z", "value": 1}, 5]', good])
    assert parsed.source == [0, 1, 2]  # the half-parsed message left nothing behind
    assert parsed.reason_code == [None, "parser_error", None]
    assert "KeyError('a bug')" in (parsed.reason[1] or "")


def test_extra_timestamp_formats_are_tried_after_iso_8601() -> None:
    from pipeline.stream.parse import Rules

    message = b'{"device_id": "d", "timestamp": "30/07/2024 14:00:01", "value": 1}'
    assert parse_messages([message]).reason_code == ["bad_timestamp"]
    day_first = Rules(extra_timestamp_formats=("%d/%m/%Y %H:%M:%S",))
    parsed = parse_messages(
        [message, b'{"device_id": "d", "timestamp": "2024-07-30T14:00:01Z", "value": 1}'], day_first
    )
    assert parsed.reason_code == [None, None] and parsed.timestamp_us[0] == parsed.timestamp_us[1] == 1722348001000000


def metric_rows(parsed: ParsedMessage) -> list[tuple[object, ...]]:
    return list(
        zip(parsed.device_id, parsed.metric, parsed.value, parsed.reading_index, parsed.reason_code, strict=True)
    )


def test_the_three_forms_of_a_readings_metrics() -> None:
    at = '"timestamp": "2024-07-30T12:00:00Z"'
    parsed = parse_messages(
        [
            f'{{"device_id": "p", {at}, "value": 1.5}}'.encode(),
            f'{{"device_id": "p", {at}, "metric": "pressure_bar", "value": 2}}'.encode(),
            f'{{"device_id": "p", {at}, "metrics": {{"flow_m3h": 12.0, "motor.rpm": 1450, "Temp-C": -3}}}}'.encode(),
            f'{{"device_id": "p", "readings": [{{{at}, "metrics": {{"a": 1}}}}, {{{at}, "value": 3}}]}}'.encode(),
        ]
    )
    assert metric_rows(parsed) == [
        ("p", "value", 1.5, 0, None),
        ("p", "pressure_bar", 2.0, 0, None),
        ("p", "flow_m3h", 12.0, 0, None),
        ("p", "motor.rpm", 1450.0, 0, None),
        ("p", "Temp-C", -3.0, 0, None),
        ("p", "a", 1.0, 0, None),
        ("p", "value", 3.0, 1, None),
    ]
    assert parsed.source == [0, 1, 2, 2, 2, 3, 3]


@pytest.mark.parametrize(
    ("quantities", "expected"),
    [
        ('"metrics": {"ok": 1, "9lives": 2}', [("ok", None), ("9lives", "bad_metric")]),
        ('"metrics": {"ok": 1, "": 2}', [("ok", None), ("", "bad_metric")]),
        ('"metrics": {"' + "x" * 65 + '": 2}', [("x" * 65, "bad_metric")]),
        ('"metrics": {"' + "x" * 64 + '": 2}', [("x" * 64, None)]),
        ('"metrics": {"a b": 2, "ok": 3}', [("a b", "bad_metric"), ("ok", None)]),
        ('"metrics": {"ok": 1, "hot": 1e999}', [("ok", None), ("hot", "bad_value")]),
        ('"metrics": {"ok": 1, "s": "42", "n": null, "b": true}', [("ok", None)] + [(m, "bad_value") for m in "snb"]),
        ('"metrics": {}', [(None, "missing_value")]),
        ('"metrics": null', [(None, "missing_value")]),
        ('"metrics": [1, 2]', [(None, "bad_shape")]),
        ('"metrics": {"a": 1}, "value": 2', [(None, "bad_shape")]),
        ('"metrics": {"a": 1}, "metric": "a"', [(None, "bad_shape")]),
        ('"metric": "flow"', [("flow", "missing_value")]),
        ('"metric": "9x", "value": 1', [("9x", "bad_metric")]),
        ('"metric": 7, "value": 1', [(None, "bad_metric")]),
        ('"metric": "flow", "value": "x"', [("flow", "bad_value")]),
        ('"value": "x"', [("value", "bad_value")]),
        ("", [(None, "missing_value")]),
    ],
)
def test_each_metric_is_judged_alone(quantities: str, expected: list[tuple[str | None, str | None]]) -> None:
    separator = ", " if quantities else ""
    payload = f'{{"device_id": "p", "timestamp": "2024-07-30T12:00:00Z"{separator}{quantities}}}'.encode()
    parsed = parse_messages([payload])
    assert list(zip(parsed.metric, parsed.reason_code, strict=True)) == expected
    # A quarantine row of one metric carries the whole reading, so that `lakehouse replay` can read it again.
    for raw, reason in zip(parsed.raw, parsed.reason_code, strict=True):
        assert (raw is None) == (reason is None)
        if raw is not None:
            assert json.loads(raw)["device_id"] == "p"


def test_too_many_metrics_quarantines_the_whole_reading() -> None:
    from pipeline.stream.parse import Rules

    many = ", ".join(f'"m{i}": {i}' for i in range(4))
    payload = f'{{"device_id": "p", "timestamp": "2024-07-30T12:00:00Z", "metrics": {{{many}}}}}'.encode()
    assert parse_messages([payload], Rules(max_metrics_per_reading=4)).reason_code == [None] * 4
    refused = parse_messages([payload], Rules(max_metrics_per_reading=3))
    assert refused.reason_code == ["too_many_metrics"] and refused.metric == [None]
    assert refused.reason[0] is not None and "LAKEHOUSE_MAX_METRICS_PER_READING=3" in refused.reason[0]


@given(
    st.dictionaries(
        st.text(alphabet="abcXYZ09_.-", min_size=0, max_size=70),
        st.one_of(
            st.floats(allow_nan=False, allow_infinity=False), st.integers(-(10**20), 10**20), st.text(max_size=3)
        ),
        min_size=1,
        max_size=12,
    )
)
def test_metrics_fast_and_slow_paths_agree(named: dict[str, object]) -> None:
    """Whatever the metrics hold, the typed fast path and the generic one yield the same rows: each valid name and
    finite number a reading, each other a quarantine row naming its metric."""
    import re

    payload = json.dumps({"device_id": "p", "timestamp": "2024-07-30T12:00:00Z", "metrics": named}).encode()
    parsed = parse_messages([payload])
    expected = []
    for name, value in named.items():
        good_name = re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]{0,63}", name) is not None
        good_value = isinstance(value, (int, float)) and abs(float(value)) != float("inf")
        reason = None if good_name and good_value else "bad_metric" if not good_name else "bad_value"
        expected.append((name, float(value) if reason is None else None, reason))  # type: ignore[arg-type]
    assert sorted(zip(parsed.metric, parsed.value, parsed.reason_code, strict=True), key=str) == sorted(
        expected, key=str
    )
