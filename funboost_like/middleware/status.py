"""Status and result persistence (``function_result_status_persistance_conf``, seed 004; lifecycle of seed 002).

With ``FunctionResultStatusPersistanceConfig(is_save_status=True)`` (or ``is_save_result=True``) every
call leaves a record in the queue's :class:`~funboost_like.core.status_store.StatusStore`:

* the publisher records ``not_started`` with the arguments and the publish time (publish hook);
* the consumer records ``running`` (host, pid, script, start time, delivery count) just before the
  call, then ``finished``, ``failed``, ``requeued`` or ``skipped`` with the duration, the attempts,
  the exception text and, only with ``is_save_result=True``, the result;
* :func:`record_callbacked` records ``callbacked`` once the publisher's result callback ran.

Every hook only builds a tuple and appends it to the store's in-memory batch; a background thread
writes the batches. Messages without a ``task_id`` (bodies written by hand without ``extra``) are
not recorded.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from typing import TYPE_CHECKING, Any

from funboost_like.core.calls import STATUS_OF_OUTCOME, Call, Middleware, Status
from funboost_like.core.message import EXTRA_KEY
from funboost_like.core.params import ConsumerParams
from funboost_like.core.status_store import StatusEvent, StatusStore, open_status_store, to_json

if TYPE_CHECKING:
    from collections.abc import Callable

    from funboost_like.core.consumer import Consumer
    from funboost_like.core.publisher import Publisher

_EXCEPTION_TEXT_LIMIT = 8000
_HOST = socket.gethostname()


def enabled(params: ConsumerParams) -> bool:
    """Whether these parameters ask for call records."""
    conf = params.function_result_status_persistance_conf
    return bool(conf.is_save_status or conf.is_save_result)


def _expires_at(now: float, expire_seconds: float) -> float | None:
    return now + expire_seconds if expire_seconds > 0 else None


class _LazyStore:
    """Resolves the queue's store on first use (so settings patched after decoration still apply)."""

    def __init__(self, queue_name: str) -> None:
        self.queue_name = queue_name
        self._store: StatusStore | None = None

    @property
    def store(self) -> StatusStore:
        store = self._store
        if store is None:
            store = self._store = open_status_store(self.queue_name)
        return store


class StatusRecorder(Middleware, _LazyStore):
    """Consumer side: ``running`` before the call, the final outcome after it."""

    def __init__(self, params: ConsumerParams) -> None:
        _LazyStore.__init__(self, params.queue_name)
        conf = params.function_result_status_persistance_conf
        self.save_result = bool(conf.is_save_result)
        self.expire_seconds = float(conf.expire_seconds)
        self.script = sys.argv[0] if sys.argv else ""

    def on_start(self, call: Call) -> None:
        task_id = call.task_id
        if task_id is None:
            return
        now = call.started_at or time.time()
        self.store.record(StatusEvent(
            task_id, self.queue_name, Status.RUNNING, now, kwargs=to_json(call.kwargs),
            deliveries=call.delivery.attempts, host=_HOST, pid=os.getpid(), script=self.script, started_at=now,
            expires_at=_expires_at(now, self.expire_seconds),
        ))

    def after_call(self, call: Call) -> None:
        task_id = call.task_id
        if task_id is None:
            return
        status = STATUS_OF_OUTCOME.get(call.outcome, Status.FAILED)
        ran = call.attempts > 0
        started = call.started_at if ran and call.started_at else None
        now = started + call.duration if started is not None else time.time()
        result = to_json(call.result) if self.save_result and status == Status.FINISHED else None
        exception = _exception_text(call.exc) if call.exc is not None else (call.skip_reason or None)
        self.store.record(StatusEvent(
            task_id, self.queue_name, status, now, result=result, exception=exception,
            attempts=call.attempts, deliveries=call.delivery.attempts, started_at=started,
            finished_at=now if ran else None, duration=call.duration if ran else None,
            expires_at=_expires_at(now, self.expire_seconds),
        ))

    def close(self) -> None:
        """The consumer stopped: make its records durable before it reports being stopped."""
        if self._store is not None:
            self._store.flush()


def _exception_text(exc: BaseException) -> str:
    """``Type: message`` first (what a listing shows), then the traceback's tail."""
    text = f"{type(exc).__name__}: {exc}"
    details = "".join(traceback.format_exception(exc))
    if len(details) > _EXCEPTION_TEXT_LIMIT:
        details = "...\n" + details[-_EXCEPTION_TEXT_LIMIT:]
    return f"{text}\n\n{details}"


def build(consumer: Consumer) -> StatusRecorder | None:
    return StatusRecorder(consumer.params) if enabled(consumer.params) else None


class _PublishRecorder(_LazyStore):
    """Publisher side: ``not_started`` with the arguments, for every published call."""

    def __init__(self, params: ConsumerParams) -> None:
        super().__init__(params.queue_name)
        self.expire_seconds = float(params.function_result_status_persistance_conf.expire_seconds)

    def __call__(self, task_id: str, message: dict[str, Any]) -> None:
        extra = message.get(EXTRA_KEY)
        published = extra.get("publish_time") if isinstance(extra, dict) else None
        if not isinstance(published, (int, float)):
            published = time.time()
        kwargs = {key: value for key, value in message.items() if key != EXTRA_KEY}
        self.store.record(StatusEvent(
            task_id, self.queue_name, Status.NOT_STARTED, published, kwargs=to_json(kwargs),
            publish_time=published, expires_at=_expires_at(published, self.expire_seconds),
        ))

    def __repr__(self) -> str:
        return f"<status publish hook of queue {self.queue_name!r}>"


def build_publish_hook(publisher: Publisher) -> Callable[[str, dict[str, Any]], None] | None:
    return _PublishRecorder(publisher.params) if enabled(publisher.params) else None


def build_callback_hook(publisher: Publisher) -> Callable[[str], None]:
    """:func:`record_callbacked` for this publisher's tasks (a no-op while its parameters ask for no records)."""

    def callbacked(task_id: str) -> None:
        record_callbacked(publisher, task_id)

    return callbacked


def record_callbacked(publisher: Publisher, task_id: str) -> None:
    """Mark ``task_id`` as ``callbacked`` (its result callback ran); a no-op when the publisher's
    parameters do not ask for call records. Cheap: the record is written in the background."""
    params = publisher.params
    if not enabled(params):
        return
    now = time.time()
    expire_seconds = float(params.function_result_status_persistance_conf.expire_seconds)
    open_status_store(params.queue_name).record(StatusEvent(
        task_id, params.queue_name, Status.CALLBACKED, now, expires_at=_expires_at(now, expire_seconds),
    ))
