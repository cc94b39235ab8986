"""What ``push``/``publish`` return: a handle on the call's result in RPC mode, and result callbacks.

In RPC mode (``is_using_rpc_mode=True`` on the decorator, or per message with
``PriorityConsumingControlConfig(is_using_rpc_mode=True)``) the consumer stores one JSON record per
call in the queue's key-value store, namespace ``results`` (see :mod:`funboost_like.middleware.rpc`):

``{"task_id", "status": "finished"|"failed"|"skipped", "result", "result_is_repr", "exception":
{"type", "message"} | null, "skip_reason", "attempts", "duration", "host", "pid", "finished_at"}``

(the statuses are :attr:`Status.RESULTS <funboost_like.core.calls.Status.RESULTS>`).
:class:`AsyncResult` reads that record from the store it is given. Asking for the result of a call
published without RPC mode raises :class:`ResultNotAvailable` at once instead of blocking.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from funboost_like.core import codec
from funboost_like.core.calls import Status
from funboost_like.core.config import settings
from funboost_like.core.errors import FunboostLikeError, FunctionFailedError, ResultNotAvailable, TaskSkippedError

if TYPE_CHECKING:
    from funboost_like.core.stores import KeyValueStore

logger = logging.getLogger("funboost_like.results")

RESULTS_NAMESPACE = "results"

Record = dict[str, Any]
ResultCallback = Callable[[Record], object]


class AsyncResult:
    """A handle on one published call. ``task_id`` identifies the message on the wire.

    ``store`` is the queue's result store (its key-value store, namespace ``results``) when the
    publish asked for RPC mode. ``rpc`` says whether it did (by default: whether a store is given;
    RPC mode on a broker that keeps no records gives ``rpc=True`` without a store). ``queue_name``
    names the queue in errors. ``on_callback(task_id)`` runs after a result callback of this call
    returned (the publisher passes its features' hooks, e.g. marking the call ``callbacked``). The
    record, once read, is kept on the handle.
    """

    __slots__ = ("task_id", "store", "rpc", "queue_name", "on_callback", "_record")

    def __init__(self, task_id: str, store: KeyValueStore | None = None, *, rpc: bool | None = None,
                 queue_name: str = "?", on_callback: Callable[[str], object] | None = None) -> None:
        self.task_id = task_id
        self.store = store
        self.rpc = store is not None if rpc is None else rpc
        self.queue_name = queue_name
        self.on_callback = on_callback
        self._record: Record | None = None

    def __repr__(self) -> str:
        return f"AsyncResult(task_id={self.task_id!r})"

    @property
    def rpc_mode(self) -> bool:
        """Whether a result will be kept for this call."""
        return self.rpc

    def _store(self) -> KeyValueStore:
        if not self.rpc:
            raise ResultNotAvailable(
                f"task {self.task_id}: results are only kept in RPC mode; set is_using_rpc_mode=True on the "
                "decorator or publish with PriorityConsumingControlConfig(is_using_rpc_mode=True)"
            )
        if self.store is None:
            raise ResultNotAvailable(f"task {self.task_id}: the broker of queue {self.queue_name!r} keeps no "
                                     "key-value records (needed by RPC results)")
        return self.store

    def get_status_and_result(self, timeout: float | None = None) -> Record:
        """The call's whole record; blocks at most ``timeout`` seconds (default ``RPC_TIMEOUT_SECONDS``).

        Raises :class:`ResultNotAvailable` at once when the call was not published in RPC mode, and
        ``TimeoutError`` when no record arrived in time.
        """
        record = self._record
        if record is not None:
            return record
        store = self._store()
        if timeout is None:
            timeout = float(settings.get("RPC_TIMEOUT_SECONDS"))
        data = store.wait(self.task_id, timeout)
        if data is None:
            raise TimeoutError(f"task {self.task_id} of queue {self.queue_name!r}: no result within {timeout:g}s")
        record = self._record = parse_record(self.task_id, data)
        return record

    def get(self, timeout: float | None = None) -> Any:
        """The function's return value; blocks at most ``timeout`` seconds (default ``RPC_TIMEOUT_SECONDS``).

        Raises :class:`FunctionFailedError` (with the remote exception's type and message) when the
        call failed for good, :class:`TaskSkippedError` when it was skipped without running (expired,
        filtered), ``TimeoutError`` when no result arrived in time and :class:`ResultNotAvailable`
        at once when the call was not published in RPC mode. A result JSON could not hold comes
        back as its ``repr`` text (the record says ``"result_is_repr": true``).
        """
        return outcome_of(self.get_status_and_result(timeout))

    @property
    def result(self) -> Any:
        """``get()`` with the default timeout."""
        return self.get()

    @property
    def status_and_result(self) -> Record:
        """``get_status_and_result()`` with the default timeout: the record, whatever the status."""
        return self.get_status_and_result()

    def is_ready(self) -> bool:
        """Whether the record is there, without blocking (ResultNotAvailable when not in RPC mode)."""
        if self._record is not None:
            return True
        data = self._store().get(self.task_id)
        if data is None:
            return False
        self._record = parse_record(self.task_id, data)
        return True

    def set_callback(self, fn: ResultCallback, timeout: float | None = None) -> None:
        """Run ``fn(record)`` on a shared background thread when the record arrives (seed 002's callback).

        Returns at once. ``fn`` gets the record of :attr:`status_and_result`, whatever the status; an
        exception it raises is logged. Once it returned, ``on_callback`` runs (so the call is marked
        ``callbacked`` when status persistence is on). A record that does not arrive within ``timeout`` seconds (default
        ``RPC_TIMEOUT_SECONDS``) is given up with a warning. Callbacks run while this process lives.
        """
        if not callable(fn):
            raise TypeError(f"the callback must be callable, got {fn!r}")
        store = self._store()  # ResultNotAvailable at once when not in RPC mode
        if timeout is None:
            timeout = float(settings.get("RPC_TIMEOUT_SECONDS"))
        watcher = _callback_watcher()
        if self._record is not None:
            watcher.run(self, fn, self._record)
        else:
            watcher.add(store, self, fn, time.monotonic() + timeout)


def parse_record(task_id: str, data: bytes) -> Record:
    try:
        record = codec.loads(data)
    except codec.DecodeFailure as exc:
        raise FunboostLikeError(f"task {task_id}: the stored result record is not valid JSON: {exc}") from exc
    if not isinstance(record, dict) or "status" not in record:
        raise FunboostLikeError(f"task {task_id}: the stored result record is malformed: {data[:200]!r}")
    return record


def outcome_of(record: Record) -> Any:
    """The result of a record, or the exception its status calls for."""
    task_id = str(record.get("task_id"))
    status = record["status"]
    if status == Status.FINISHED:
        return record.get("result")
    if status == Status.FAILED:
        exception = record.get("exception") or {}
        raise FunctionFailedError(task_id, str(exception.get("type", "")), str(exception.get("message", "")), record)
    if status == Status.SKIPPED:
        raise TaskSkippedError(task_id, str(record.get("skip_reason") or ""), record)
    raise FunboostLikeError(f"task {task_id}: unknown result status {status!r}")


# -- result callbacks -------------------------------------------------------------------------------

_CALLBACK_THREADS = 4
_POLL_MIN, _POLL_MAX = 0.005, 0.05
_IDLE_EXIT_SECONDS = 10.0  # the watcher thread ends after this long without pending callbacks


class _Pending:
    __slots__ = ("result", "fn", "deadline")

    def __init__(self, result: AsyncResult, fn: ResultCallback, deadline: float) -> None:
        self.result = result
        self.fn = fn
        self.deadline = deadline


class _CallbackWatcher:
    """One daemon thread polls every pending task id (one ``get_many`` per store and round, 5 ms
    backing off to 50 ms) and hands each arrived record's callbacks to a small thread pool."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pending: dict[KeyValueStore, dict[str, list[_Pending]]] = {}
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._failing: set[int] = set()  # id() of stores whose last poll failed (logged once)

    def add(self, store: KeyValueStore, result: AsyncResult, fn: ResultCallback, deadline: float) -> None:
        with self._lock:
            self._pending.setdefault(store, {}).setdefault(result.task_id, []).append(_Pending(result, fn, deadline))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="funboost_like-result-callbacks", daemon=True)
                self._thread.start()
        self._wake.set()

    def run(self, result: AsyncResult, fn: ResultCallback, record: Record) -> None:
        with self._lock:
            pool = self._pool
            if pool is None:
                pool = self._pool = ThreadPoolExecutor(_CALLBACK_THREADS, thread_name_prefix="funboost_like-callback")
        pool.submit(_run_callback, result, fn, record)

    def _loop(self) -> None:
        pause = _POLL_MIN
        idle_since = time.monotonic()
        while True:
            with self._lock:
                snapshot = [(store, list(tasks)) for store, tasks in self._pending.items()]
                if not snapshot and time.monotonic() - idle_since > _IDLE_EXIT_SECONDS:
                    self._thread = None
                    return
            arrived = False
            for store, task_ids in snapshot:
                try:
                    arrived = self._poll(store, task_ids) or arrived
                except Exception:  # never let the watcher die: pending callbacks would hang forever
                    logger.exception("the result-callback watcher failed on %r; going on", store)
            if snapshot:
                idle_since = time.monotonic()
            woken = self._wake.wait(pause if snapshot else _IDLE_EXIT_SECONDS)
            self._wake.clear()
            pause = _POLL_MIN if arrived or woken else min(pause * 2, _POLL_MAX)

    def _poll(self, store: KeyValueStore, task_ids: list[str]) -> bool:
        try:
            found = store.get_many(task_ids)
            self._failing.discard(id(store))
        except Exception as exc:
            if id(store) not in self._failing:
                self._failing.add(id(store))
                logger.warning("polling %d pending result(s) in %r failed: %s; retrying", len(task_ids), store, exc)
            found = {}
        ready: list[tuple[_Pending, bytes]] = []
        expired: list[_Pending] = []
        now = time.monotonic()
        with self._lock:
            waiting = self._pending.get(store, {})
            for task_id in task_ids:
                entries = waiting.get(task_id)
                if not entries:
                    continue
                data = found.get(task_id)
                if data is not None:
                    ready.extend((entry, data) for entry in entries)
                    del waiting[task_id]
                    continue
                late = [entry for entry in entries if entry.deadline <= now]
                if late:
                    expired.extend(late)
                    entries[:] = [entry for entry in entries if entry.deadline > now]
                    if not entries:
                        del waiting[task_id]
            if not waiting:
                self._pending.pop(store, None)
        for entry in expired:
            logger.warning("no result for task %s arrived in time; its callback %r will not run",
                           entry.result.task_id, entry.fn)
        for entry, data in ready:
            try:
                record = parse_record(entry.result.task_id, data)
            except FunboostLikeError:
                logger.exception("cannot run the callback of task %s", entry.result.task_id)
                continue
            entry.result._record = record
            self.run(entry.result, entry.fn, record)
        return bool(ready)


def _run_callback(result: AsyncResult, fn: ResultCallback, record: Record) -> None:
    try:
        fn(record)
    except Exception:
        logger.exception("the result callback %r of task %s failed", fn, result.task_id)
        return
    if result.on_callback is not None:
        try:
            result.on_callback(result.task_id)
        except Exception:
            logger.exception("recording that the callback of task %s ran failed", result.task_id)


_watcher: _CallbackWatcher | None = None
_watcher_lock = threading.Lock()


def _callback_watcher() -> _CallbackWatcher:
    global _watcher
    watcher = _watcher
    if watcher is None:
        with _watcher_lock:
            if _watcher is None:
                _watcher = _CallbackWatcher()
            watcher = _watcher
    return watcher


def _forget_watcher_in_child() -> None:
    # The parent's threads do not exist in a forked child, and its pending callbacks are the parent's.
    global _watcher, _watcher_lock
    _watcher = None
    _watcher_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_watcher_in_child)
