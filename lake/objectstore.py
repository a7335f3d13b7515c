"""A lake on S3 or an S3-compatible store: the standard AWS_* settings as each client of the lake takes them (Spark's
s3a, DuckDB, delta-rs, pyarrow), the URI spelling each expects, and the checks that name a missing credential or
bucket.

Credentials and endpoint are read once from the variables every AWS tool reads: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN (or AWS_PROFILE and ~/.aws), AWS_REGION and AWS_ENDPOINT_URL. With an
endpoint set (an S3-compatible server), every client addresses buckets path-style.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from lake.errors import ObjectStoreError

if TYPE_CHECKING:
    import duckdb
    from pyarrow.fs import S3FileSystem

# Hadoop's s3a, and the older spellings; DuckDB, delta-rs and pyarrow all read s3://.
S3_SCHEMES = ("s3a", "s3", "s3n")
DEFAULT_REGION = "us-east-1"
# What the credential chain looks at besides the key variables (a profile, web identity, a container's role).
_CHAIN_VARIABLES = (
    "AWS_PROFILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
)
_AWS_FILES = (("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"), ("AWS_CONFIG_FILE", "~/.aws/config"))


def is_s3(location: str) -> bool:
    return urlparse(location).scheme in S3_SCHEMES


def s3_uri(location: str) -> str:
    """`s3a://bucket/key` as `s3://bucket/key`, the spelling of DuckDB, delta-rs and pyarrow; others unchanged."""
    parsed = urlparse(location)
    return "s3://" + location.split("://", 1)[1] if parsed.scheme in S3_SCHEMES else location


def bucket_of(location: str) -> str:
    return urlparse(location).netloc


def fs_path(location: str) -> str:
    """`s3a://bucket/key` as pyarrow's `bucket/key`."""
    return location.split("://", 1)[1].rstrip("/")


@dataclass(frozen=True)
class S3Access:
    """The AWS settings of this process, as each client of the lake wants them."""

    access_key_id: str | None
    secret_access_key: str | None
    session_token: str | None
    region: str
    endpoint_url: str | None  # an S3-compatible server, e.g. http://127.0.0.1:9000; None: AWS itself
    profile: str | None
    chain_configured: bool  # a profile, ~/.aws files, web identity or a container role may supply credentials

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> S3Access:
        env = os.environ if environ is None else environ
        aws_files = [Path(env.get(name, default)).expanduser() for name, default in _AWS_FILES]
        return cls(
            access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
            secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
            session_token=env.get("AWS_SESSION_TOKEN") or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or DEFAULT_REGION,
            endpoint_url=(env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or "").rstrip("/") or None,
            profile=env.get("AWS_PROFILE") or None,
            chain_configured=any(env.get(name) for name in _CHAIN_VARIABLES) or any(f.is_file() for f in aws_files),
        )

    @property
    def endpoint_host(self) -> str | None:
        """The endpoint as host:port, the spelling of DuckDB's and pyarrow's endpoint settings."""
        return urlparse(self.endpoint_url).netloc if self.endpoint_url else None

    @property
    def use_ssl(self) -> bool:
        return self.endpoint_url is None or urlparse(self.endpoint_url).scheme != "http"

    @property
    def where(self) -> str:
        return self.endpoint_url or f"AWS S3 ({self.region})"

    def missing_credentials(self) -> str | None:
        """What is missing for a client to sign its requests, or None."""
        if self.access_key_id and not self.secret_access_key:
            return "AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not; set both"
        if self.secret_access_key and not self.access_key_id:
            return "AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not; set both"
        if not self.access_key_id and not self.chain_configured:
            return (
                "no AWS credentials for the s3a:// lake: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(and AWS_SESSION_TOKEN for temporary ones), or AWS_PROFILE"
            )
        return None

    def hadoop_conf(self) -> dict[str, str]:
        """Hadoop's s3a settings (without Spark's `spark.hadoop.` prefix). Credentials are not copied into the
        configuration: the AWS SDK's default chain reads the same variables, a profile or a role."""
        conf = {
            "fs.s3a.aws.credentials.provider": "software.amazon.awssdk.auth.credentials.DefaultCredentialsProvider",
            "fs.s3a.endpoint.region": self.region,
        }
        if self.endpoint_url:
            conf |= {
                "fs.s3a.endpoint": self.endpoint_url,
                "fs.s3a.path.style.access": "true",
                "fs.s3a.connection.ssl.enabled": str(self.use_ssl).lower(),
            }
        return conf

    def delta_rs_options(self) -> dict[str, str]:
        """delta-rs' storage options. delta-rs 1.x creates each commit file with S3's conditional write (put if
        absent), so it needs neither AWS_S3_ALLOW_UNSAFE_RENAME nor a lock; Spark's S3 log store does not honour that
        condition, which is why the two must not write one table at the same time (DEPLOY.md, section 4)."""
        options = {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_SESSION_TOKEN": self.session_token,
            "AWS_PROFILE": self.profile,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }
        if self.endpoint_url:
            options |= {"AWS_ALLOW_HTTP": str(not self.use_ssl).lower(), "AWS_VIRTUAL_HOSTED_STYLE_REQUEST": "false"}
        return {name: value for name, value in options.items() if value is not None}

    def create_duckdb_secret(self, connection: duckdb.DuckDBPyConnection) -> None:
        """A DuckDB secret for s3:// made by the aws extension from the credential chain (the same variables, or a
        profile); the delta extension reads through it too."""
        options = {"TYPE": "s3", "PROVIDER": "credential_chain", "REGION": _quoted(self.region)}
        if self.profile:
            options["PROFILE"] = _quoted(self.profile)
        if self.endpoint_host:
            options |= {
                "ENDPOINT": _quoted(self.endpoint_host),
                "URL_STYLE": "'path'",
                "USE_SSL": str(self.use_ssl).lower(),
            }
        listed = ", ".join(f"{name} {value}" for name, value in options.items())
        connection.execute(f"CREATE OR REPLACE SECRET lake_s3 ({listed})")

    def prepare_clients(self) -> None:
        """S3-compatible servers often reject the checksums the newer AWS SDKs (Java, C++) add to every upload;
        with an endpoint set, the SDKs send them only where the S3 API requires them, unless told otherwise."""
        if self.endpoint_url:
            os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
            os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")


def _quoted(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def access() -> S3Access:
    """This process's AWS settings, with the clients prepared for them."""
    settings = S3Access.from_env()
    settings.prepare_clients()
    return settings


@functools.lru_cache(maxsize=4)
def _filesystem(settings: S3Access) -> S3FileSystem:
    from pyarrow import fs

    return fs.S3FileSystem(
        access_key=settings.access_key_id,
        secret_key=settings.secret_access_key,
        session_token=settings.session_token,
        region=settings.region,
        endpoint_override=settings.endpoint_host,
        scheme="https" if settings.use_ssl else "http",
        connect_timeout=5,
        request_timeout=30,
        retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=2),
    )


def filesystem() -> S3FileSystem:
    """pyarrow's S3 client for small reads of the lake's logs and checkpoints (one per set of AWS settings)."""
    return _filesystem(access())


def check_access(location: str) -> None:
    """Raise ObjectStoreError naming what is missing: credentials, the server, or the bucket of `location`."""
    from pyarrow.fs import FileType

    settings = access()
    missing = settings.missing_credentials()
    if missing:
        raise ObjectStoreError(missing)
    bucket = bucket_of(location)
    try:
        found = filesystem().get_file_info(bucket)
    except OSError as exc:
        raise ObjectStoreError(explain(exc, settings, bucket)) from None
    if found.type == FileType.NotFound:
        raise ObjectStoreError(
            f"bucket {bucket!r} does not exist at {settings.where}; create it, or point LAKEHOUSE_LAKE_ROOT at one "
            "that does"
        )


@contextmanager
def explained(location: str) -> Iterator[None]:
    """Turn a failed S3 request of pyarrow's (other than a missing object) into an ObjectStoreError of one line."""
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ObjectStoreError(explain(exc, access(), bucket_of(location))) from None


def explain(exc: OSError, settings: S3Access, bucket: str) -> str:
    """One line for a failed S3 request: refused credentials, an unreachable server, or the client's own words."""
    text = str(exc)
    if "ACCESS_DENIED" in text or "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
        return (
            f"{settings.where} refused access to bucket {bucket!r}: check AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), and the bucket's permissions"
        )
    if "NETWORK_CONNECTION" in text or "curlCode" in text:
        return f"cannot reach the object store at {settings.where}: check AWS_ENDPOINT_URL and that the server runs"
    return f"object store {settings.where}, bucket {bucket!r}: {text.splitlines()[0]}"


def probe_write_list_delete(location: str) -> str:
    """Write, list and delete one small object in the folder `location`; the key it used. Raises ObjectStoreError."""
    from pyarrow.fs import FileSelector

    store = filesystem()
    folder = fs_path(location)
    key = f"{folder}/_lakehouse_probe-{uuid.uuid4().hex}"
    try:
        with store.open_output_stream(key) as stream:
            stream.write(b"lakehouse doctor probe\n")
        listed = [info.path for info in store.get_file_info(FileSelector(folder))]
        if key not in listed:
            raise ObjectStoreError(f"wrote {key} but a listing of {folder} does not show it")
        store.delete_file(key)
    except OSError as exc:
        raise ObjectStoreError(explain(exc, access(), bucket_of(location))) from None
    return key
