"""Timing jobs: publish calls of a decorated function on a schedule (seed sections 2.5 and 5.7).

A timing job does not run the function: it *publishes* a call, and the consumers run it. So a
schedule needs one scheduler process while the work spreads over every consumer::

    fsdf_background_scheduler.add_job(timing_publish_deco(consume_func), 'interval', id='3_second_job',
                                      seconds=3, kwargs={"x": 5, "y": 6})
    fsdf_background_scheduler.add_timing_publish_job(consume_func, 'cron', hour=14, minute=51, args=(5, 6))
    fsdf_background_scheduler.start()

:class:`FsdfBackgroundScheduler` is an APScheduler 3.x ``BackgroundScheduler`` (the ``scheduler``
extra) with these differences:

* A job whose function comes from :func:`timing_publish_deco` (or :meth:`add_timing_publish_job`) is
  stored as ``publish_by_reference("module:qualname", args, kwargs)``: a persistent job store keeps
  a textual reference to the booster, never the booster, and the scheduler that runs the job
  imports it (see funboost_like/core/reference.py). A booster without a reference (defined inside a
  function) can still be scheduled in a memory job store.
* The default job store comes from the ``SCHEDULER_JOB_STORE`` setting when the scheduler starts
  (see jobstores.py): memory, a SQLite file or Redis. The persistent ones keep each job as JSON
  (job_codec.py), and only timing publish jobs with a built-in trigger (date, interval, cron) and
  JSON arguments: adding any other job to them raises ``ConfigurationError`` at once.
* The default executor (:class:`TimingJobExecutor`) runs jobs in their own threads, which keep
  working after the main thread has ended, and claims every ``(job id, scheduled fire time)`` in a fire-time lock before
  running the job (see fire_lock.py), so schedulers that share a job store, or hold the same job id,
  on one host (SQLite lock) or several (Redis lock) run each fire time once. ``SCHEDULER_FIRE_LOCK``:
  ``auto`` (Redis when the job store is Redis, else SQLite), ``sqlite``, ``redis`` or ``none``. If the
  lock store fails, the job runs anyway (at least once) and the error is logged.
* With a persistent job store it wakes at least every ``SCHEDULER_POLL_SECONDS`` to see jobs that
  other processes added, changed or removed, and it tolerates a job removed under its feet.
* Its thread is not a daemon (a script that only schedules keeps running), and it stops on
  SIGINT/SIGTERM together with the process's consumers (funboost_like/core/runtime.py).

``fsdf_background_scheduler`` is one such scheduler per process, created on first use; importing
funboost_like imports neither this module nor APScheduler.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

try:
    from apscheduler.executors.base import BaseExecutor, run_job
    from apscheduler.jobstores.base import JobLookupError
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.schedulers.base import STATE_STOPPED, SchedulerNotRunningError
    from apscheduler.util import undefined
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(f"timing jobs need APScheduler 3.x ({exc}); run: pip install 'funboost_like[scheduler]'") \
        from exc

from funboost_like.core import runtime
from funboost_like.core.booster import Booster
from funboost_like.core.config import settings
from funboost_like.core.errors import ConfigurationError
from funboost_like.core.reference import BoosterReferenceError, booster_reference, resolve_booster
from funboost_like.core.results import AsyncResult
from funboost_like.core.timezones import configured_zone
from funboost_like.scheduling import job_codec, jobstores
from funboost_like.scheduling.fire_lock import FireTimeLock, RedisFireTimeLock, SqliteFireTimeLock

logger = logging.getLogger("funboost_like.scheduling")

BOOSTER_ATTRIBUTE = "__funboost_like_booster__"
FIRE_LOCK_KINDS = ("auto", "sqlite", "redis", "none")


def timing_publish_deco(booster: Booster[Any, Any]) -> Callable[..., AsyncResult]:
    """A function that publishes ``booster.push(*args, **kwargs)``: the target of a timing job."""
    if not isinstance(booster, Booster):
        raise TypeError(f"timing_publish_deco expects a function decorated with task_deco, not {booster!r}")

    def publish(*args: Any, **kwargs: Any) -> AsyncResult:
        return booster.push(*args, **kwargs)

    function = booster.consuming_function
    publish.__name__ = publish.__qualname__ = f"timing_publish_{function.__name__}"
    publish.__doc__ = f"Publish a call of {function.__qualname__} to queue {booster.queue_name!r}."
    setattr(publish, BOOSTER_ATTRIBUTE, booster)
    return publish


def publish_by_reference(ref: str, args: Iterable[Any] = (), kwargs: Mapping[str, Any] | None = None) -> AsyncResult:
    """The function every stored timing publish job runs: find the booster by ``ref`` and push the call."""
    return resolve_booster(ref).push(*tuple(args), **dict(kwargs or {}))


def lock_id(job: Any) -> str:
    """A job's name in the fire-time lock: its id and the queue it publishes to (or the function it runs),
    so unrelated jobs that happen to share an id (two projects on one host) never take each other's
    fire times, while copies of one job (a shared store, or each process's own copy) still do."""
    if job.func is publish_by_reference and job.args:
        try:
            target = resolve_booster(job.args[0]).queue_name
        except BoosterReferenceError:
            target = str(job.args[0])
    else:
        booster = getattr(job.func, BOOSTER_ATTRIBUTE, None)
        target = booster.queue_name if isinstance(booster, Booster) else (job.func_ref or job.func.__qualname__)
    return f"{job.id}@{target}"


class TimingJobExecutor(BaseExecutor):
    """Runs each due job in a short-lived daemon thread, claiming its fire times first when given a lock.

    Not a ``concurrent.futures`` pool: those refuse new work once the main thread has ended, and the
    seed's scripts end their main thread right after ``start()`` and ``consume()``. Threads are
    bounded by the jobs' ``max_instances`` (checked by APScheduler before submitting). The claim runs
    in the job's thread, so the scheduler's loop never waits on the lock store.
    """

    def __init__(self, fire_lock: FireTimeLock | None = None) -> None:
        super().__init__()
        self.fire_lock = fire_lock
        self._threads: set[threading.Thread] = set()
        self._threads_lock = threading.Lock()

    def _do_submit_job(self, job: Any, run_times: list[datetime]) -> None:
        thread = threading.Thread(target=self._run, args=(job, job._jobstore_alias, run_times),
                                  name=f"funboost_like-timing-{job.id}", daemon=True)
        with self._threads_lock:
            self._threads.add(thread)
        thread.start()

    def _run(self, job: Any, jobstore_alias: str, run_times: list[datetime]) -> None:
        try:
            if self.fire_lock is not None:
                run_times = [run_time for run_time in run_times if self._claim(job, run_time)]
            events = run_job(job, jobstore_alias, run_times, self._logger.name) if run_times else []
        except BaseException as exc:
            self._run_job_error(job.id, exc, exc.__traceback__)
        else:
            self._run_job_success(job.id, events)
        finally:
            with self._threads_lock:
                self._threads.discard(threading.current_thread())

    def _claim(self, job: Any, run_time: datetime) -> bool:
        assert self.fire_lock is not None
        try:
            won = self.fire_lock.claim(lock_id(job), run_time)
        except Exception:
            logger.exception("claiming fire time %s of job %r in %r failed; running it anyway", run_time, job.id,
                             self.fire_lock)
            return True
        if not won:
            logger.debug("fire time %s of job %r was taken by another scheduler; skipping it here", run_time, job.id)
        return won

    def shutdown(self, wait: bool = True) -> None:
        if wait:
            with self._threads_lock:
                running = list(self._threads)
            for thread in running:
                if thread is not threading.current_thread():
                    thread.join()
        if self.fire_lock is not None:
            self.fire_lock.close()


class FsdfBackgroundScheduler(BackgroundScheduler):
    """APScheduler's ``BackgroundScheduler`` for timing publish jobs (see the module docstring).

    Extra options: ``fire_lock`` (a :class:`FireTimeLock`, or one of ``auto``, ``sqlite``, ``redis``,
    ``none``; default: the ``SCHEDULER_FIRE_LOCK`` setting) and ``poll_seconds`` (default: the
    ``SCHEDULER_POLL_SECONDS`` setting). ``daemon`` defaults to False.
    """

    def __init__(self, gconfig: Mapping[str, Any] | None = None, **options: Any) -> None:
        self._processing = threading.local()
        super().__init__(dict(gconfig or {}), **options)

    def _configure(self, config: dict[str, Any]) -> None:
        fire_lock = config.pop("fire_lock", None)
        if isinstance(fire_lock, str) and fire_lock not in FIRE_LOCK_KINDS:
            raise ValueError(f"fire_lock={fire_lock!r} is not one of {', '.join(FIRE_LOCK_KINDS)} or a FireTimeLock")
        self._fire_lock_option: FireTimeLock | str | None = fire_lock
        poll = config.pop("poll_seconds", None)
        self._poll_seconds_option = None if poll is None else float(poll)
        config.setdefault("daemon", False)
        super()._configure(config)

    # -- adding jobs -------------------------------------------------------------------------------
    def add_job(self, func: Any, trigger: Any = None, args: Any = None, kwargs: Any = None, id: str | None = None,
                name: str | None = None, misfire_grace_time: Any = undefined, coalesce: Any = undefined,
                max_instances: Any = undefined, next_run_time: Any = undefined, jobstore: str = "default",
                executor: str = "default", replace_existing: bool = False, **trigger_args: Any) -> Any:
        """APScheduler's ``add_job``; a :func:`timing_publish_deco` function becomes a reference job."""
        booster = getattr(func, BOOSTER_ATTRIBUTE, None)
        if isinstance(booster, Booster):
            booster.signature.bind(tuple(args or ()), dict(kwargs or {}))  # a call that does not fit fails now
            try:
                ref = booster_reference(booster)
            except BoosterReferenceError as exc:
                if self._is_persistent(jobstore):
                    raise ConfigurationError(f"a timing job for {booster!r} cannot be kept in the persistent job "
                                             f"store {jobstore!r}: {exc}") from exc
            else:
                func, args, kwargs = publish_by_reference, (ref, tuple(args or ()), dict(kwargs or {})), None
                name = name or f"publish to {booster.queue_name} ({ref})"
        job = super().add_job(func, trigger, args, kwargs, id, name, misfire_grace_time, coalesce, max_instances,
                              next_run_time, jobstore, executor, replace_existing, **trigger_args)
        if self.state == STATE_STOPPED and self._is_persistent(jobstore):
            # A running scheduler stored the job already (the store encodes it); a stopped one keeps it
            # pending until start(): refuse a job that the store would refuse now, not at start().
            try:
                job_codec.encode_job(job, self._job_defaults)
            except ConfigurationError:
                with self._jobstores_lock:
                    self._pending_jobs[:] = [pending for pending in self._pending_jobs if pending[0] is not job]
                raise
        return job

    def modify_job(self, job_id: str, jobstore: str | None = None, **changes: Any) -> Any:
        """APScheduler's ``modify_job`` (``Job.modify`` too); new ``args`` or ``kwargs`` of a timing publish
        job are the call's, checked against the function's signature like :meth:`add_job`'s."""
        if "args" in changes or "kwargs" in changes:
            job = self.get_job(job_id, jobstore)
            if job is not None and job.func is publish_by_reference and len(job.args) == 3:
                ref, args, kwargs = job.args
                args = tuple(changes.pop("args", args) or ())
                kwargs = dict(changes.pop("kwargs", kwargs) or {})
                resolve_booster(ref).signature.bind(args, kwargs)  # a call that does not fit fails now
                changes["args"], changes["kwargs"] = (ref, args, kwargs), {}
        return super().modify_job(job_id, jobstore, **changes)

    def add_timing_publish_job(self, booster: Booster[Any, Any], trigger: Any = None, args: Any = None,
                               kwargs: Any = None, **options: Any) -> Any:
        """``add_job(timing_publish_deco(booster), trigger, args, kwargs, **options)`` (seed 2.5)."""
        return self.add_job(timing_publish_deco(booster), trigger, args, kwargs, **options)

    def _is_persistent(self, alias: str) -> bool:
        with self._jobstores_lock:
            store = self._jobstores.get(alias)
        if store is not None:
            return jobstores.is_persistent(store)
        return alias == "default" and jobstores.job_store_kind() != jobstores.MEMORY

    # -- defaults built from the settings when the scheduler starts --------------------------------
    def _create_default_jobstore(self) -> Any:
        store = jobstores.make_job_store()
        logger.info("timing jobs are kept in %r", store)
        return store

    def _create_default_executor(self) -> Any:
        fire_lock = self._make_fire_lock()
        if fire_lock is not None:
            logger.info("each fire time is claimed in %r before its job runs", fire_lock)
        return TimingJobExecutor(fire_lock)

    def _make_fire_lock(self) -> FireTimeLock | None:
        option = self._fire_lock_option
        if isinstance(option, FireTimeLock):
            return option
        kind = str(option or settings.get("SCHEDULER_FIRE_LOCK") or "auto").strip().lower()
        if kind not in FIRE_LOCK_KINDS:
            raise ValueError(f"SCHEDULER_FIRE_LOCK={kind!r} is not one of {', '.join(FIRE_LOCK_KINDS)}")
        retention = float(settings.get("SCHEDULER_FIRE_LOCK_RETENTION_SECONDS"))
        if kind == "auto":
            with self._jobstores_lock:  # a store given to the constructor is there already (executors start first)
                store = self._jobstores.get("default")
            if isinstance(store, jobstores.RedisJobStore):
                return RedisFireTimeLock(store.url, retention)  # the Redis every scheduler of that store reaches
            redis_store = store is None and jobstores.job_store_kind() == jobstores.REDIS
            kind = "redis" if redis_store else "sqlite"
        if kind == "sqlite":
            return SqliteFireTimeLock(jobstores.scheduler_sqlite_dir() / "fire_locks.sqlite3", retention,
                                      busy_timeout=float(settings.get("SQLITE_BUSY_TIMEOUT_SECONDS")))
        if kind == "redis":
            return RedisFireTimeLock(str(settings.get("REDIS_URL")), retention)
        return None

    # -- running -----------------------------------------------------------------------------------
    def start(self, paused: bool = False) -> None:
        super().start(paused)
        runtime.register(self)  # SIGINT/SIGTERM shut the scheduler down with the consumers

    def shutdown(self, wait: bool = True) -> None:
        try:
            super().shutdown(wait)
        finally:
            runtime.unregister(self)

    def stop(self) -> None:
        """Shut down without waiting for running jobs (the ``runtime`` stop protocol)."""
        if self.state != STATE_STOPPED:
            try:
                self.shutdown(wait=False)
            except SchedulerNotRunningError:
                pass

    def join(self, timeout: float | None = None) -> bool:
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def _process_jobs(self) -> float | None:
        self._processing.active = True
        try:
            wait_seconds: float | None = super()._process_jobs()
        except Exception:
            logger.exception("processing due jobs failed; trying again in %ss", self.jobstore_retry_interval)
            wait_seconds = float(self.jobstore_retry_interval)
        finally:
            self._processing.active = False
        poll = self._poll_seconds()
        if poll > 0 and self._has_shared_store():
            wait_seconds = poll if wait_seconds is None else min(wait_seconds, poll)
        return wait_seconds

    def _poll_seconds(self) -> float:
        if self._poll_seconds_option is not None:
            return self._poll_seconds_option
        return float(settings.get("SCHEDULER_POLL_SECONDS"))

    def _has_shared_store(self) -> bool:
        with self._jobstores_lock:
            return any(jobstores.is_persistent(store) for store in self._jobstores.values())

    def remove_job(self, job_id: str, jobstore: str | None = None) -> None:
        try:
            super().remove_job(job_id, jobstore)
        except JobLookupError:
            if getattr(self._processing, "active", False):  # a finished job another scheduler removed first
                logger.debug("job %r was already removed by another scheduler", job_id)
                return
            raise


_default_scheduler: FsdfBackgroundScheduler | None = None
_default_lock = threading.Lock()


def get_fsdf_background_scheduler() -> FsdfBackgroundScheduler:
    """The process's ``fsdf_background_scheduler``, created on first use (in the ``TIMEZONE`` setting)."""
    global _default_scheduler
    with _default_lock:
        if _default_scheduler is None:
            zone = configured_zone()  # a name this machine does not know raises ConfigurationError
            _default_scheduler = FsdfBackgroundScheduler(timezone=zone) if zone else FsdfBackgroundScheduler()
        return _default_scheduler


if TYPE_CHECKING:
    fsdf_background_scheduler: FsdfBackgroundScheduler


def __getattr__(name: str) -> Any:
    if name == "fsdf_background_scheduler":
        return get_fsdf_background_scheduler()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
