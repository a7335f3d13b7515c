"""Retrying a Delta commit that lost to a concurrent commit: Spark's writers and delta-rs upkeep alike."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger("lakehouse.conflicts")
T = TypeVar("T")


def spark_conflicts() -> tuple[type[BaseException], ...]:
    """delta-spark's concurrent modification exceptions (ConcurrentAppendException and its kin)."""
    from delta import exceptions

    return tuple(getattr(exceptions, name) for name in exceptions.__all__)


def delta_rs_conflicts() -> tuple[type[BaseException], ...]:
    """delta-rs's "a concurrent commit won" (CommitFailedError)."""
    from deltalake.exceptions import CommitFailedError

    return (CommitFailedError,)


def retry_on_conflict(
    action: Callable[[], T], what: str, conflicts: tuple[type[BaseException], ...] | None = None, attempts: int = 8
) -> T:
    """Run a Delta commit again when a concurrent commit conflicted with it; each try must read the newest version.

    `conflicts` are the exceptions that mean "a concurrent commit won"; delta-spark's when not given."""
    caught = spark_conflicts() if conflicts is None else conflicts
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except caught as exc:
            if attempt == attempts:
                raise
            wait = min(30.0, 0.5 * 2**attempt)
            log.warning(
                "%s conflicted with a concurrent commit (%s); retrying in %.1f s", what, type(exc).__name__, wait
            )
            time.sleep(wait)
    raise AssertionError("unreachable")
