"""Calls and dead letters for the service layer: task listings, one task, retry, dead letters, timing jobs.

Call records are the status records of ``function_result_status_persistance_conf``
(:mod:`funboost_like.core.status_store`, one SQLite file per queue on the host that consumed); dead
letters are the broker's. Requeuing every dead letter of a queue uses the broker contract only: list,
publish the bodies back, then delete the dead letters; a dead letter that arrives between the last
listing and the deletion is requeued too, because the listing is repeated until it is stable just
before the deletion, at most five times (a letter that lands after that, e.g. from a consumer that
fails every requeued call at once, is deleted without being requeued, and counted as ``lost``).
A single dead letter (by its index in the listing, newest first) is published back first and then
removed with the broker's ``remove_dead_letter`` (every kind has it).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from funboost_like.core import codec
from funboost_like.core.enums import BrokerEnum
from funboost_like.core.errors import FunboostLikeError
from funboost_like.core.message import EXTRA_KEY, encode, republished
from funboost_like.core.status_store import (
    NOT_STARTED,
    STATUSES,
    StatusEvent,
    StatusRecord,
    open_status_store,
    to_json,
)
from funboost_like.ops import task_search

if TYPE_CHECKING:
    from funboost_like.brokers.base import Broker, DeadLetter

logger = logging.getLogger("funboost_like.ops")

SEARCH_SCAN_LIMIT = 20_000  # records a --search looks through (newest first)
_ALL = 1_000_000
_ROUNDS = 5  # listings a requeue of every dead letter repeats while new ones keep arriving


class TaskNotFound(FunboostLikeError, LookupError):
    """No status record of the queues looked at has this task id."""


class CallRecords:
    """The part of :class:`~funboost_like.ops.service.OpsService` that reads call records and dead letters."""

    def kind_of(self, queue: str) -> BrokerEnum:
        raise NotImplementedError

    def queue_names(self) -> list[str]:
        raise NotImplementedError

    @staticmethod
    def broker(kind: Any) -> Broker:
        raise NotImplementedError

    # -- call records -------------------------------------------------------------------------
    def tasks(self, queue: str, state: str | None = None, search: str | None = None,
              limit: int = 50) -> list[dict[str, Any]]:
        """The newest call records of ``queue``, by ``state`` (a status) and containing ``search``
        (in the task id, the arguments' JSON or the exception text)."""
        self.kind_of(queue)
        if state is not None and state not in STATUSES:
            raise ValueError(f"unknown state {state!r}; known: {', '.join(STATUSES)}")
        store = open_status_store(queue)
        if not search:
            return [_row(r) for r in store.query(status=state, limit=limit)]
        needle = search.lower()
        found: list[dict[str, Any]] = []
        records = store.query(status=state, limit=SEARCH_SCAN_LIMIT)
        for record in records:
            text = f"{record.task_id}\n{codec.dumps(record.kwargs).decode()}\n{record.exception or ''}".lower()
            if needle in text:
                found.append(_row(record))
                if len(found) >= limit:
                    return found
        if len(records) < SEARCH_SCAN_LIMIT:
            return found
        seen = {row["task_id"] for row in found}  # older records: the files' keyset search goes on to the end
        cursor = None
        while len(found) < limit:
            page = self.search_tasks(queue, state=state, search=search, cursor=cursor, limit=limit)
            found += [row for row in page["rows"] if row["task_id"] not in seen][:limit - len(found)]
            seen.update(row["task_id"] for row in page["rows"])
            cursor = page["next"]
            if cursor is None:
                break
        return found

    def search_tasks(self, queue: str, *, state: str | None = None, search: str | None = None,
                     since: float | None = None, until: float | None = None, task_id: str | None = None,
                     cursor: str | None = None, limit: int = 50) -> dict[str, Any]:
        """One page of ``queue``'s call records, newest change first, with keyset pagination
        (:mod:`funboost_like.ops.task_search`): ``{"rows", "next", "partial"}``; pass ``next`` back as
        ``cursor`` for the following page. Reads the files only: records a process of this one still
        holds in memory (at most ~0.2 s of them) show up once its writer committed them."""
        self.kind_of(queue)
        records, after, partial = task_search.search(
            open_status_store(queue).path, state=state or None, search_text=search or None, since=since, until=until,
            task_id=task_id or None, cursor=cursor, limit=limit)
        return {"queue": queue, "rows": [_row(r) for r in records], "next": after, "partial": partial}

    @staticmethod
    def run_times(queue: str, window: float = 60.0) -> dict[str, Any]:
        """Run-time percentiles (``p50``, ``p95``, ``count``) of ``queue``'s calls of the last ``window`` seconds,
        from the status records of this host (all None without records)."""
        return task_search.run_times(open_status_store(queue).path, time.time() - window)

    def task(self, task_id: str, queue: str | None = None) -> dict[str, Any]:
        """The full record of one call (looked for in ``queue``, or in every known queue)."""
        record = self._record(task_id, queue)
        return {**_row(record), "result": record.result, "result_saved": record.result_saved,
                "exception": record.exception, "finished_at": record.finished_at, "deliveries": record.deliveries,
                "script": record.script}

    def _record(self, task_id: str, queue: str | None) -> StatusRecord:
        names = [queue] if queue is not None else self.queue_names()
        for name in names:
            record = open_status_store(name).get(task_id)
            if record is not None:
                return record
        where = f"queue {queue!r}" if queue is not None else f"the {len(names)} known queue(s)"
        raise TaskNotFound(f"no call record of task {task_id!r} in {where} (status records are kept only with "
                           "function_result_status_persistance_conf, on the host that ran the call)")

    def retry(self, task_id: str, queue: str | None = None) -> dict[str, Any]:
        """Publish the call of a stored record again (a new task id; ``extra.retry_of`` names the old one)."""
        record = self._record(task_id, queue)
        name = record.queue or queue
        if name is None or not isinstance(record.kwargs, dict):
            raise TaskNotFound(f"the record of task {task_id!r} keeps no arguments to publish again")
        kind = self.kind_of(name)
        new_id, body = encode(dict(record.kwargs), {"retry_of": task_id})
        self.broker(kind).publish(name, body)
        # Its own not_started record, as a publisher's would write: its page exists at once (it 404ed
        # until a consumer ran it), kept as long as the old record was
        now = time.time()
        span = None if record.expires_at is None else record.expires_at - (record.publish_time or record.updated_at)
        store = open_status_store(name)
        store.record(StatusEvent(new_id, name, NOT_STARTED, now, kwargs=to_json(record.kwargs),
                                 publish_time=now, expires_at=None if span is None else now + span))
        store.flush()
        return {"queue": name, "broker": kind.name, "retry_of": task_id, "task_id": new_id}

    # -- delayed messages and dead letters -------------------------------------------------------
    def delayed(self, queue: str, limit: int = 50) -> list[dict[str, Any]]:
        """Messages of ``queue`` not due yet (countdowns, ``eta``, delayed retries), soonest first."""
        kind = self.kind_of(queue)
        broker = self.broker(kind)
        try:
            found = broker.list_delayed(queue, limit)
        except NotImplementedError as exc:
            raise FunboostLikeError(f"broker {kind.name} cannot list its delayed messages (they are counted "
                                    "in the queue's depth)") from exc
        rows = []
        for due, raw in found:
            body = _body(raw)
            extra = body.get(EXTRA_KEY) if isinstance(body, dict) else None
            rows.append({"due_at": due, "task_id": extra.get("task_id") if isinstance(extra, dict) else None,
                         "body": body})
        return rows

    def dead(self, queue: str, limit: int = 50) -> list[dict[str, Any]]:
        """The newest dead letters of ``queue`` (index 0 is the newest)."""
        kind = self.kind_of(queue)
        letters = _listing(self.broker(kind), queue, limit)
        return [_letter(index, letter) for index, letter in enumerate(letters)]

    def requeue_dead(self, queue: str, *, all_letters: bool = False, index: int = 0,
                     task_id: str | None = None) -> dict[str, Any]:
        """Publish dead letters back to ``queue``: every one (``all_letters``), or the one at ``index``
        (which must be the call ``task_id`` when it is given: a page's listing may be out of date)."""
        return self._take_dead(queue, all_letters, index, task_id, requeue=True)

    def delete_dead(self, queue: str, *, all_letters: bool = False, index: int = 0,
                    task_id: str | None = None) -> dict[str, Any]:
        return self._take_dead(queue, all_letters, index, task_id, requeue=False)

    def _take_dead(self, queue: str, all_letters: bool, index: int, task_id: str | None, *,
                   requeue: bool) -> dict[str, Any]:
        kind = self.kind_of(queue)
        broker = self.broker(kind)
        verb = "requeued" if requeue else "deleted"
        if not all_letters:
            return self._take_one_dead(broker, kind, queue, index, task_id, requeue=requeue)
        letters = _listing(broker, queue, _ALL)
        done = 0
        for _ in range(_ROUNDS):
            if requeue:
                fresh = letters[:len(letters) - done]  # newest first: the ones not yet published
                for letter in reversed(fresh):
                    broker.publish(queue, republished(letter.body, time.time()))
            done = len(letters)
            letters = _listing(broker, queue, _ALL)
            if len(letters) == done:
                break
        deleted = broker.purge_dead_letters(queue)
        return {"queue": queue, "broker": kind.name, verb: done, "lost": max(0, deleted - done) if requeue else 0}

    @staticmethod
    def _take_one_dead(broker: Broker, kind: BrokerEnum, queue: str, index: int, task_id: str | None, *,
                       requeue: bool) -> dict[str, Any]:
        """The letter at ``index`` of the listing: published first, then removed, so a failure between the
        two runs the call twice rather than losing it."""
        from funboost_like.brokers.base import Broker

        verb = "requeued" if requeue else "deleted"
        if type(broker).remove_dead_letter is Broker.remove_dead_letter:
            raise FunboostLikeError(f"broker {kind.name} cannot take a single dead letter out; use --all")
        letters = _listing(broker, queue, index + 1)
        if index < 0 or index >= len(letters):
            raise FunboostLikeError(f"queue {queue!r} has no dead letter at index {index} ({len(letters)} listed)")
        letter = letters[index]
        found = _letter(index, letter)["task_id"]
        if task_id is not None and found != task_id:
            raise FunboostLikeError(f"dead letter {index} of queue {queue!r} is no longer task {task_id!r}: "
                                    "the listing changed; list the dead letters again")
        if requeue:
            broker.publish(queue, republished(letter.body, time.time()))
        removed = broker.remove_dead_letter(queue, letter)
        if requeue and not removed:
            logger.warning("dead letter %d of queue %r was requeued, and someone else took it out meanwhile: "
                           "its call may run twice", index, queue)
        return {"queue": queue, "broker": kind.name, verb: 1 if requeue or removed else 0, "task_id": found}

    # -- timing jobs --------------------------------------------------------------------------
    @staticmethod
    def timing() -> dict[str, Any]:
        """The timing jobs of the configured persistent job store (``SCHEDULER_JOB_STORE``)."""
        from funboost_like.scheduling import jobstores

        kind = jobstores.job_store_kind()
        if kind == jobstores.MEMORY:
            return {"store": kind, "jobs": [], "note": "SCHEDULER_JOB_STORE is 'memory': jobs live only in the "
                                                        "process that added them"}
        if kind == jobstores.SQLITE and not (jobstores.scheduler_sqlite_dir() / "jobs.sqlite3").exists():
            return {"store": kind, "jobs": []}
        store = jobstores.make_job_store()
        store.start(None, "default")
        try:
            jobs = [{"id": job.id, "name": job.name, "trigger": str(job.trigger),
                     "next_run_time": job.next_run_time.isoformat() if job.next_run_time else None,
                     "paused": job.next_run_time is None} for job in store.get_all_jobs()]
        finally:
            store.shutdown()
        return {"store": kind, "jobs": jobs}


def _listing(broker: Broker, queue: str, limit: int) -> list[DeadLetter]:
    try:
        return broker.list_dead_letters(queue, limit)
    except NotImplementedError as exc:
        raise FunboostLikeError(f"broker {type(broker).__name__} keeps no dead letters it can list") from exc


def _body(raw: bytes) -> Any:
    """A message's JSON, or its text when it is not JSON."""
    try:
        return codec.loads(raw)
    except codec.DecodeFailure:
        return raw.decode("utf-8", "replace")


def _letter(index: int, letter: DeadLetter) -> dict[str, Any]:
    body = _body(letter.body)
    extra = body.get(EXTRA_KEY) if isinstance(body, dict) else None
    return {"index": index, "task_id": extra.get("task_id") if isinstance(extra, dict) else None,
            "reason": letter.reason, "failed_at": letter.failed_at, "attempts": letter.attempts, "body": body}


def _row(record: StatusRecord) -> dict[str, Any]:
    return {"task_id": record.task_id, "queue": record.queue, "status": record.status,
            "updated_at": record.updated_at, "kwargs": record.kwargs, "attempts": record.attempts,
            "duration": record.duration, "host": record.host, "pid": record.pid,
            "publish_time": record.publish_time, "started_at": record.started_at,
            "error": (record.exception or "").split("\n", 1)[0] or None}
