"""Memory of a process tree (the pipeline: its Python driver, Spark's JVM, the Python workers), measured one way.

Each sample reads every process of the tree at one moment (psutil): per process RSS, PSS and USS, the JVM apart,
and the tree's total by PSS, so pages that forked Python workers share with their daemon count once. A sampler
thread keeps the peaks, and optionally the JVM's Native Memory Tracking summary (`jcmd`) nearest its RSS peak.
"""

from __future__ import annotations

import ctypes
import platform
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Self

import psutil

MIB = 1024 * 1024


@dataclass(frozen=True)
class ProcessMemory:
    pid: int
    parent: int
    name: str
    rss: int  # resident pages, shared and file-backed ones included: what `top` and the OOM killer's RES show
    pss: int  # each shared page divided among the processes that map it; PSS of a tree is what it occupies
    uss: int  # pages no other process maps: what killing this process alone would free


@dataclass(frozen=True)
class TreeSample:
    """Every process under one root, read at one moment."""

    at: float  # time.monotonic()
    processes: tuple[ProcessMemory, ...]
    spawning: int = 0  # children left out because they shared their parent's address space

    @property
    def pss(self) -> int:
        return sum(p.pss for p in self.processes)

    @property
    def uss(self) -> int:
        return sum(p.uss for p in self.processes)

    @property
    def rss_sum(self) -> int:
        """Sum of RSS: counts a page shared by several processes (a forked worker and its daemon) once per process."""
        return sum(p.rss for p in self.processes)

    @property
    def jvm(self) -> ProcessMemory | None:
        """The biggest `java` process in the tree (Spark's driver JVM)."""
        return max((p for p in self.processes if p.name == "java"), key=lambda p: p.rss, default=None)

    def describe(self) -> str:
        return ", ".join(
            f"{p.name}[{p.pid}] rss {p.rss / MIB:.0f} pss {p.pss / MIB:.0f} uss {p.uss / MIB:.0f}"
            for p in sorted(self.processes, key=lambda p: -p.rss)
        )


_KCMP = {"x86_64": 312, "aarch64": 272}.get(platform.machine())  # kcmp(2)'s syscall number
_KCMP_VM = 1
_libc = ctypes.CDLL(None, use_errno=True) if _KCMP else None


def _shares_address_space(pid: int, other: int) -> bool:
    """Whether two processes share one address space: a child the JVM made with posix_spawn (vfork) before it
    execs `chmod` or `readlink` for Hadoop's local file system. Its RSS and PSS are the JVM's own, so summing it
    counts the JVM twice. psutil has no notion of this; kcmp(2) compares the two address spaces."""
    if _libc is None:
        return False
    return _libc.syscall(_KCMP, pid, other, _KCMP_VM, 0, 0) == 0


def sample_tree(root: int, rss_only: bool = False) -> TreeSample:
    """RSS, PSS and USS of `root` and all its descendants, read in one pass ([] once the root has exited).

    A child still sharing its parent's address space (between vfork and exec) is left out: it is its parent.

    With `rss_only`, only RSS is read (the kernel's counters in /proc/PID/statm) and PSS and USS are reported equal
    to it: reading them walks every mapping (/proc/PID/smaps) under the process's memory-map lock, which stalls a
    process serving requests on a large heap, so a latency benchmark must not take them."""
    try:
        top = psutil.Process(root)
        members = [top, *top.children(recursive=True)]
    except psutil.Error:
        return TreeSample(time.monotonic(), ())
    at = time.monotonic()
    processes, spawning = [], 0
    for process in members:
        memory: ProcessMemory | None = None
        for _attempt in range(2):
            try:
                with process.oneshot():
                    if rss_only:
                        rss = process.memory_info().rss
                        memory = ProcessMemory(process.pid, process.ppid(), process.name(), rss, rss, rss)
                    else:
                        full = process.memory_full_info()
                        memory = ProcessMemory(
                            process.pid, process.ppid(), process.name(), full.rss, full.pss, full.uss
                        )
            except psutil.Error:  # exited between the listing and the read
                memory = None
                break
            # PSS above RSS: the read straddled the child's exec (statm after it, smaps before); read it again.
            if memory.pss <= memory.rss:
                break
        if memory is None:
            continue
        if process.pid != root and (memory.pss > memory.rss or _shares_address_space(process.pid, memory.parent)):
            spawning += 1
            continue
        processes.append(memory)
    return TreeSample(at, tuple(processes), spawning)


# `jcmd <pid> VM.native_memory summary` lines: "-  Java Heap (reserved=2097152KB, committed=1048576KB)"
_NMT_LINE = re.compile(r"^-\s+(?P<name>[^(]+?)\s+\(reserved=(?P<reserved>\d+)KB, committed=(?P<committed>\d+)KB")
_NMT_TOTAL = re.compile(r"^Total: reserved=(?P<reserved>\d+)KB, committed=(?P<committed>\d+)KB")
_NMT_MALLOC = re.compile(r"^\s+\(malloc=(?P<kb>\d+)KB")


@dataclass(frozen=True)
class NativeMemory:
    """A JVM's Native Memory Tracking summary (needs -XX:NativeMemoryTracking=summary), committed bytes per area."""

    jvm_rss: int  # the JVM's RSS when the summary was taken, to compare with `total`
    total: int
    committed: dict[str, int] = field(default_factory=dict)
    malloc: int = 0  # bytes the JVM malloc'ed, all areas; glibc may keep more than this resident
    text: str = ""  # jcmd's report as it printed it

    def describe(self) -> str:
        areas = sorted(self.committed.items(), key=lambda item: -item[1])
        shown = ", ".join(f"{name} {size / MIB:.0f}" for name, size in areas if size >= 8 * MIB)
        return (
            f"NMT committed {self.total / MIB:.0f} MiB (malloc {self.malloc / MIB:.0f}) at JVM RSS "
            f"{self.jvm_rss / MIB:.0f} MiB: {shown}"
        )


def native_memory(pid: int, jvm_rss: int = 0, timeout_s: float = 20) -> NativeMemory | None:
    """The NMT summary of JVM `pid` through `jcmd`; None when NMT is off, jcmd is missing or the JVM has exited."""
    jcmd = shutil.which("jcmd")
    if jcmd is None:
        return None
    try:
        out = subprocess.run(
            [jcmd, str(pid), "VM.native_memory", "summary"],
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    total, committed, malloc = 0, {}, 0
    for line in out.splitlines():
        if match := _NMT_TOTAL.match(line):
            total = int(match["committed"]) * 1024
        elif match := _NMT_LINE.match(line):
            committed[match["name"]] = int(match["committed"]) * 1024
        elif match := _NMT_MALLOC.match(line):  # "(malloc=...KB #...)" under each area
            malloc += int(match["kb"]) * 1024
    return NativeMemory(jvm_rss, total, committed, malloc, out) if total else None


class PeakSampler:
    """Samples a process tree every `interval_s` on a thread while in a `with` block; keeps the samples at the
    tree's PSS peak and at the JVM's RSS peak, and, with `native_every_s`, the JVM's NMT summary taken at the
    highest JVM RSS among those it took. With `rss_only`, it reads RSS alone (see `sample_tree`) and keeps the peak
    of the tree's summed RSS."""

    def __init__(
        self, root: int, interval_s: float = 0.25, native_every_s: float | None = None, rss_only: bool = False
    ) -> None:
        self.root = root
        self.interval_s = interval_s
        self.native_every_s = native_every_s
        self.rss_only = rss_only
        self.peak_rss: TreeSample | None = None
        self.peak_tree: TreeSample | None = None
        self.peak_jvm: TreeSample | None = None
        self.peak_native: NativeMemory | None = None
        self.samples = 0
        self.spawning = 0  # samples that caught a child between vfork and exec (left out of the sums)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def tree_pss(self) -> int:
        return self.peak_tree.pss if self.peak_tree else 0

    @property
    def tree_rss(self) -> int:
        """The highest sum of RSS over the tree's processes in one sample."""
        return self.peak_rss.rss_sum if self.peak_rss else 0

    @property
    def jvm_rss(self) -> int:
        jvm = self.peak_jvm.jvm if self.peak_jvm else None
        return jvm.rss if jvm else 0

    def _run(self) -> None:
        next_native = time.monotonic()
        while not self._stop.is_set():
            sample = sample_tree(self.root, self.rss_only)
            if sample.processes:
                self.samples += 1
                self.spawning += sample.spawning > 0
                if self.peak_rss is None or sample.rss_sum > self.peak_rss.rss_sum:
                    self.peak_rss = sample
                if self.peak_tree is None or sample.pss > self.peak_tree.pss:
                    self.peak_tree = sample
                jvm = sample.jvm
                if jvm and jvm.rss > self.jvm_rss:
                    self.peak_jvm = sample
                if jvm and self.native_every_s is not None and time.monotonic() >= next_native:
                    # jcmd starts a JVM of its own (outside the tree): not every sample.
                    next_native = time.monotonic() + self.native_every_s
                    native = native_memory(jvm.pid, jvm.rss)
                    if native and (self.peak_native is None or native.jvm_rss > self.peak_native.jvm_rss):
                        self.peak_native = native
            self._stop.wait(self.interval_s)

    def describe(self) -> str:
        """The peaks in one paragraph, for a test's or a benchmark's log."""
        if self.rss_only:
            if self.peak_rss is None:
                return "no sample"
            return (
                f"peak RSS {self.tree_rss / MIB:,.0f} MiB (RSS alone) over {self.samples} samples: "
                f"{self.peak_rss.describe()}"
            )
        lines = [
            f"peak JVM RSS {self.jvm_rss / MIB:,.0f} MiB; peak tree PSS {self.tree_pss / MIB:,.0f} MiB "
            f"(USS {self.peak_tree.uss / MIB:,.0f}, sum of RSS {self.peak_tree.rss_sum / MIB:,.0f}) "
            f"over {self.samples} samples ({self.spawning} caught a spawning child, left out)"
            if self.peak_tree
            else "no sample"
        ]
        if self.peak_jvm:
            lines.append(f"  at the JVM's peak: {self.peak_jvm.describe()}")
        if self.peak_tree:
            lines.append(f"  at the tree's peak: {self.peak_tree.describe()}")
        if self.peak_native:
            lines.append(f"  {self.peak_native.describe()}")
        return "\n".join(lines)
