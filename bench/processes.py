"""`lakehouse` run as subprocesses, for `lakehouse bench` and the tests: the command, its environment for a
Settings, a free port, the API started until /health answers, and a process group stopped.

The standard library's subprocess and os.killpg do all of it; psutil serves `bench.memory`, where reading a
process tree's memory at one moment needs it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lake.settings import Settings

LAKEHOUSE = [sys.executable, "-m", "lakehouse"]


def env_for(settings: Settings, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment with `settings` as LAKEHOUSE_* variables, then `extra`."""
    return dict(os.environ) | settings.as_env() | (extra or {})


def free_port() -> int:
    """A loopback port nothing listens on (the kernel's pick for port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def lakehouse(
    settings: Settings, *args: str, timeout: float = 900, env_extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `lakehouse ARGS` to the end, output captured, in its own process group (so that a crash hook takes
    Spark's JVM down with it)."""
    return subprocess.run(
        [*LAKEHOUSE, *args],
        env=env_for(settings, env_extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
        check=False,
    )


def start_lakehouse(
    settings: Settings, *args: str, log: Path, env_extra: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start `lakehouse ARGS` in its own process group, its output appended to `log` (a file, not a pipe: the
    log of a long run would fill a pipe nobody reads and block the process)."""
    return start_command([*LAKEHOUSE, *args], settings, log=log, env_extra=env_extra)


def start_command(
    command: list[str], settings: Settings, log: Path, env_extra: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start `command` with `settings` in its environment, as `start_lakehouse` does."""
    with log.open("ab") as output:
        return subprocess.Popen(
            command,
            env=env_for(settings, env_extra),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_group(process: subprocess.Popen[bytes], first: int = signal.SIGTERM, timeout_s: float = 60) -> None:
    """Send `first` to the process's group (its JVM and Python workers too), then SIGKILL if it lingers past
    `timeout_s`; returns once the process is reaped. The process must have been started in its own session."""
    if first != signal.SIGKILL:
        _signal_group(process, first)
        try:
            process.wait(timeout=timeout_s)
            return
        except subprocess.TimeoutExpired:
            pass
    _signal_group(process, signal.SIGKILL)
    process.wait(timeout=timeout_s)


def _signal_group(process: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass  # the group has exited already; `wait` reaps the leader


def start_api(
    settings: Settings, port: int, log: Path, env_extra: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`lakehouse serve --port PORT` in its own process group, not waited for (see `wait_until_served`)."""
    return start_lakehouse(settings, "serve", "--port", str(port), log=log, env_extra=env_extra)


def wait_until_served(base: str, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> bool:
    """Ask `base`/health every 50 ms until it answers 200 with a snapshot of the lake (True): the API answers
    questions from then on. False once `alive()` says the server is gone or the time is up."""
    import httpx

    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2) as client:
        while alive() and time.monotonic() < deadline:
            try:
                answer = client.get(f"{base}/health")
                if answer.status_code == 200 and answer.json().get("snapshot") is not None:
                    return True
            except (httpx.TransportError, ValueError):
                pass
            time.sleep(0.05)
    return False


def wait_for_http(url: str, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> bool:
    """Ask `url` until it answers 200 (True); False once `alive()` says the server is gone or the time is up."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while alive() and time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    return False


@contextmanager
def running_api(
    settings: Settings, log: Path | None = None, port: int | None = None, timeout_s: float = 90, workers: int = 1
) -> Iterator[str]:
    """`lakehouse serve` on `port` (a free one by default) until the block ends; yields its base URL once /health
    answers 200. Its output goes to `log`, or to a temporary file quoted in the error when it does not start."""
    port = port or free_port()
    base = f"http://127.0.0.1:{port}"
    with log.open("a+b") if log is not None else tempfile.TemporaryFile() as output:
        server = subprocess.Popen(
            [*LAKEHOUSE, "serve", "--port", str(port), "--workers", str(workers)],
            env=env_for(settings),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            if not wait_for_http(f"{base}/health", timeout_s, alive=lambda: server.poll() is None):
                output.seek(0)
                tail = output.read().decode(errors="replace")[-3000:]
                raise RuntimeError(f"the API did not answer /health within {timeout_s:.0f} s:\n{tail}")
            yield base
        finally:
            stop_group(server)
