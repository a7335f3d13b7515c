"""A small HTTP/1.1 load generator on asyncio streams: open loop at a fixed rate (latency measured from each
request's scheduled start, so a slow server cannot hide its queueing) and closed loop for peak throughput.

Hand-written rather than httpx: at 500 requests/s on two cores the client's own CPU matters; a keep-alive
GET needs a few lines of bytes, not a full client.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    latencies_s: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # the generator's own CPU time (its thread), which the server did not get

    @property
    def cpu_share(self) -> float:
        """The generator's CPU as a share of one core over the run."""
        return self.cpu_seconds / self.seconds if self.seconds else 0.0

    @property
    def requests(self) -> int:
        return len(self.latencies_s)

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, share: float) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")

    @property
    def median(self) -> float:
        return statistics.median(self.latencies_s) if self.latencies_s else float("nan")

    @property
    def server_errors(self) -> int:
        return sum(count for status, count in self.statuses.items() if status >= 500 or status == 0)


class _Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\nAccept: */*\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length, chunked, close = 0, False, False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and b"close" in value.lower():
                close = True
        if chunked:
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        else:
            await self.reader.readexactly(length)
        if close:
            self.close()
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def _open_loop(
    host: str, port: int, paths: Callable[[], str], rate: float, seconds: float, connections: int
) -> LoadResult:
    result = LoadResult()
    idle: asyncio.Queue[_Connection] = asyncio.Queue()
    for _ in range(connections):
        idle.put_nowait(_Connection(host, port))
    loop = asyncio.get_running_loop()
    start = loop.time()
    pending: set[asyncio.Task[None]] = set()

    async def one(scheduled: float) -> None:
        connection = await idle.get()
        try:
            status = await connection.get(paths())
        except (OSError, asyncio.IncompleteReadError, ValueError):
            connection.close()
            status = 0
        finally:
            idle.put_nowait(connection)
        result.latencies_s.append(loop.time() - scheduled)
        result.statuses[status] = result.statuses.get(status, 0) + 1

    count = int(rate * seconds)
    for n in range(count):
        scheduled = start + n / rate
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(scheduled))
        pending.add(task)
        task.add_done_callback(pending.discard)
    await asyncio.gather(*pending)
    result.seconds = loop.time() - start
    while not idle.empty():
        idle.get_nowait().close()
    return result


async def _closed_loop(host: str, port: int, paths: Callable[[], str], seconds: float, connections: int) -> LoadResult:
    result = LoadResult()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds

    async def worker() -> None:
        connection = _Connection(host, port)
        while loop.time() < deadline:
            sent = loop.time()
            try:
                status = await connection.get(paths())
            except (OSError, asyncio.IncompleteReadError, ValueError):
                connection.close()
                status = 0
            result.latencies_s.append(loop.time() - sent)
            result.statuses[status] = result.statuses.get(status, 0) + 1
        connection.close()

    start = loop.time()
    await asyncio.gather(*(worker() for _ in range(connections)))
    result.seconds = loop.time() - start
    return result


def open_loop(
    host: str, port: int, paths: Callable[[], str], rate: float, seconds: float, connections: int = 64
) -> LoadResult:
    """`rate` requests per second for `seconds`, each on an idle keep-alive connection (opened as needed)."""
    return _timed(_open_loop(host, port, paths, rate, seconds, connections))


def closed_loop(host: str, port: int, paths: Callable[[], str], seconds: float, connections: int = 16) -> LoadResult:
    """As many requests as `connections` keep-alive connections complete in `seconds`."""
    return _timed(_closed_loop(host, port, paths, seconds, connections))


def _timed(run: Coroutine[None, None, LoadResult]) -> LoadResult:
    """Run the load on this thread's event loop, and note the CPU time the loop took."""
    started = time.thread_time()
    result = asyncio.run(run)
    result.cpu_seconds = time.thread_time() - started
    return result


def sequential(host: str, port: int, paths: Callable[[], str], count: int) -> LoadResult:
    """One request after another: the latency of a lone user."""

    async def run() -> LoadResult:
        result = LoadResult()
        connection = _Connection(host, port)
        started = time.perf_counter()
        for _ in range(count):
            sent = time.perf_counter()
            status = await connection.get(paths())
            result.latencies_s.append(time.perf_counter() - sent)
            result.statuses[status] = result.statuses.get(status, 0) + 1
        result.seconds = time.perf_counter() - started
        connection.close()
        return result

    return asyncio.run(run())


def random_paths(prefix: str, items: list[str], seed: int = 1) -> Callable[[], str]:
    chooser = random.Random(seed)
    return lambda: prefix + chooser.choice(items)
