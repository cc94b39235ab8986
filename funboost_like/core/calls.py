"""The consumer's vocabulary: one call, how it can end, its statuses, and the hooks features implement.

**Outcome codes** (``SUCCEEDED`` ... ``RELEASED``, ints) say how the consumer settled a message; they
index the consumer's counters, published under :data:`OUTCOME_NAMES` by ``consumer.stats``.

**Statuses** (:class:`Status`) are the words of a call's lifecycle that status records
(:mod:`funboost_like.core.status_store`) and RPC result records (:mod:`funboost_like.core.results`)
store. They are on disk and on the wire: records written by any version must read back, so a value
never changes. :data:`STATUS_OF_OUTCOME` is the one translation from an outcome to a status.

**The hook contract** (:class:`Middleware`): a feature overrides only the hooks it needs; the
consumer calls a hook only on the middlewares that override it, so an unused hook costs nothing. A
hook that raises is logged and does not take the consumer down.

- ``pause_for()`` (fetcher thread, before each fetch): seconds to wait before fetching; 0 to go on.
- ``before_call(call)`` (worker): return a reason string to skip the call; the message is then
  acknowledged without running, counted as skipped and the reason logged.
- ``on_start(call)`` (worker): the call is about to run (first attempt).
- ``after_call(call)`` (worker): the message reached its final outcome (``call.outcome``), once.
- ``close()``: the consumer stopped.

The table of the features that implement these hooks is :mod:`funboost_like.middleware.base`.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from funboost_like.brokers.base import Delivery
    from funboost_like.core.consumer import Consumer
    from funboost_like.core.message import DecodedMessage

# Outcome codes of a message (indexes into the consumer's counters).
SUCCEEDED, FAILED, REQUEUED, DEAD_LETTERED, SKIPPED, RELEASED = range(6)
OUTCOME_NAMES = ("succeeded", "failed", "requeued", "dead_lettered", "skipped", "released")


class Status:
    """The statuses of a call (seed 002's ``TaskStatus`` in lower case, plus ``requeued`` and ``skipped``)."""

    NOT_STARTED: Final = "not_started"  # published
    RUNNING: Final = "running"  # the consumer is about to call the function
    FINISHED: Final = "finished"  # the call returned
    FAILED: Final = "failed"  # the call failed for good (after in-place retries), or was dead-lettered
    REQUEUED: Final = "requeued"  # the message went back to the queue; it runs again
    SKIPPED: Final = "skipped"  # dropped without running (expired, misfired, filtered)
    CALLBACKED: Final = "callbacked"  # the publisher's result callback ran (final)

    ALL: Final = (NOT_STARTED, RUNNING, REQUEUED, FINISHED, FAILED, SKIPPED, CALLBACKED)
    # The final statuses an RPC result record holds (a requeued call runs again: nothing is kept).
    RESULTS: Final = frozenset((FINISHED, FAILED, SKIPPED))


STATUS_OF_OUTCOME: Final = {
    SUCCEEDED: Status.FINISHED,
    FAILED: Status.FAILED,
    DEAD_LETTERED: Status.FAILED,
    REQUEUED: Status.REQUEUED,
    SKIPPED: Status.SKIPPED,
    RELEASED: Status.NOT_STARTED,  # handed back unstarted at shutdown
}


class Call:
    """One message's run through the consumer, as the hooks see it."""

    __slots__ = ("consumer", "delivery", "message", "attempts", "started_at", "run_started", "duration", "result",
                 "exc", "outcome", "skip_reason")

    def __init__(self, consumer: Consumer, delivery: Delivery, message: DecodedMessage) -> None:
        self.consumer = consumer
        self.delivery = delivery
        self.message = message
        self.attempts = 0  # runs of the function so far
        self.started_at = 0.0  # time.time() of the first run, set only while some middleware has on_start
        self.run_started = 0.0  # time.perf_counter() of the first run, always set once it ran (0.0: it did not)
        self.duration = 0.0  # seconds, all runs together
        self.result: Any = None
        self.exc: BaseException | None = None
        self.outcome = -1  # an outcome code once the message reached its final outcome
        self.skip_reason = ""

    @property
    def runs(self) -> int:
        """Runs of the function, earlier deliveries included (a retry with backoff, a consumer that died)."""
        return self.delivery.attempts - 1 + self.attempts

    @property
    def task_id(self) -> str | None:
        return self.message.task_id

    @property
    def log_id(self) -> str:
        """The message's name in log lines: its task id, or for a message without one (written by hand or
        by another program) ``body:`` and a hash of its body, the same at each delivery of it."""
        task_id = self.message.task_id
        if task_id is not None:
            return task_id
        return "body:" + hashlib.blake2b(bytes(self.delivery.body), digest_size=6).hexdigest()

    @property
    def kwargs(self) -> dict[str, Any]:
        return self.message.kwargs

    @property
    def extra(self) -> dict[str, Any]:
        return self.message.extra

    @property
    def queue_name(self) -> str:
        return self.consumer.queue_name


class Middleware:
    """Base class of a feature around the consume path; see the module docstring for each hook."""

    def pause_for(self) -> float:
        return 0.0

    def before_call(self, call: Call) -> str | None:
        return None

    def on_start(self, call: Call) -> None:
        return None

    def after_call(self, call: Call) -> None:
        return None

    def close(self) -> None:
        return None
