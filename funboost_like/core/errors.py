"""The exception hierarchy.

Every error the framework raises on its own account derives from :class:`FunboostLikeError`.
The two control-flow exceptions a consuming function may raise (:class:`ExceptionForRetry`,
:class:`ExceptionForRequeue`) keep the seed's names.
"""

from __future__ import annotations


class FunboostLikeError(Exception):
    """Root of every error raised by funboost_like itself."""


class ConfigurationError(FunboostLikeError, ValueError):
    """A decorator parameter or setting is unknown, malformed or not supported by the broker."""


class BrokerError(FunboostLikeError):
    """A broker operation failed."""


class BrokerConnectionError(BrokerError):
    """The broker cannot be reached."""


class MessageTooLargeError(BrokerError, ValueError):
    """The server refused a message for its size (a setting of the server's); nothing was published."""


class BrokerNotAvailable(FunboostLikeError, ValueError):
    """The chosen broker kind is not built yet, or its client library is not installed."""


class DecodeError(FunboostLikeError):
    """A message body is not valid JSON, or its keys do not fit the consuming function."""


class PublishError(FunboostLikeError, TypeError):
    """A publish call does not fit the consuming function's signature or cannot be encoded."""


class UnroutableError(FunboostLikeError):
    """A routed publish matched no bound queue (RabbitMQ would drop it in silence); nothing was published."""


class DoubleAckError(BrokerError):
    """A delivery was acknowledged or rejected twice."""


class FunctionTimeoutError(FunboostLikeError):
    """A call ran longer than its ``function_timeout``; it counts as a failed attempt."""


class ExceptionForRetry(Exception):
    """Raise inside a consuming function to have the call retried at once (counts toward max_retry_times)."""


class ExceptionForRequeue(Exception):
    """Raise inside a consuming function to hand the message back to the broker queue."""


class ResultNotAvailable(FunboostLikeError):
    """The publish-side result of a call was asked for, but RPC mode is not enabled for it."""


class FunctionFailedError(FunboostLikeError):
    """The remote call of an RPC-mode task failed for good; raised by ``AsyncResult.get``.

    ``exception_type`` and ``exception_message`` are those of the exception raised in the consumer;
    ``record`` is the whole result record (see ``AsyncResult.status_and_result``).
    """

    def __init__(self, task_id: str, exception_type: str, exception_message: str,
                 record: dict[str, object] | None = None) -> None:
        super().__init__(f"task {task_id} failed: {exception_type}: {exception_message}")
        self.task_id = task_id
        self.exception_type = exception_type
        self.exception_message = exception_message
        self.record = record or {}


class TaskSkippedError(FunboostLikeError):
    """An RPC-mode task was skipped without running (expired, filtered, ...); ``reason`` says why."""

    def __init__(self, task_id: str, reason: str, record: dict[str, object] | None = None) -> None:
        super().__init__(f"task {task_id} was skipped without running: {reason}")
        self.task_id = task_id
        self.reason = reason
        self.record = record or {}
