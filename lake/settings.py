"""Every setting of kpi-lakehouse, each read from a `LAKEHOUSE_*` environment variable or a CLI flag."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024
ENV_PREFIX = "LAKEHOUSE_"


def cli(panel: str, *, flag: str | None = None, serve_flag: str | None = None, default: str | None = None) -> dict:
    """How a field shows on the command line: its help panel; a flag other than --<field-name>; its name among
    `serve`'s own flags (API settings); the default as help shows it when the value alone does not say it."""
    shown = {"panel": panel, "flag": flag, "serve_flag": serve_flag, "default_text": default}
    return {key: value for key, value in shown.items() if value is not None}


class Settings(BaseSettings):
    """One place for settings; the CLI makes a flag of each field (see `setting_flags`)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    kafka_bootstrap: str = Field(
        "localhost:9092",
        description="Kafka bootstrap servers (host:port,...); the local broker listens on this port",
        json_schema_extra=cli("Kafka"),
    )
    topic: str = Field("device-data", description="Kafka topic of device messages", json_schema_extra=cli("Kafka"))
    topic_partitions: int = Field(
        4, ge=1, description="partitions when `kafka start` creates the topic", json_schema_extra=cli("Kafka")
    )
    topic_replication: int | None = Field(
        None,
        ge=1,
        description="replicas of each partition when `kafka start` creates the topic",
        json_schema_extra=cli("Kafka", default="the cluster's"),
    )
    topic_min_insync_replicas: int | None = Field(
        None,
        ge=1,
        description="min.insync.replicas of a new topic: replicas an acks=all write waits for",
        json_schema_extra=cli("Kafka", default="the cluster's"),
    )
    kafka_properties: Path | None = Field(
        None,
        description="Java-style properties file of Kafka client settings (security.protocol, sasl.*, ssl.*) for the "
        "producer, admin client and Spark's Kafka source",
        json_schema_extra=cli("Kafka", default="none"),
    )
    max_message_bytes: int = Field(
        5 * MIB,
        ge=1024,
        description="largest message value accepted by producer, topic, broker and consumer",
        json_schema_extra=cli("Kafka"),
    )
    lake_root: str = Field(
        "data/lake",
        description="folder or URI (file://, s3a://, ...) of the Delta tables",
        json_schema_extra=cli("Lake"),
    )
    checkpoint_root: str | None = Field(
        None,
        description="folder or URI of the streaming checkpoints",
        json_schema_extra=cli("Lake", default="<lake-root>/_checkpoints"),
    )
    bronze_retention: str | None = Field(
        None,
        description="how long bronze keeps raw Kafka records, by Kafka time, before `maintain` deletes them: "
        "30d, 12h, 90m, 2w, or forever",
        json_schema_extra=cli("Lake", default="forever"),
    )
    quarantine_retention: str | None = Field(
        None,
        description="how long quarantine keeps rows, by Kafka time, before `maintain` deletes them: 30d, 12h, "
        "90m, 2w, or forever",
        json_schema_extra=cli("Lake", default="forever"),
    )
    delta_checkpoint_interval: int = Field(
        100,
        ge=1,
        le=10_000,
        description="commits between the Delta checkpoints that the pipeline's own commits write (each table's "
        "delta.checkpointInterval, set when the pipeline starts); `maintain` also writes one",
        json_schema_extra=cli("Lake"),
    )
    home: Path = Field(
        Path(".lakehouse"),
        description="local state: resolved JVM jars, the local broker's data and logs",
        json_schema_extra=cli("Lake"),
    )
    spark_master: str = Field("local[*]", description="Spark master URL", json_schema_extra=cli("Spark"))
    spark_driver_memory: str = Field(
        "2g", description="Spark driver heap (in local mode, the whole engine)", json_schema_extra=cli("Spark")
    )
    spark_executor_memory: str | None = Field(
        None,
        description="heap of each Spark executor on a cluster",
        json_schema_extra=cli("Spark", default="Spark's (1g)"),
    )
    spark_driver_java_options: str = Field(
        "",
        description=(
            "more JVM options for the Spark driver (in local mode, the whole engine), after the project's own; "
            "e.g. `-XX:TieredStopAtLevel=1 -XX:ReservedCodeCacheSize=240m` (the C1 compiler alone) for short runs "
            "on little data, which start about a quarter sooner but compute a backlog about half as fast"
        ),
        json_schema_extra=cli("Spark", default="none"),
    )
    shuffle_partitions: int = Field(
        4, ge=1, description="spark.sql.shuffle.partitions of the job", json_schema_extra=cli("Spark")
    )
    trigger_interval: str = Field(
        "1 second",
        description="micro-batch trigger interval in continuous mode",
        json_schema_extra=cli("Streaming job"),
    )
    rollups_interval: str = Field(
        "30 seconds",
        description=(
            "how often the rollups query brings the minute, hour and day buckets up to date with silver in "
            "continuous mode (seconds are gold's, written by every micro-batch)"
        ),
        json_schema_extra=cli("Streaming job"),
    )
    allowed_lateness: str = Field(
        "5 minutes",
        description=(
            "how long after the newest reading a bucket may still get readings before it is final; later readings "
            "still count, as late ones (5m, 30s, 2h, 5 minutes, 1 day)"
        ),
        json_schema_extra=cli("Streaming job"),
    )
    max_offsets_per_trigger: int = Field(
        2000,
        ge=1,
        description="Kafka records per micro-batch; bounds a batch's memory at this x max-message-bytes",
        json_schema_extra=cli("Streaming job"),
    )
    starting_offsets: str = Field(
        "earliest",
        description="where a new checkpoint starts reading: earliest or latest",
        json_schema_extra=cli("Streaming job"),
    )
    max_metrics_per_reading: int = Field(
        100,
        ge=1,
        description="metrics one reading may carry; a reading with more is quarantined whole (too_many_metrics)",
        json_schema_extra=cli("Streaming job"),
    )
    max_metrics: int = Field(
        1000,
        ge=1,
        description="distinct metric names the lake keeps; readings of a new name past it are quarantined "
        "(metric_limit)",
        json_schema_extra=cli("Streaming job"),
    )
    extra_timestamp_formats: list[str] = Field(
        default_factory=list,
        description="strptime patterns accepted besides ISO 8601 (no zone means UTC), e.g. %d/%m/%Y %H:%M:%S; "
        "the flag is repeatable, the variable a JSON list",
        json_schema_extra=cli("Streaming job", flag="--extra-timestamp-format"),
    )
    fail_on_data_loss: bool = Field(
        True, description="stop when Kafka deleted offsets not yet processed", json_schema_extra=cli("Streaming job")
    )
    http_host: str = Field(
        "127.0.0.1", description="address the HTTP API listens on", json_schema_extra=cli("API", serve_flag="--host")
    )
    http_port: int = Field(
        8000, ge=1, le=65535, description="port of the HTTP API", json_schema_extra=cli("API", serve_flag="--port")
    )
    api_refresh_seconds: float | None = Field(
        None,
        gt=0,
        le=3600,
        description=(
            "how often the API looks for new table versions to load; a look costs a file lookup per table on a "
            "local disk, a request per table on S3"
        ),
        json_schema_extra=cli("API", serve_flag="--refresh-seconds", default="0.25 (1 on S3)"),
    )
    api_rate_limit: int = Field(
        0,
        ge=0,
        description="requests per minute per client address; 0 turns limiting off",
        json_schema_extra=cli("API", serve_flag="--rate-limit"),
    )
    api_cors_origins: str = Field(
        "",
        description="comma-separated origins allowed by CORS; empty turns CORS off",
        json_schema_extra=cli("API", serve_flag="--cors-origins"),
    )
    api_max_range_buckets: int = Field(
        1_000_000,
        ge=1,
        description="most buckets a /kpis range may span (start to end divided by the grain)",
        json_schema_extra=cli("API", serve_flag="--max-range-buckets"),
    )
    api_kafka_timeout_seconds: float = Field(
        2.0,
        gt=0,
        le=60,
        description="how long /health waits for Kafka's newest offsets",
        json_schema_extra=cli("API", serve_flag="--kafka-timeout-seconds"),
    )

    api_catch_up_seconds: float = Field(
        30.0,
        ge=0,
        le=3600,
        description=(
            "at start, how long the API waits for an existing store file to catch up with the lake before it "
            "answers; past it, it answers at the versions the file holds until the catch-up ends"
        ),
        json_schema_extra=cli("API", serve_flag="--catch-up-seconds"),
    )
    api_store_dir: Path | None = Field(
        None,
        description="folder of the API's serving store: one DuckDB file per worker, rebuildable from the lake",
        json_schema_extra=cli("API", serve_flag="--store-dir", default="<home>/api-store"),
    )
    api_memory_limit: str = Field(
        "512MB",
        description="DuckDB memory_limit of each API worker's store (past it, DuckDB spills to the store folder)",
        json_schema_extra=cli("API", serve_flag="--memory-limit"),
    )
    api_cache_mb: int = Field(
        64,
        ge=0,
        le=65536,
        description=(
            "MiB of encoded answers each API worker keeps for the snapshot it serves, so that repeated questions "
            "cost no query; dropped when a refresh loads new versions; 0 turns the cache off"
        ),
        json_schema_extra=cli("API", serve_flag="--cache-mb"),
    )

    @field_validator("allowed_lateness")
    @classmethod
    def _readable_lateness(cls, value: str) -> str:
        parse_duration(value, f"{ENV_PREFIX}ALLOWED_LATENESS")
        return value

    @field_validator("starting_offsets")
    @classmethod
    def _known_starting_offsets(cls, value: str) -> str:
        if value not in {"earliest", "latest"}:
            raise ValueError("starting_offsets must be 'earliest' or 'latest'")
        return value

    @field_validator("bronze_retention", "quarantine_retention")
    @classmethod
    def _readable_retention(cls, value: str | None, info: ValidationInfo) -> str | None:
        variable = f"{ENV_PREFIX}{str(info.field_name).upper()}"
        parse_retention(value, variable)  # refuses what it cannot read, naming the setting
        return value

    def retention(self, table_name: str) -> timedelta | None:
        """How long `bronze` or `quarantine` keeps rows; None keeps them forever."""
        field = f"{table_name}_retention"
        return parse_retention(getattr(self, field), f"{ENV_PREFIX}{field.upper()}")

    def as_env(self) -> dict[str, str]:
        """These settings as LAKEHOUSE_* variables, for a subprocess (lists as JSON, as pydantic-settings reads them)."""
        return {
            f"{ENV_PREFIX}{name.upper()}": json.dumps(value) if isinstance(value, (list, dict)) else str(value)
            for name, value in self.model_dump(exclude_none=True).items()
        }

    @model_validator(mode="after")
    def _min_insync_within_replicas(self) -> Settings:
        replicas, min_insync = self.topic_replication, self.topic_min_insync_replicas
        if replicas is not None and min_insync is not None and min_insync > replicas:
            raise ValueError(
                f"topic_min_insync_replicas={min_insync} exceeds topic_replication={replicas}: "
                "no write with acks=all could succeed; lower it or raise the replication"
            )
        return self

    @property
    def allowed_lateness_us(self) -> int:
        return parse_duration(self.allowed_lateness, f"{ENV_PREFIX}ALLOWED_LATENESS") // timedelta(microseconds=1)

    @property
    def checkpoints(self) -> str:
        return self.checkpoint_root or join_path(self.lake_root, "_checkpoints")

    @property
    def api_refresh_interval(self) -> float:
        """Seconds between the API's looks for new versions: the setting, else 0.25 s with the lake on a local disk
        (about a millisecond of work each) and 1 s on an object store (requests that are billed)."""
        if self.api_refresh_seconds is not None:
            return self.api_refresh_seconds
        return 0.25 if local_path(self.lake_root) is not None else 1.0

    @property
    def store_dir(self) -> Path:
        return self.api_store_dir or self.home / "api-store"

    @property
    def kafka_limit_bytes(self) -> int:
        """Size limit for the Kafka layers: the value limit plus room for key, headers and batch framing."""
        return self.max_message_bytes + 64 * 1024


@dataclass(frozen=True)
class SettingFlag:
    """One setting as the command line and the README show it."""

    name: str  # the field
    env: str  # LAKEHOUSE_<NAME>
    flag: str  # --<name-with-dashes>, a flag of `lakehouse` itself
    serve_flag: str | None  # the same setting among `serve`'s flags
    panel: str
    value_type: Any  # what the flag parses, e.g. int, Path, list[str]
    default: str  # as help shows it
    description: str


def setting_flags() -> list[SettingFlag]:
    """Every field of `Settings` as a flag, in the order of the class."""
    return [_flag(name, field) for name, field in Settings.model_fields.items()]


def _flag(name: str, field: FieldInfo) -> SettingFlag:
    shown = field.json_schema_extra
    assert isinstance(shown, dict) and field.description, (
        f"Settings.{name} needs a description and json_schema_extra=cli(...)"
    )
    value_type = field.annotation
    if get_origin(value_type) in (Union, UnionType):  # `int | None`: the flag parses an int
        value_type = next(arg for arg in get_args(value_type) if arg is not type(None))
    return SettingFlag(
        name=name,
        env=f"{ENV_PREFIX}{name.upper()}",
        flag=str(shown.get("flag", "--" + name.replace("_", "-"))),
        serve_flag=shown.get("serve_flag"),  # type: ignore[arg-type]
        panel=str(shown["panel"]),
        value_type=value_type,
        default=str(shown.get("default_text", _shown_default(field.get_default(call_default_factory=True)))),
        description=field.description,
    )


def _shown_default(value: object) -> str:
    """A default spelled as one would set it: true, [], 1 (not 1.0), empty."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list):
        return json.dumps(value)
    return str(value) if value != "" else "empty"


# A duration: a whole number and a unit, short (`30d`, `12h`, `90m`, `45s`, `2w`) or spelled out as Spark writes
# its intervals (`30 seconds`, `5 minutes`, `1 day`). Read here, without Spark.
_DURATION = re.compile(r"\s*(\d+)\s*(s|m|h|d|w|seconds?|minutes?|hours?|days?|weeks?)\s*")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
DURATION_FORMS = "a whole number and a unit: 30s, 5m, 12h, 30d, 2w, or 5 minutes, 1 day"


def parse_duration(text: str, setting: str) -> timedelta:
    """A duration in one of DURATION_FORMS; a ValueError naming `setting` otherwise."""
    match = _DURATION.fullmatch(text.lower())
    if match is None:
        raise ValueError(f"{setting}={text!r} is not a duration: give {DURATION_FORMS}")
    unit = match.group(2)
    return timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[unit[0] if len(unit) > 1 else unit])


def parse_retention(text: str | None, setting: str) -> timedelta | None:
    """A retention (a positive duration); None for `forever`, empty or unset (keep forever)."""
    if text is None or text.strip().lower() in {"", "forever"}:
        return None
    kept = parse_duration(text, setting)
    if not kept:
        raise ValueError(f"{setting}={text!r} would keep nothing: give {DURATION_FORMS}, or forever")
    return kept


def join_path(root: str, *parts: str) -> str:
    """Join a local folder or a URI (file://, s3a://, ...) with sub-paths."""
    return "/".join([root.rstrip("/"), *parts])


def local_path(location: str) -> Path | None:
    """The local folder a path or `file:` URI names; None for object stores (s3a://, abfss://, ...)."""
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    if location.startswith("file:"):
        parsed = urlparse(location)
        return Path(url2pathname(parsed.path)) if parsed.netloc in {"", "localhost"} else None
    return None if "://" in location else Path(location)


def absolute(root: str) -> str:
    """A local path made absolute (Spark and DuckDB resolve relative paths differently); URIs pass unchanged, except
    that `file:///x` becomes Hadoop's own spelling `file:/x`, which Delta compares table locations with."""
    if root.startswith("file:"):
        folder = local_path(root)
        return f"file:{folder.resolve()}" if folder is not None else root
    if "://" in root:
        return root
    return str(Path(root).resolve())
