"""Exceptions of the lake package; each message says what was wrong and what to do."""

from __future__ import annotations


class LakeError(Exception):
    """The lake cannot be opened or queried as asked; the CLI prints the message and exits non-zero."""


class KafkaConfigError(LakeError):
    """The Kafka client properties (LAKEHOUSE_KAFKA_PROPERTIES) cannot be read or given to both clients."""


class ObjectStoreError(LakeError):
    """The lake's object store cannot be used: credentials, server or bucket missing, or a request refused."""
