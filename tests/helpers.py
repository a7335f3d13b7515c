"""Helpers the end-to-end tests share: running `lakehouse` commands and the API as real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from lake.settings import Settings
from tests.conftest import free_port

LAKEHOUSE = [sys.executable, "-m", "lakehouse"]


def env_for(settings: Settings) -> dict[str, str]:
    return dict(os.environ) | settings.as_env()


def lakehouse(
    settings: Settings, *args: str, timeout: float = 900, env_extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a `lakehouse` command in its own process group (so a crash hook takes Spark's JVM down with it)."""
    env = env_for(settings) | (env_extra or {})
    return subprocess.run([*LAKEHOUSE, *args], env=env, capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)  # fmt: skip


def dumps(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


@contextmanager
def running_api(settings: Settings, timeout_s: float = 60) -> Iterator[str]:
    """`lakehouse serve` on a free port until the block ends; yields its base URL once /health answers."""
    port = free_port()
    # A file, not a pipe: the access log of a long test would fill a pipe nobody reads and block the server.
    output = tempfile.TemporaryFile()
    server = subprocess.Popen([*LAKEHOUSE, "serve", "--port", str(port)], env=env_for(settings),
                              stdout=output, stderr=subprocess.STDOUT)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                output.seek(0)
                raise AssertionError(f"the API did not start:\n{output.read().decode()[-3000:]}")
            time.sleep(0.3)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)
        output.close()
