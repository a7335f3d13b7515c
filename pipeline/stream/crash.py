"""Fault injection for the crash tests: LAKEHOUSE_TEST_CRASH_AFTER=<stage>:<batch id or *> kills the process group with
SIGKILL right after that stage's Delta commit (silver, gold, bronze, quarantine, rollups, replay_silver, replay_gold,
replay_rollups), before Spark's checkpoint commit. Unset, it does nothing."""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger("lakehouse.pipeline")

_CRASH_AFTER = os.environ.get("LAKEHOUSE_TEST_CRASH_AFTER", "")


def crash_point(stage: str, batch_id: int) -> None:
    if _CRASH_AFTER in (f"{stage}:{batch_id}", f"{stage}:*"):
        log.warning("LAKEHOUSE_TEST_CRASH_AFTER=%s: killing the pipeline now", _CRASH_AFTER)
        # The whole group (Python and Spark's JVM) when the pipeline leads its own, as the crash tests start it.
        if os.getpgid(0) == os.getpid():
            os.killpg(0, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
