"""Exceptions of the pipeline package; each message says what was wrong and what to do."""

from __future__ import annotations


class PipelineError(Exception):
    """Base of the pipeline's errors; the CLI prints the message and exits non-zero."""


class SetupError(PipelineError):
    """A tool, jar or folder the pipeline needs is missing."""


class BrokerError(PipelineError):
    """The local Kafka broker could not be started, reached or stopped."""


class MessageTooLarge(PipelineError):
    """A message to produce is over LAKEHOUSE_MAX_MESSAGE_BYTES."""


class StreamStopped(PipelineError):
    """The streaming query failed; its checkpoint allows a restart once the cause is fixed."""
