"""A local S3 API server for a lake on object storage without a cloud: S3Proxy from Maven's jars, keeping its buckets
in memory (they are gone once it stops), addressed path-style, with fixed credentials; its log under <home>/s3."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from lake import objectstore
from pipeline.errors import SetupError
from pipeline.jvm import daemon, jars

# The credentials the server accepts unless AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY say others.
DEFAULT_ACCESS_KEY = "lakehouse"
DEFAULT_SECRET_KEY = "lakehouse-secret"
DEFAULT_PORT = 9000


class S3ServerError(SetupError):
    """The local S3 server could not be started or reached."""


@dataclass(frozen=True)
class LocalS3Server:
    """S3Proxy on host:port, its files under <home>/s3/<port>: its configuration, log and pid."""

    home: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    access_key: str = DEFAULT_ACCESS_KEY
    secret_key: str = DEFAULT_SECRET_KEY
    heap: str = "512m"  # holds the buckets

    @classmethod
    def from_env(cls, home: Path, port: int = DEFAULT_PORT) -> LocalS3Server:
        """Credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY when set, so that clients and server agree."""
        return cls(
            home=home.resolve(),
            port=port,
            access_key=os.environ.get("AWS_ACCESS_KEY_ID") or DEFAULT_ACCESS_KEY,
            secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY") or DEFAULT_SECRET_KEY,
        )

    @property
    def folder(self) -> Path:
        return self.home / "s3" / str(self.port)

    @property
    def log_file(self) -> Path:
        """S3Proxy's log: warnings, and one `request:` line per S3 request it served."""
        return self.folder / "s3proxy.log"

    @property
    def pid_file(self) -> Path:
        return self.folder / "s3proxy.pid"

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client_env(self) -> dict[str, str]:
        """The standard AWS variables that point every client of the lake at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": objectstore.DEFAULT_REGION,
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }

    def properties(self) -> str:
        lines = {
            "s3proxy.endpoint": self.endpoint_url,
            "s3proxy.authorization": "aws-v2-or-v4",
            "s3proxy.identity": self.access_key,
            "s3proxy.credential": self.secret_key,
            # In memory: of S3Proxy 2.6's backends only jclouds' `transient` keeps a folder marker (`a/b/`, which
            # s3a's mkdirs writes) as S3 does. `filesystem` stores it as a directory that listings skip (Spark's new
            # checkpoint folders vanish), and the nio2 backends answer a HEAD of `a/b` as if it were a file.
            "jclouds.provider": "transient",
        }
        return "".join(f"{key}={value}\n" for key, value in lines.items())

    def pid(self) -> int | None:
        return daemon.running_pid(self.pid_file)

    def reachable(self) -> bool:
        return daemon.listening(self.host, self.port)

    def start(self, buckets: tuple[str, ...] = (), timeout_s: float = 60.0) -> int:
        """Start the server unless it runs, and create the buckets that do not exist; returns its pid."""
        pid = self.pid() or self._launch(timeout_s)
        from pyarrow import fs

        store = fs.S3FileSystem(
            access_key=self.access_key,
            secret_key=self.secret_key,
            endpoint_override=f"{self.host}:{self.port}",
            scheme="http",
            allow_bucket_creation=True,
        )
        for bucket in buckets:
            store.create_dir(bucket)  # a bucket that exists already stays as it is
        return pid

    def _launch(self, timeout_s: float) -> int:
        if self.reachable():
            raise S3ServerError(f"port {self.port} is taken by another process; choose another with --port")
        if not any(jars.s3proxy_jar_dir(self.home).glob("s3proxy-*.jar")):
            jars.resolve(self.home)
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / "s3proxy.conf"
        config.write_text(self.properties())
        command = [
            "java",
            f"-Xmx{self.heap}",
            f"-Dlogback.configurationFile={jars.s3proxy_log_config()}",
            f"-Ds3proxy.log.file={self.log_file}",
            "-cp",
            str(jars.s3proxy_jar_dir(self.home) / "*"),
            "org.gaul.s3proxy.Main",
            "--properties",
            str(config),
        ]
        with open(self.folder / "console.log", "ab") as console:
            process = subprocess.Popen(command, stdout=console, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid_file.write_text(str(process.pid))
        deadline = time.monotonic() + timeout_s
        while not self.reachable():
            if process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise S3ServerError(
                    f"S3Proxy did not answer on {self.host}:{self.port}; see {self.folder / 'console.log'}"
                )
            time.sleep(0.2)
        return process.pid

    def stop(self, timeout_s: float = 30.0) -> bool:
        return daemon.stop(self.pid_file, timeout_s)

    def requests_served(self) -> int:
        """How many S3 requests the server has logged since it started (its log counts them)."""
        try:
            with self.log_file.open("rb") as log:
                return sum(1 for line in log if b"S3ProxyHandler request:" in line)
        except FileNotFoundError:
            return 0
