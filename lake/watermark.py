"""The event-time watermark: from when on a bucket's KPIs are final, and which readings arrived late.

- Each micro-batch takes the newest reading time it holds, each reading's time capped at its Kafka record's
  timestamp (the broker's append time: a device whose clock runs ahead cannot push the watermark past what has
  arrived), and moves the watermark to that minus `LAKEHOUSE_ALLOWED_LATENESS`, never back.
- One watermark for all of the topic's partitions: a partition whose readings lag the others' by more than the
  allowed lateness has its readings counted late (they still count in every KPI).
- A bucket is final once the watermark has reached its end. A reading that arrives when its bucket is final still
  counts; it is late for that bucket (and for no coarser bucket that is not final yet).
- The stream records the watermark in the commitInfo of each gold commit it makes (`userMetadata`, as JSON), with
  the watermark before the batch and the batch's query and id: a batch run again after a crash finds its own entry
  and classifies its readings as the first run did. Readers (the API, `lakehouse sql`) take it from the newest
  commit that has one at the gold version they read. Only the stream records it, so the newest entry is always
  the greatest: `lakehouse replay`'s commits carry none, whenever they land.
- Log cleanup removes old commits and their commitInfo; `lakehouse maintain` copies the newest entry into gold's
  table property `lakehouse.watermark` before it cleans gold's log (table properties live on in checkpoints), and
  a reader that finds no entry takes the property's.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass

from lake import deltalog
from lake.errors import LakeError

USER_METADATA_CONF = "spark.databricks.delta.commitInfo.userMetadata"
_KEY = "lakehouse.watermark"
PROPERTY = _KEY  # gold's table property that keeps the watermark past log cleanup
# Commits without a watermark (`lakehouse maintain`'s compaction, an older release's) are passed over, back to
# this many versions.
LOOK_BACK = 200


@dataclass(frozen=True)
class Watermark:
    """After batch `batch` of query `query`: the watermark (Unix microseconds), and what it was before the batch.
    None: no reading has been processed yet, so nothing is final."""

    query: str
    batch: int
    before_us: int | None
    watermark_us: int | None
    # The batch's first and last reading times: which of gold's seconds its commits may have written.
    lo_us: int | None = None
    hi_us: int | None = None

    def user_metadata(self) -> str:
        return json.dumps({_KEY: asdict(self)})

    def recorded_by(self, query: str, batch: int) -> bool:
        """This entry was recorded by batch `batch` of `query`: that batch is being run again after a crash."""
        return (self.query, self.batch) == (query, batch)

    def advanced(
        self,
        query: str,
        batch: int,
        event_high_us: int | None,
        lateness_us: int,
        lo_us: int | None = None,
        hi_us: int | None = None,
    ) -> Watermark:
        """The watermark for batch `batch` of `query`, whose capped newest reading time is `event_high_us` and
        whose readings lie between `lo_us` and `hi_us`; the same classification again for the batch that recorded
        this one (a batch run again after a crash)."""
        before = self.before_us if self.recorded_by(query, batch) else self.watermark_us
        candidate = None if event_high_us is None else event_high_us - lateness_us
        after = max((w for w in (before, candidate) if w is not None), default=None)
        return Watermark(query, batch, before, after, lo_us, hi_us)


NONE = Watermark("", -1, None, None)


def parse(user_metadata: str | None) -> Watermark | None:
    if not user_metadata:
        return None
    try:
        return _of(json.loads(user_metadata).get(_KEY))
    except (ValueError, AttributeError):
        return None


def _of(found: object) -> Watermark | None:
    try:
        return Watermark(
            str(found["query"]),  # type: ignore[index]
            int(found["batch"]),  # type: ignore[index]
            _optional_int(found["before_us"]),  # type: ignore[index]
            _optional_int(found["watermark_us"]),  # type: ignore[index]
            _optional_int(found.get("lo_us")),  # type: ignore[attr-defined]
            _optional_int(found.get("hi_us")),  # type: ignore[attr-defined]
        )
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def _optional_int(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


@functools.lru_cache(maxsize=64)
def at_version(gold_location: str, version: int | None) -> Watermark:
    """The watermark recorded at or before `version` of gold."""
    if version is None:
        return NONE
    found = newest_entry(gold_location, version)
    return found if found is not None else kept(gold_location, version)


def newest_entry(gold_location: str, version: int) -> Watermark | None:
    """The entry of the newest commit at or before `version` that records one, looking back LOOK_BACK commits."""
    for older in range(version, max(-1, version - LOOK_BACK), -1):
        info = deltalog.commit_info(gold_location, older)
        found = parse(info.get("userMetadata") if info else None)
        if found is not None:
            return found
    return None


def kept(gold_location: str, version: int | None = None) -> Watermark:
    """The watermark `keep` left in gold's table property at `version` (the newest by default); NONE on a store
    delta-rs cannot open without settings of its own, where nothing was kept."""
    from lake.deltars import open_table

    try:
        return _kept_in(open_table(gold_location, version).metadata().configuration)
    except LakeError:
        return NONE


def _kept_in(configuration: dict[str, str]) -> Watermark:
    text = configuration.get(PROPERTY)
    try:
        found = _of(json.loads(text)) if text else None
    except ValueError:
        found = None
    return found if found is not None else NONE


def _reach(mark: Watermark) -> int:
    return -1 if mark.watermark_us is None else mark.watermark_us


def keep(gold_location: str) -> bool:
    """Copy the newest commit's entry into gold's table property, unless the property holds one as far: the
    watermark then outlives log cleanup. True if a commit was made."""
    from lake.conflicts import delta_rs_conflicts, retry_on_conflict
    from lake.deltars import open_table

    def copy() -> bool:
        table = open_table(gold_location)
        entry = newest_entry(gold_location, table.version())
        if entry is None or _reach(entry) <= _reach(_kept_in(table.metadata().configuration)):
            return False
        table.alter.set_table_properties({PROPERTY: json.dumps(asdict(entry))}, raise_if_not_exists=False)
        return True

    return retry_on_conflict(copy, "recording the watermark in gold's properties", delta_rs_conflicts())
