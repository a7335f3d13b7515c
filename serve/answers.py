"""Answers of the serving store's current snapshot kept in memory, so that a dashboard's repeated questions cost no
query: bounded in bytes, keyed by a request's normalized parameters, and never older than the snapshot served.

The store counts a generation up with each sync (serve.snapshot) and tells the cache, before any request may see
the new generation, which of its rows the sync changed (`Changes`). An answer is kept with what it was made of:
- the KPIs of one bucket the store holds under a key (gold's metric and second, a rollup's bucket) depend on that
  row alone: they stay kept across syncs that leave the row as it was, and are encoded again with the new
  snapshot's freshness (versions, watermark, so `final`) the first time they are asked for in it;
- every other answer (a range, a device's second read from silver, the catalog, devices) is dropped at every sync.
An answer is kept only under the generation its rows were read at, and only while that generation is the cache's.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

# What a kept answer costs beside its encoded bytes: its rows, the key's tuple and strings, the dict's slot.
ENTRY_OVERHEAD = 1024
# Past this many changed rows of a table in one sync, every answer that depends on that table is dropped.
MAX_CHANGED_KEYS = 100_000


@dataclass(frozen=True)
class Changes:
    """What one sync changed: the store keys of gold's and the rollups' rows it replaced (None: the whole table,
    as a copy of it does). Silver's changes need no keys: no kept answer outlives a sync but those of one row."""

    gold: frozenset[str] | None = frozenset()
    rollups: frozenset[str] | None = frozenset()

    @classmethod
    def everything(cls) -> Changes:
        return cls(None, None)

    def touches(self, table: str, key: str) -> bool:
        changed = self.gold if table == "gold" else self.rollups
        return changed is None or key in changed


@dataclass
class Kept:
    """One kept answer: `render(snapshot)` makes its body for a snapshot (the freshness part changes from one
    generation to the next); `depends` is the store row it was read from, as (table, key), or None when it is
    dropped at every sync."""

    render: Callable[[Any], bytes]
    depends: tuple[str, str] | None
    body: bytes
    generation: int  # the generation `body` was rendered for
    cost: int = field(init=False)

    def __post_init__(self) -> None:
        self.cost = len(self.body) + ENTRY_OVERHEAD


class AnswerCache:
    """Least recently used answers valid at the cache's generation, at most `max_bytes` of them (0 keeps none)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._generation: int | None = None
        self._answers: OrderedDict[Hashable, Kept] = OrderedDict()
        self._bytes = 0

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._answers)

    def advance(self, generation: int, changes: Changes) -> None:
        """The store moved to `generation` with `changes`: drop every answer they may have changed. Called by the
        store before any request can see the generation."""
        with self._lock:
            if self._generation is not None and generation <= self._generation:
                return
            self._generation = generation
            for key in [
                k for k, kept in self._answers.items() if kept.depends is None or changes.touches(*kept.depends)
            ]:
                self._bytes -= self._answers.pop(key).cost

    def get(self, generation: int, key: Hashable) -> Kept | None:
        """The answer of `key` kept at `generation`; its `body` is current when its `generation` is, else the caller
        renders it for the snapshot (the store read the new version's watermark when it published it) and hands it
        back with `rendered`."""
        with self._lock:
            if generation != self._generation:
                return None
            kept = self._answers.get(key)
            if kept is not None:
                self._answers.move_to_end(key)
            return kept

    def rendered(self, generation: int, key: Hashable, kept: Kept, body: bytes) -> None:
        """`kept` rendered again for `generation`."""
        with self._lock:
            if self._generation == generation and self._answers.get(key) is kept:
                self._bytes += len(body) - len(kept.body)
                kept.body, kept.generation, kept.cost = body, generation, len(body) + ENTRY_OVERHEAD

    def put(self, generation: int, key: Hashable, kept: Kept) -> None:
        """Keep an answer whose rows were read at `generation` (ignored unless that is the cache's generation)."""
        if kept.cost > self.max_bytes:
            return
        with self._lock:
            if generation != self._generation:
                return
            old = self._answers.pop(key, None)
            if old is not None:
                self._bytes -= old.cost
            self._answers[key] = kept
            self._bytes += kept.cost
            while self._bytes > self.max_bytes:
                _, dropped = self._answers.popitem(last=False)
                self._bytes -= dropped.cost
