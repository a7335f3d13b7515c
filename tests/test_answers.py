"""The answers the API keeps in memory (serve.answers): what a sync drops, what it keeps and renders again, the bound
in bytes, and answers read at a generation the cache has left."""

from __future__ import annotations

from serve.answers import ENTRY_OVERHEAD, AnswerCache, Changes, Kept


def kept(body: bytes, depends: tuple[str, str] | None, generation: int) -> Kept:
    return Kept(lambda snapshot: body + b" at " + str(snapshot).encode(), depends, body, generation)


def test_a_sync_drops_the_answers_of_the_rows_it_changed_and_renders_the_others_again() -> None:
    cache = AnswerCache(1 << 20)
    cache.advance(1, Changes.everything())
    cache.put(1, "second 10", kept(b"a", ("gold", "m|10"), 1))
    cache.put(1, "second 11", kept(b"b", ("gold", "m|11"), 1))
    cache.put(1, "minute 0", kept(b"c", ("rollups", "minute|m||0"), 1))
    cache.put(1, "range", kept(b"d", None, 1))
    assert cache.get(1, "second 10") is not None and len(cache) == 4

    cache.advance(2, Changes(gold=frozenset({"m|11"}), rollups=frozenset()))
    assert cache.get(1, "second 10") is None  # asked at the generation the cache left
    assert cache.get(2, "second 11") is None  # its row changed
    assert cache.get(2, "range") is None  # dropped at every sync
    carried = cache.get(2, "second 10")
    assert carried is not None and carried.generation == 1  # kept, its body still of generation 1
    body = carried.render(2)
    cache.rendered(2, "second 10", carried, body)
    assert cache.get(2, "second 10").body == b"a at 2"  # type: ignore[union-attr]
    assert cache.get(2, "minute 0") is not None

    cache.advance(3, Changes(gold=frozenset(), rollups=None))  # the rollups copied whole
    assert cache.get(3, "minute 0") is None and cache.get(3, "second 10") is not None
    cache.advance(4, Changes.everything())
    assert len(cache) == 0 and cache.size_bytes == 0


def test_an_answer_read_at_another_generation_is_not_kept() -> None:
    cache = AnswerCache(1 << 20)
    cache.advance(5, Changes.everything())
    cache.put(4, "late", kept(b"old rows", ("gold", "k"), 4))  # read before the sync the cache has seen
    cache.put(6, "early", kept(b"new rows", ("gold", "k"), 6))  # read after a commit not yet published
    assert len(cache) == 0
    cache.advance(4, Changes())  # a generation never goes back
    cache.put(5, "now", kept(b"rows", ("gold", "k"), 5))
    assert cache.get(5, "now") is not None


def test_the_cache_holds_at_most_its_bytes_dropping_the_least_recently_used() -> None:
    size = 1000
    cache = AnswerCache(3 * (size + ENTRY_OVERHEAD))
    cache.advance(1, Changes.everything())
    for name in "abc":
        cache.put(1, name, kept(name.encode() * size, ("gold", name), 1))
    assert cache.get(1, "a") is not None  # now the most recently used
    cache.put(1, "d", kept(b"d" * size, ("gold", "d"), 1))
    assert cache.get(1, "b") is None and all(cache.get(1, k) is not None for k in "acd")
    assert cache.size_bytes == 3 * (size + ENTRY_OVERHEAD)
    cache.put(1, "huge", kept(b"x" * (8 * size), ("gold", "x"), 1))  # larger than the whole bound: not kept
    assert cache.get(1, "huge") is None and len(cache) == 3
    assert len(AnswerCache(0)) == 0
    off = AnswerCache(0)
    off.advance(1, Changes.everything())
    off.put(1, "a", kept(b"a", None, 1))
    assert off.get(1, "a") is None
