"""Every setting of kpi-lakehouse, each read from a `LAKEHOUSE_*` environment variable or a CLI flag."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024


class Settings(BaseSettings):
    """One place for settings; the CLI maps each field to a flag of the same name."""

    model_config = SettingsConfigDict(env_prefix="LAKEHOUSE_", extra="ignore")

    kafka_bootstrap: str = Field("localhost:9092", description="Kafka bootstrap servers (host:port,...)")
    topic: str = Field("device-data", description="Kafka topic of device messages")
    topic_partitions: int = Field(4, ge=1, description="partitions when the topic is created")
    topic_replication: int | None = Field(
        None, ge=1, description="replicas of each partition of a new topic; default: the cluster's default"
    )
    topic_min_insync_replicas: int | None = Field(
        None, ge=1, description="min.insync.replicas of a new topic (acks=all waits for these); default: the cluster's"
    )
    kafka_properties: Path | None = Field(
        None,
        description="Java-style properties file of Kafka client settings (security.protocol, sasl.*, ssl.*) for the "
        "producer, admin client and Spark's Kafka source",
    )
    max_message_bytes: int = Field(
        5 * MIB, ge=1024, description="largest message value accepted by producer, topic, broker and consumer"
    )
    lake_root: str = Field("data/lake", description="folder (or URI) holding the Delta tables")
    checkpoint_root: str | None = Field(
        None, description="folder (or URI) for streaming checkpoints; default <lake_root>/_checkpoints"
    )
    home: Path = Field(
        Path(".lakehouse"), description="local state: resolved JVM jars, the local broker's data and logs"
    )
    spark_master: str = Field("local[*]", description="Spark master URL")
    spark_driver_memory: str = Field("2g", description="Spark driver heap (local mode: the whole engine)")
    spark_executor_memory: str | None = Field(
        None, description="heap of each Spark executor on a cluster; default: Spark's (1g) or spark-submit's"
    )
    shuffle_partitions: int = Field(4, ge=1, description="spark.sql.shuffle.partitions for the job")
    trigger_interval: str = Field("1 second", description="micro-batch trigger interval in continuous mode")
    max_offsets_per_trigger: int = Field(
        2000, ge=1, description="bound on Kafka records per micro-batch (memory: this x max_message_bytes)"
    )
    starting_offsets: str = Field("earliest", description="where a new checkpoint starts reading: earliest|latest")
    extra_timestamp_formats: list[str] = Field(
        default_factory=list,
        description="strptime patterns accepted besides ISO 8601 (a JSON list in the variable), e.g. [\"%d/%m/%Y %H:%M:%S\"]",
    )
    fail_on_data_loss: bool = Field(True, description="stop when Kafka deleted offsets not yet processed")
    http_host: str = Field("127.0.0.1", description="address the HTTP API listens on")
    http_port: int = Field(8000, ge=1, le=65535, description="port of the HTTP API")
    api_refresh_seconds: float = Field(
        1.0, gt=0, le=3600, description="how often the API looks for a new gold/silver version to load"
    )
    api_rate_limit: int = Field(0, ge=0, description="requests per minute per client address; 0 turns limiting off")
    api_cors_origins: str = Field("", description="comma-separated origins allowed by CORS; empty turns CORS off")
    api_max_range_buckets: int = Field(
        1_000_000, ge=1, description="most buckets a /kpis range may span (start to end divided by the grain)"
    )
    api_kafka_timeout_seconds: float = Field(
        2.0, gt=0, le=60, description="how long /health waits for Kafka's newest offsets"
    )

    @field_validator("starting_offsets")
    @classmethod
    def _known_starting_offsets(cls, value: str) -> str:
        if value not in {"earliest", "latest"}:
            raise ValueError("starting_offsets must be 'earliest' or 'latest'")
        return value

    def as_env(self) -> dict[str, str]:
        """These settings as LAKEHOUSE_* variables, for a subprocess (lists as JSON, as pydantic-settings reads them)."""
        return {
            f"LAKEHOUSE_{name.upper()}": json.dumps(value) if isinstance(value, (list, dict)) else str(value)
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
    def checkpoints(self) -> str:
        return self.checkpoint_root or join_path(self.lake_root, "_checkpoints")

    @property
    def kafka_limit_bytes(self) -> int:
        """Size limit for the Kafka layers: the value limit plus room for key, headers and batch framing."""
        return self.max_message_bytes + 64 * 1024


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
