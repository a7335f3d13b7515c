"""The event-time watermark: from when on a bucket's KPIs are final, and which readings arrived late.

- Each micro-batch takes the newest reading time it holds, each reading's time capped at its Kafka record's
  timestamp (the broker's append time: a device whose clock runs ahead cannot push the watermark past what has
  arrived), and moves the watermark to that minus `LAKEHOUSE_ALLOWED_LATENESS`, never back.
- One watermark for all of the topic's partitions: a partition whose readings lag the others' by more than the
  allowed lateness has its readings counted late (they still count in every KPI).
- A bucket is final once the watermark has reached its end. A reading that arrives when its bucket is final still
  counts; it is late for that bucket (and for no coarser bucket that is not final yet).
- The pipeline records the watermark in the commitInfo of each gold commit it makes (`userMetadata`, as JSON), with
  the watermark before the batch and the batch's query and id: a batch run again after a crash finds its own entry
  and classifies its readings as the first run did. Readers (the API, `lakehouse sql`) take it from the newest
  commit that has one at the gold version they read.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass

from lake import deltalog

USER_METADATA_CONF = "spark.databricks.delta.commitInfo.userMetadata"
_KEY = "lakehouse.watermark"
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

    def user_metadata(self) -> str:
        return json.dumps({_KEY: asdict(self)})

    def advanced(self, query: str, batch: int, event_high_us: int | None, lateness_us: int) -> Watermark:
        """The watermark for batch `batch` of `query`, whose capped newest reading time is `event_high_us`; the same
        classification again for the batch that recorded this one (a batch run again after a crash)."""
        before = self.before_us if (self.query, self.batch) == (query, batch) else self.watermark_us
        candidate = None if event_high_us is None else event_high_us - lateness_us
        after = max((w for w in (before, candidate) if w is not None), default=None)
        return Watermark(query, batch, before, after)


NONE = Watermark("", -1, None, None)


def parse(user_metadata: str | None) -> Watermark | None:
    if not user_metadata:
        return None
    try:
        found = json.loads(user_metadata).get(_KEY)
        return Watermark(
            str(found["query"]),
            int(found["batch"]),
            _optional_int(found["before_us"]),
            _optional_int(found["watermark_us"]),
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
    for older in range(version, max(-1, version - LOOK_BACK), -1):
        info = deltalog.commit_info(gold_location, older)
        found = parse(info.get("userMetadata") if info else None)
        if found is not None:
            return found
    return NONE
