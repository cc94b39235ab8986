"""Timing jobs: fsdf_background_scheduler, timing_publish_deco, persistent job stores, fire-time locks."""

from __future__ import annotations

import collections
import datetime
import json
import logging
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

pytest.importorskip("apscheduler")

from apscheduler.job import Job  # noqa: E402
from apscheduler.jobstores.base import ConflictingIdError, JobLookupError  # noqa: E402
from apscheduler.triggers.combining import OrTrigger  # noqa: E402
from apscheduler.triggers.cron import CronTrigger  # noqa: E402
from apscheduler.triggers.date import DateTrigger  # noqa: E402
from apscheduler.triggers.interval import IntervalTrigger  # noqa: E402

from funboost_like import BrokerEnum, patch_frame_config, task_deco  # noqa: E402
from funboost_like.core.errors import ConfigurationError  # noqa: E402
from funboost_like.scheduling.fire_lock import RedisFireTimeLock, SqliteFireTimeLock  # noqa: E402
from funboost_like.scheduling.job_codec import (  # noqa: E402
    PUBLISH_BY_REFERENCE,
    JobStateError,
    decode_job,
    encode_job,
)
from funboost_like.scheduling.jobstores import (  # noqa: E402
    RedisJobStore,
    SQLAlchemyJobStore,
    SQLiteJobStore,
    make_job_store,
)
from funboost_like.scheduling.timing import (  # noqa: E402
    FsdfBackgroundScheduler,
    TimingJobExecutor,
    publish_by_reference,
    timing_publish_deco,
)
from tests.conftest import REPO, require_server, subprocess_env  # noqa: E402

SCHEDULER_SCRIPT = REPO / "test_frame" / "crash" / "timing_scheduler.py"
REDIS_TEST_URL = "redis://127.0.0.1:6379/14"

calls: list[tuple[int, int]] = []
calls_lock = threading.Lock()


@task_deco("test_timing_memory_queue", broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, concurrent_num=5)
def consume_func(x: int, y: int) -> None:
    with calls_lock:
        calls.append((x, y))


@task_deco("test_timing_persisted_queue", broker_kind=BrokerEnum.PERSISTQUEUE)
def persisted_func(n: int) -> None:
    raise AssertionError("nothing consumes this queue")


@task_deco("test_timing_other_persisted_queue", broker_kind=BrokerEnum.PERSISTQUEUE)
def other_persisted_func(n: int) -> None:
    raise AssertionError("nothing consumes this queue")


@pytest.fixture(autouse=True)
def scheduler_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "scheduler"
    patch_frame_config(SCHEDULER_SQLITE_DIR=str(folder))  # conftest resets the settings after each test
    return folder


@pytest.fixture
def schedulers() -> Iterator[list[FsdfBackgroundScheduler]]:
    made: list[FsdfBackgroundScheduler] = []
    yield made
    for scheduler in made:
        if scheduler.running:
            scheduler.shutdown(wait=False)


def new_scheduler(made: list[FsdfBackgroundScheduler], **options: object) -> FsdfBackgroundScheduler:
    scheduler = FsdfBackgroundScheduler(**options)
    made.append(scheduler)
    return scheduler


def wait_for(condition: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


# -- the seed's calls ---------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_seed_interval_date_and_cron_jobs_publish_and_get_consumed(
        schedulers: list[FsdfBackgroundScheduler]) -> None:
    calls.clear()
    consume_func.clear()
    scheduler = new_scheduler(schedulers)
    soon = datetime.datetime.now() + datetime.timedelta(seconds=1.5)
    at = datetime.datetime.now().replace(microsecond=0) + datetime.timedelta(seconds=2)
    # Seed 2.5, with the intervals shortened and the dates moved to now + a few seconds.
    scheduler.add_job(timing_publish_deco(consume_func), "interval", id="3_second_job", seconds=1,
                      kwargs={"x": 5, "y": 6})
    scheduler.add_job(timing_publish_deco(consume_func), "date", run_date=soon, args=(7, 8))
    scheduler.add_timing_publish_job(consume_func, "cron", day_of_week="*", hour=at.hour, minute=at.minute,
                                     second=at.second, args=(9, 10))
    scheduler.start()
    consume_func.consume()
    time.sleep(3.6)
    scheduler.shutdown()
    assert wait_for(lambda: consume_func.get_message_count() == 0, 5)
    time.sleep(0.1)
    with calls_lock:
        seen = list(calls)
    assert 2 <= seen.count((5, 6)) <= 4, seen  # every second for 3.6 s (a loaded machine may be late)
    assert seen.count((7, 8)) == 1, seen
    assert seen.count((9, 10)) == 1, seen


def test_timing_publish_deco_publishes_a_call() -> None:
    consume_func.clear()
    publish = timing_publish_deco(consume_func)
    publish(1, y=2)
    assert consume_func.get_message_count() == 1
    assert publish.__name__ == "timing_publish_consume_func"
    with pytest.raises(TypeError):
        timing_publish_deco(lambda: None)  # type: ignore[arg-type]


def test_a_call_that_does_not_fit_fails_when_the_job_is_added(schedulers: list[FsdfBackgroundScheduler]) -> None:
    scheduler = new_scheduler(schedulers)
    with pytest.raises(TypeError):
        scheduler.add_timing_publish_job(consume_func, "interval", seconds=1, kwargs={"x": 1, "z": 2})


def test_a_booster_without_a_reference_runs_from_memory_but_not_from_a_persistent_store(
        schedulers: list[FsdfBackgroundScheduler]) -> None:
    @task_deco("test_timing_local_queue", broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE)
    def local(n: int) -> None:
        return None

    local.clear()
    scheduler = new_scheduler(schedulers)
    job = scheduler.add_timing_publish_job(local, "date", run_date=datetime.datetime.now(), args=(1,))
    assert job.func is not publish_by_reference  # kept as a closure in the memory store
    scheduler.start()
    assert wait_for(lambda: local.get_message_count() == 1, 5)

    patch_frame_config(SCHEDULER_JOB_STORE="sqlite")
    with pytest.raises(ConfigurationError, match="top level"):
        new_scheduler(schedulers).add_timing_publish_job(local, "interval", seconds=1, args=(1,))


def test_importing_funboost_like_does_not_import_apscheduler(tmp_path: Path) -> None:
    code = (
        "import sys, funboost_like\n"
        "assert 'apscheduler' not in sys.modules and 'funboost_like.scheduling.timing' not in sys.modules\n"
        "from funboost_like import fsdf_background_scheduler, timing_publish_deco\n"
        "assert 'apscheduler' in sys.modules and not fsdf_background_scheduler.running\n"
        "assert fsdf_background_scheduler is funboost_like.fsdf_background_scheduler\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=subprocess_env(tmp_path / "q"), capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr


# -- persistent job stores -----------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_sqlite_job_store_survives_a_scheduler_restart(schedulers: list[FsdfBackgroundScheduler],
                                                       scheduler_dir: Path) -> None:
    patch_frame_config(SCHEDULER_JOB_STORE="sqlite")
    persisted_func.clear()
    first = new_scheduler(schedulers)
    first.add_timing_publish_job(persisted_func, "interval", seconds=1, id="persisted_interval", kwargs={"n": 1})
    later = datetime.datetime.now() + datetime.timedelta(days=1)
    first.add_timing_publish_job(persisted_func, "date", run_date=later, id="persisted_date", args=(2,))
    first.start(paused=True)
    first.shutdown()

    # What is stored is JSON text: a reference and the call's arguments, never a booster.
    with closing(sqlite3.connect(scheduler_dir / "jobs.sqlite3")) as conn, conn:
        stored = conn.execute("SELECT id, job_state FROM apscheduler_jobs").fetchall()
        column_types = {name: kind for _, name, kind, *_ in conn.execute("PRAGMA table_info(apscheduler_jobs)")}
    assert column_types["job_state"] == "TEXT"
    assert all(isinstance(text, str) for _, text in stored)
    states = {job_id: json.loads(text) for job_id, text in stored}
    assert set(states) == {"persisted_interval", "persisted_date"}
    state = states["persisted_interval"]
    assert state["codec"] == 1 and state["func"] == "funboost_like.scheduling.timing:publish_by_reference"
    assert state["args"] == [f"{__name__}:persisted_func", [], {"n": 1}] and state["kwargs"] == {}
    assert state["trigger"]["type"] == "interval" and state["trigger"]["seconds"] == 1.0
    assert datetime.datetime.fromisoformat(state["next_run_time"]).tzinfo is not None
    assert datetime.datetime.fromisoformat(states["persisted_date"]["trigger"]["run_date"]) == later.astimezone()

    second = new_scheduler(schedulers)  # adds nothing: the jobs come from the file
    second.start()
    assert {job.id for job in second.get_jobs()} == {"persisted_interval", "persisted_date"}
    assert isinstance(second._jobstores["default"], SQLiteJobStore)
    assert isinstance(second._executors["default"], TimingJobExecutor)
    assert wait_for(lambda: persisted_func.get_message_count() >= 1, 5)
    second.remove_job("persisted_interval")
    second.shutdown()
    third = new_scheduler(schedulers)
    third.start(paused=True)
    assert [job.id for job in third.get_jobs()] == ["persisted_date"]
    assert third.get_job("persisted_date").next_run_time.timestamp() == pytest.approx(later.timestamp(), abs=1e-3)


@pytest.mark.timeout(40)
def test_two_scheduler_processes_on_one_store_publish_each_fire_time_once(
        isolated_settings: Path, tmp_path: Path, scheduler_dir: Path) -> None:
    queue, interval = f"test_timing_{uuid.uuid4().hex[:8]}", 0.5
    env = subprocess_env(isolated_settings, FUNBOOST_LIKE_SCHEDULER_JOB_STORE="sqlite",
                         FUNBOOST_LIKE_SCHEDULER_SQLITE_DIR=str(scheduler_dir))
    logs = [open(tmp_path / f"scheduler-{i}.log", "wb") for i in range(2)]
    procs = []
    try:
        procs.append(subprocess.Popen([sys.executable, str(SCHEDULER_SCRIPT), queue, "4.5", "--add-job", "shared",
                                       "--interval", str(interval)], env=env, stdout=subprocess.PIPE,
                                      stderr=logs[0], cwd=tmp_path))
        assert procs[0].stdout is not None and procs[0].stdout.readline().startswith(b"started")
        procs.append(subprocess.Popen([sys.executable, str(SCHEDULER_SCRIPT), queue, "3.5"], env=env,
                                      stdout=subprocess.PIPE, stderr=logs[1], cwd=tmp_path))
        codes = [proc.wait(30) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        for log in logs:
            log.close()
    output = "\n".join((tmp_path / f"scheduler-{i}.log").read_text()[-3000:] for i in range(2))
    assert codes == [0, 0], output
    assert "Traceback" not in output, output

    with closing(sqlite3.connect(scheduler_dir / "fire_locks.sqlite3")) as conn, conn:
        claims = conn.execute("SELECT fire_time, owner FROM fire_locks WHERE job_id = ? ORDER BY fire_time",
                              (f"shared@{queue}",)).fetchall()

    @task_deco(queue, broker_kind=BrokerEnum.PERSISTQUEUE)
    def record(n: int) -> None:
        return None

    published = record.get_message_count()
    fire_times = [datetime.datetime.strptime(t, "%Y-%m-%dT%H:%M:%S.%fZ") for t, _ in claims]
    gaps = {round((b - a).total_seconds(), 3) for a, b in zip(fire_times, fire_times[1:], strict=False)}
    print(f"\ntwo schedulers: {published} messages for {len(claims)} fire times; "
          f"claims per process: {sorted(collections.Counter(owner for _, owner in claims).values())}")
    assert len(claims) >= 5, output
    assert published == len(claims), f"{published} messages for {len(claims)} fire times\n{output}"
    # Each fire time is one of the job's (a whole number of intervals after the previous one), and
    # ones a loaded machine missed by more than the misfire grace time are the only gaps.
    assert all(gap >= interval and abs(gap / interval - round(gap / interval)) < 0.01 for gap in gaps), gaps


# -- fire-time locks ----------------------------------------------------------------------------------


def test_sqlite_fire_time_lock_hands_each_fire_time_out_once(tmp_path: Path) -> None:
    first = SqliteFireTimeLock(tmp_path / "locks.sqlite3")
    second = SqliteFireTimeLock(tmp_path / "locks.sqlite3")
    when = datetime.datetime(2030, 1, 1, 8, 0, tzinfo=datetime.timezone.utc)
    try:
        assert first.claim("job", when)
        assert not second.claim("job", when)
        assert not first.claim("job", when.astimezone(datetime.timezone(datetime.timedelta(hours=8))))
        assert second.claim("job", when + datetime.timedelta(microseconds=1))
        assert second.claim("other job", when)
        with pytest.raises(ValueError):
            first.claim("job", datetime.datetime(2030, 1, 1))
    finally:
        first.close()
        second.close()


def test_redis_fire_time_lock_hands_each_fire_time_out_once() -> None:
    require_server("Redis", "127.0.0.1", 6379)
    prefix = f"funboost_like_test:{uuid.uuid4().hex}:"
    first = RedisFireTimeLock(REDIS_TEST_URL, retention_seconds=60, prefix=prefix)
    second = RedisFireTimeLock(REDIS_TEST_URL, retention_seconds=60, prefix=prefix)
    when = datetime.datetime(2030, 1, 1, 8, 0, tzinfo=datetime.timezone.utc)
    try:
        assert first.claim("job", when)
        assert not second.claim("job", when)
        assert second.claim("job", when + datetime.timedelta(seconds=1))
        ttl = first._redis().ttl(f"{prefix}job:2030-01-01T08:00:00.000000Z")
        assert 0 < ttl <= 60
    finally:
        first._redis().delete(*first._redis().keys(f"{prefix}*"))
        first.close()
        second.close()


@pytest.mark.timeout(30)
def test_redis_job_store_and_lock_from_the_settings(schedulers: list[FsdfBackgroundScheduler]) -> None:
    require_server("Redis", "127.0.0.1", 6379)
    patch_frame_config(SCHEDULER_JOB_STORE="redis", REDIS_URL=REDIS_TEST_URL)
    persisted_func.clear()
    job_id = f"redis_job_{uuid.uuid4().hex[:8]}"
    scheduler = new_scheduler(schedulers)
    scheduler.add_timing_publish_job(persisted_func, "interval", seconds=0.3, id=job_id, kwargs={"n": 3})
    scheduler.start()
    try:
        executor = scheduler._executors["default"]
        assert isinstance(executor, TimingJobExecutor) and isinstance(executor.fire_lock, RedisFireTimeLock)
        store = scheduler._jobstores["default"]
        assert isinstance(store, RedisJobStore) and store.jobs_key == "fl:scheduler:jobs"
        state = json.loads(store._redis().hget("fl:scheduler:jobs", job_id))
        assert state["codec"] == 1 and state["args"] == [f"{__name__}:persisted_func", [], {"n": 3}]
        assert wait_for(lambda: persisted_func.get_message_count() >= 2, 5)
    finally:
        scheduler.remove_job(job_id)
        scheduler.shutdown()
        client = RedisFireTimeLock(REDIS_TEST_URL)._redis()
        keys = client.keys(f"funboost_like:fire_lock:{job_id}@*")
        if keys:
            client.delete(*keys)
        client.close()


def test_a_scheduler_given_a_redis_job_store_claims_fire_times_in_that_redis(
        schedulers: list[FsdfBackgroundScheduler]) -> None:
    """The "auto" lock followed the SCHEDULER_JOB_STORE setting, not the store given to the constructor: a
    hand-built scheduler on a shared Redis store got a SQLite lock per host, so every host published every
    fire time."""
    require_server("Redis", "127.0.0.1", 6379)
    store = RedisJobStore(REDIS_TEST_URL, jobs_key=f"test_{uuid.uuid4().hex[:8]}")
    scheduler = new_scheduler(schedulers, jobstores={"default": store})
    scheduler.start(paused=True)
    try:
        lock = scheduler._executors["default"].fire_lock
        assert isinstance(lock, RedisFireTimeLock) and lock.url == REDIS_TEST_URL
    finally:
        scheduler.shutdown()
        store._redis().delete(store.jobs_key, store.run_times_key)


@pytest.mark.timeout(30)
def test_unrelated_jobs_that_share_an_id_each_publish_while_copies_of_one_job_publish_once(
        schedulers: list[FsdfBackgroundScheduler]) -> None:
    """The fire-time lock's key was (job id, fire time): two projects on one host that both named a job
    'daily_report' took each other's fire times, and each queue lost publishes in silence."""
    persisted_func.clear()
    other_persisted_func.clear()
    at = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=1)
    for func in (persisted_func, other_persisted_func, persisted_func):  # the third: a copy of the first
        scheduler = new_scheduler(schedulers)  # memory stores, one SQLite fire-time lock on this host
        scheduler.add_timing_publish_job(func, "date", run_date=at, kwargs={"n": 1}, id="daily_report")
        scheduler.start()
    assert wait_for(lambda: persisted_func.get_message_count() and other_persisted_func.get_message_count(), 10)
    time.sleep(0.5)  # the copy's fire time has passed too
    assert (persisted_func.get_message_count(), other_persisted_func.get_message_count()) == (1, 1)


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_modify_job_takes_the_calls_arguments(schedulers: list[FsdfBackgroundScheduler], store: str) -> None:
    """``modify_job(args=...)`` of a timing publish job replaced the stored (reference, args, kwargs) with the
    call's arguments: every later fire failed (memory store) or raised about internals (SQLite store)."""
    from funboost_like.brokers.registry import get_broker
    from funboost_like.core.errors import PublishError

    patch_frame_config(SCHEDULER_JOB_STORE=store)
    persisted_func.clear()
    scheduler = new_scheduler(schedulers)
    scheduler.add_timing_publish_job(persisted_func, "interval", seconds=0.2, kwargs={"n": 1}, id="modified")
    scheduler.start()
    scheduler.modify_job("modified", args=(5,), kwargs={})
    with pytest.raises(PublishError):
        scheduler.modify_job("modified", kwargs={"nope": 1})  # a call that does not fit fails now
    scheduler.get_job("modified").modify(args=(), kwargs={"n": 7})
    published: list[dict[str, Any]] = []
    broker = get_broker(BrokerEnum.PERSISTQUEUE)

    def read() -> bool:
        got = broker.fetch(persisted_func.queue_name, 10, 0.1)
        broker.ack(got)
        published.extend({k: v for k, v in json.loads(d.body).items() if k != "extra"} for d in got)
        return {"n": 7} in published

    assert wait_for(read, 10), published
    assert all(call in ({"n": 1}, {"n": 5}, {"n": 7}) for call in published), published


def test_an_unknown_timezone_fails_with_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from funboost_like.scheduling import timing

    monkeypatch.setattr(timing, "_default_scheduler", None)
    patch_frame_config(TIMEZONE="Asia/Shangai")
    with pytest.raises(ConfigurationError, match="Asia/Shangai"):
        timing.get_fsdf_background_scheduler()


# -- JSON job state (job_codec.py) ----------------------------------------------------------------------

PARIS = ZoneInfo("Europe/Paris")
MINUS_0330 = datetime.timezone(datetime.timedelta(hours=-3, minutes=-30))
CODEC_NOW = datetime.datetime(2030, 3, 30, 12, 0, tzinfo=PARIS)  # summer time starts the next night
CODEC_TRIGGERS = {
    "date": lambda: DateTrigger(run_date=CODEC_NOW + datetime.timedelta(hours=5, microseconds=123456)),
    "interval": lambda: IntervalTrigger(hours=7, seconds=0.25, start_date=CODEC_NOW,
                                        end_date=CODEC_NOW + datetime.timedelta(days=20), timezone=PARIS),
    "interval_fixed_offset": lambda: IntervalTrigger(minutes=90, timezone=MINUS_0330,
                                                     start_date=CODEC_NOW.astimezone(MINUS_0330)),
    "cron": lambda: CronTrigger(day_of_week="mon-fri", hour="2-3", minute="*/20", second=5, timezone=PARIS,
                                end_date=CODEC_NOW + datetime.timedelta(days=60)),
    "cron_expressions": lambda: CronTrigger(month="jan-mar,nov", day="1st mon,last", hour=2, timezone="UTC"),
    "crontab": lambda: CronTrigger.from_crontab("30 2 * * sun", timezone="America/New_York"),
}


def codec_job(trigger: Any, **options: Any) -> Job:
    values: dict[str, Any] = dict(
        func=PUBLISH_BY_REFERENCE, args=(f"{__name__}:persisted_func", (), {"n": 1}), kwargs={}, id="codec_job",
        name="publish to test_timing_persisted_queue", trigger=trigger, executor="default",
        misfire_grace_time=30, coalesce=False, max_instances=2,
        next_run_time=trigger.get_next_fire_time(None, CODEC_NOW))
    values.update(options)
    return Job(FsdfBackgroundScheduler(timezone=PARIS), **values)


def fire_times(trigger: Any, count: int = 40) -> list[datetime.datetime]:
    times: list[datetime.datetime] = []
    previous, now = None, CODEC_NOW
    while len(times) < count:
        fire = trigger.get_next_fire_time(previous, now)
        if fire is None:
            break
        times.append(fire)
        previous = now = fire
    return times


@pytest.mark.parametrize("kind", sorted(CODEC_TRIGGERS))
def test_each_trigger_kind_round_trips_through_json(kind: str) -> None:
    job = codec_job(CODEC_TRIGGERS[kind]())
    text = encode_job(job)
    state = json.loads(text)
    assert state["codec"] == 1 and state["trigger"]["type"] == kind.partition("_")[0].replace("crontab", "cron")
    assert state["func"] == PUBLISH_BY_REFERENCE and state["args"] == [f"{__name__}:persisted_func", [], {"n": 1}]
    assert datetime.datetime.fromisoformat(state["next_run_time"]) == job.next_run_time

    restored = decode_job(text, "codec_job")
    assert fire_times(restored.trigger) == fire_times(job.trigger) and len(fire_times(job.trigger)) >= 1
    assert str(restored.trigger) == str(job.trigger) and repr(restored.trigger) == repr(job.trigger)
    original, again = job.__getstate__(), restored.__getstate__()
    original.pop("trigger"), again.pop("trigger")
    assert again == original  # id, func, args (the inner tuple too), kwargs, options, next run time
    assert restored.func is publish_by_reference
    assert encode_job(restored) == text


def test_the_json_state_names_time_zones_and_cron_fields() -> None:
    state = json.loads(encode_job(codec_job(CODEC_TRIGGERS["cron"]())))
    trigger = state["trigger"]
    assert trigger["timezone"] == "Europe/Paris" and trigger["start_date"] is None
    assert trigger["end_date"] == "2030-05-29T12:00:00+02:00"
    assert trigger["fields"] == {"year": "*", "month": "*", "day": "*", "week": "*", "day_of_week": "mon-fri",
                                 "hour": "2-3", "minute": "*/20", "second": "5"}
    assert state["misfire_grace_time"] == 30 and state["max_instances"] == 2 and state["coalesce"] is False
    offset = json.loads(encode_job(codec_job(CODEC_TRIGGERS["interval_fixed_offset"]())))["trigger"]
    assert offset["timezone"] == "-03:30" and offset["seconds"] == 5400.0


def not_a_publish_function() -> None:
    return None


class UnnamedZone(datetime.tzinfo):
    def utcoffset(self, dt: datetime.datetime | None) -> datetime.timedelta:
        return datetime.timedelta(hours=1)

    def dst(self, dt: datetime.datetime | None) -> datetime.timedelta:
        return datetime.timedelta(0)

    def tzname(self, dt: datetime.datetime | None) -> str:
        return "somewhere"


@pytest.mark.parametrize(("options", "reason"), [
    ({"func": f"{__name__}:not_a_publish_function", "args": ()}, "not a timing publish job"),
    ({"func": "os:system", "args": ("echo hi",)}, "not a timing publish job"),
    ({"trigger": OrTrigger([IntervalTrigger(seconds=5), IntervalTrigger(seconds=7)])}, "built-in triggers"),
    ({"args": (f"{__name__}:persisted_func", (), {"n": datetime.date(2030, 1, 1)})}, "not JSON"),
    ({"args": (f"{__name__}:persisted_func", (), {"n": {1: 2}})}, "keys are text"),
    ({"args": (f"{__name__}:persisted_func", (float("nan"),), {})}, "JSON cannot hold"),
    ({"trigger": IntervalTrigger(seconds=5, timezone=UnnamedZone())}, "no IANA name"),
])
def test_a_job_json_cannot_hold_is_refused_with_a_configuration_error(options: dict[str, Any], reason: str) -> None:
    with pytest.raises(ConfigurationError, match=reason):
        encode_job(codec_job(options.pop("trigger", CODEC_TRIGGERS["interval"]()), **options))


def test_a_job_that_cannot_be_stored_is_refused_when_it_is_added(schedulers: list[FsdfBackgroundScheduler],
                                                                  scheduler_dir: Path) -> None:
    patch_frame_config(SCHEDULER_JOB_STORE="sqlite")
    stopped = new_scheduler(schedulers)
    with pytest.raises(ConfigurationError, match="not a timing publish job"):
        stopped.add_job(not_a_publish_function, "interval", seconds=1, id="plain")
    with pytest.raises(ConfigurationError, match="not JSON"):
        stopped.add_timing_publish_job(persisted_func, "interval", seconds=1, id="set", args=({1, 2},))
    assert stopped._pending_jobs == []  # nothing left to fail at start()
    stopped.add_job(not_a_publish_function, "interval", seconds=1, id="in_memory", jobstore="memory")
    stopped.add_jobstore("memory", "memory")

    stopped.start(paused=True)  # now running: the store itself refuses
    with pytest.raises(ConfigurationError, match="built-in triggers"):
        stopped.add_timing_publish_job(persisted_func, OrTrigger([IntervalTrigger(seconds=5)]), id="or",
                                       args=(1,))
    assert [job.id for job in stopped.get_jobs()] == ["in_memory"]


GOOD_JOB_ID = "good"


def tampered_rows(good_state: dict[str, Any], marker: Path) -> dict[str, str | bytes]:
    """Job rows a scheduler must skip: each a different way of not being a job this codec wrote."""
    return {
        "garbage": "{this is not json",
        "binary": b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x02id\x94\x8c\x01x\x94s.",
        "other_function": json.dumps(dict(good_state, id="other_function", func="os:system",
                                          args=[f"echo executed > {marker}"])),
        "bad_trigger": json.dumps(dict(good_state, id="bad_trigger", trigger={"type": "calendarinterval"})),
        "wrong_id": json.dumps(dict(good_state, id="someone_else")),
        "old_codec": json.dumps(dict(good_state, id="old_codec", codec=0)),
        "too_deep": json.dumps(dict(good_state, id="too_deep", args=[])).replace("[]", "[" * 50000 + "]" * 50000),
        "not_a_date": json.dumps(dict(good_state, id="not_a_date", next_run_time="tomorrow")),
    }


@pytest.mark.parametrize(("row", "message"), [
    ("garbage", "not valid JSON"), ("binary", "binary format, which is never loaded"),
    ("other_function", "'os:system' is not one a stored job may call"), ("bad_trigger", "calendarinterval"),
    ("wrong_id", "stored as job 'wrong_id'"), ("old_codec", "codec version 0"), ("too_deep", "not valid JSON"),
    ("not_a_date", "'tomorrow' is not an ISO 8601"),
])
def test_a_tampered_job_state_raises_a_clear_error(row: str, message: str, tmp_path: Path) -> None:
    good = json.loads(encode_job(codec_job(CODEC_TRIGGERS["interval"](), id=GOOD_JOB_ID)))
    with pytest.raises(JobStateError, match=message):
        decode_job(tampered_rows(good, tmp_path / "marker")[row], row)


@pytest.mark.timeout(30)
def test_a_stored_job_that_does_not_decode_is_logged_and_skipped(
        schedulers: list[FsdfBackgroundScheduler], scheduler_dir: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    patch_frame_config(SCHEDULER_JOB_STORE="sqlite")
    persisted_func.clear()
    first = new_scheduler(schedulers)
    first.add_timing_publish_job(persisted_func, "interval", seconds=0.3, id=GOOD_JOB_ID, kwargs={"n": 1})
    first.start(paused=True)
    first.shutdown()
    marker = tmp_path / "marker"
    path = scheduler_dir / "jobs.sqlite3"
    with closing(sqlite3.connect(path)) as conn, conn:
        good_state = json.loads(conn.execute("SELECT job_state FROM apscheduler_jobs").fetchone()[0])
        rows = tampered_rows(good_state, marker)
        conn.executemany("INSERT INTO apscheduler_jobs (id, next_run_time, job_state) VALUES (?, ?, ?)",
                         [(job_id, time.time() - 1, state) for job_id, state in rows.items()])

    with caplog.at_level(logging.DEBUG, logger="funboost_like.scheduling"):
        second = new_scheduler(schedulers)
        second.start()
        assert wait_for(lambda: persisted_func.get_message_count() >= 2, 10)  # the good job keeps running
        assert second.running and second._thread is not None and second._thread.is_alive()
        assert [job.id for job in second.get_jobs()] == [GOOD_JOB_ID]
        assert second.get_job("garbage") is None
    assert not marker.exists()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    for job_id in rows:
        assert sum(f"job {job_id!r} in " in message for message in errors) == 1, errors  # logged once
    # parked: the scheduler does not wake up for them again and again
    with closing(sqlite3.connect(path)) as conn, conn:
        parked = dict(conn.execute("SELECT id, next_run_time FROM apscheduler_jobs WHERE id != ?", (GOOD_JOB_ID,)))
    assert parked == dict.fromkeys(rows)

    # Adding the job again repairs it; removing works on an unreadable one too.
    second.add_timing_publish_job(persisted_func, "interval", seconds=60, id="garbage", args=(2,),
                                  replace_existing=True)
    assert second.get_job("garbage") is not None
    second.remove_job("binary")
    with closing(sqlite3.connect(path)) as conn:
        assert "binary" not in {job_id for job_id, in conn.execute("SELECT id FROM apscheduler_jobs")}


def test_bad_job_store_values_are_refused_without_passwords() -> None:
    with pytest.raises(ConfigurationError, match="is not one of 'memory', 'sqlite', 'redis' or a SQLAlchemy URL"):
        make_job_store("mongodb")
    with pytest.raises(ConfigurationError, match="no SQLAlchemy dialect 'nosuchdb'") as caught:
        make_job_store("nosuchdb://user:secret@db/jobs")
    assert "secret" not in str(caught.value)
    pytest.importorskip("sqlalchemy")
    store = make_job_store("postgresql+psycopg://user:secret@db/jobs")  # no connection until it is used
    assert isinstance(store, SQLAlchemyJobStore) and "secret" not in repr(store)


def test_importing_funboost_like_does_not_import_sqlalchemy(tmp_path: Path) -> None:
    code = "import sys, funboost_like\nassert 'sqlalchemy' not in sys.modules\n"
    result = subprocess.run([sys.executable, "-c", code], env=subprocess_env(tmp_path / "q"), capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr


SQL_SERVERS = {
    "postgresql": ("PostgreSQL", 5432, "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
    "mariadb": ("MariaDB", 3306, "mysql+pymysql://root@127.0.0.1:3306/test"),
}


@pytest.fixture(params=sorted(SQL_SERVERS))
def sql_store_factory(request: pytest.FixtureRequest) -> Iterator[Any]:
    """Makes SQLAlchemyJobStore objects on one server and one table of their own, dropped at teardown."""
    pytest.importorskip("sqlalchemy")
    name, port, url = SQL_SERVERS[request.param]
    require_server(name, "127.0.0.1", port)
    table = f"test_jobs_{uuid.uuid4().hex[:10]}"
    made: list[SQLAlchemyJobStore] = []

    def make() -> SQLAlchemyJobStore:
        store = SQLAlchemyJobStore(url, tablename=table)
        made.append(store)
        return store

    yield make
    for store in made:
        store.shutdown()
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        sa.Table(table, sa.MetaData()).drop(engine, checkfirst=True)
    finally:
        engine.dispose()


def _sql_rows(store: SQLAlchemyJobStore, sql: str, **params: object) -> list[Any]:
    import sqlalchemy as sa

    with store._ready().begin() as conn:
        result = conn.execute(sa.text(sql.format(table=store.tablename)), params)
        return list(result.all()) if result.returns_rows else []


@pytest.mark.timeout(60)
def test_sql_job_store_adds_gets_updates_and_removes_jobs(schedulers: list[FsdfBackgroundScheduler],
                                                          sql_store_factory: Any,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    store = sql_store_factory()
    scheduler = new_scheduler(schedulers, fire_lock="none")
    scheduler.add_jobstore(store, "default")
    scheduler.start(paused=True)
    scheduler.add_timing_publish_job(persisted_func, "cron", hour=3, minute=30, id="cron", args=(1,))
    scheduler.add_timing_publish_job(persisted_func, "interval", seconds=5, id="interval", args=(2,))
    scheduler.add_timing_publish_job(persisted_func, "date", run_date=CODEC_NOW, id="date", args=(3,))
    scheduler.add_timing_publish_job(persisted_func, "interval", seconds=5, id="Interval", args=(4,))
    scheduler.pause_job("interval")
    with pytest.raises(ConflictingIdError):
        store.add_job(scheduler.get_job("cron"))

    rows = {job_id: (next_run, state) for job_id, next_run, state in
            _sql_rows(store, "SELECT id, next_run_time, job_state FROM {table}")}
    assert set(rows) == {"cron", "interval", "date", "Interval"}  # ids differing only in case stay apart
    assert rows["interval"][0] is None  # paused
    assert json.loads(rows["cron"][1])["trigger"]["fields"]["hour"] == "3"
    date_job = store.lookup_job("date")
    assert date_job is not None and date_job.next_run_time == CODEC_NOW
    assert abs(rows["date"][0] - CODEC_NOW.timestamp()) < 1e-3  # a double, not a single precision float
    assert [job.id for job in store.get_all_jobs()][-1] == "interval"  # paused last
    soonest = store.lookup_job("Interval").next_run_time  # type: ignore[union-attr]
    assert store.get_next_run_time() == soonest
    assert store.get_due_jobs(soonest - datetime.timedelta(seconds=1)) == []
    assert [job.id for job in store.get_due_jobs(soonest)] == ["Interval"]
    assert [job.id for job in store.get_due_jobs(CODEC_NOW)] == ["Interval", "cron", "date"]  # paused: never due
    scheduler.modify_job("date", name="renamed")
    assert store.lookup_job("date").name == "renamed"  # type: ignore[union-attr]
    scheduler.resume_job("interval")
    assert store.lookup_job("interval").next_run_time is not None  # type: ignore[union-attr]
    with pytest.raises(JobLookupError):
        missing = store.lookup_job("cron")
        assert missing is not None
        missing.id = "missing"
        store.update_job(missing)
    with pytest.raises(JobLookupError):
        store.remove_job("missing")
    store.remove_job("Interval")
    assert store.lookup_job("Interval") is None and store.lookup_job("missing") is None

    # A row that does not decode is logged once, skipped and parked; never loaded by other means.
    _sql_rows(store, "INSERT INTO {table} (id, next_run_time, job_state) VALUES ('tampered', 1.0, '{{}}')")
    caplog.set_level(logging.DEBUG, "funboost_like.scheduling")
    assert "tampered" not in {job.id for job in store.get_due_jobs(CODEC_NOW)}
    assert store.lookup_job("tampered") is None
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert sum("job 'tampered' in " in message for message in errors) == 1, errors
    assert _sql_rows(store, "SELECT next_run_time FROM {table} WHERE id = 'tampered'") == [(None,)]
    store.remove_job("tampered")
    store.remove_all_jobs()
    assert store.get_all_jobs() == [] and store.get_next_run_time() is None


@pytest.mark.timeout(60)
def test_sql_job_store_survives_a_restart(schedulers: list[FsdfBackgroundScheduler], sql_store_factory: Any) -> None:
    first = new_scheduler(schedulers, fire_lock="none")
    first.add_jobstore(sql_store_factory(), "default")
    first.start(paused=True)
    first.add_timing_publish_job(persisted_func, "cron", hour=3, minute=30, id="cron", args=(1,))
    first.add_timing_publish_job(persisted_func, "date", run_date=CODEC_NOW, id="date", kwargs={"n": 2})
    before = {job.id: (job.next_run_time, str(job.trigger), job.args) for job in first.get_jobs()}
    first.shutdown()

    again = sql_store_factory()  # a new store object on the same table
    later = new_scheduler(schedulers, fire_lock="none")
    later.add_jobstore(again, "default")
    later.start(paused=True)
    assert {job.id: (job.next_run_time, str(job.trigger), job.args) for job in later.get_jobs()} == before


@pytest.mark.timeout(60)
def test_a_scheduler_with_a_sql_job_store_publishes_to_a_memory_queue(
        schedulers: list[FsdfBackgroundScheduler], sql_store_factory: Any) -> None:
    consume_func.clear()
    store = sql_store_factory()
    scheduler = new_scheduler(schedulers, fire_lock="none")
    scheduler.add_jobstore(store, "default")
    scheduler.add_timing_publish_job(consume_func, "interval", seconds=0.5, id="sql_interval", args=(11, 12))
    scheduler.start()
    assert wait_for(lambda: consume_func.get_message_count() >= 2, 15)  # published to the memory queue
    scheduler.shutdown()
    state = json.loads(_sql_rows(store, "SELECT job_state FROM {table}")[0][0])
    assert state["args"][0] == f"{__name__}:consume_func"


@pytest.mark.timeout(30)
def test_redis_job_store_keeps_json_and_survives_a_restart(schedulers: list[FsdfBackgroundScheduler]) -> None:
    require_server("Redis", "127.0.0.1", 6379)
    jobs_key = f"test_{uuid.uuid4().hex[:8]}"
    store = RedisJobStore(REDIS_TEST_URL, jobs_key=jobs_key)
    client = store._redis()
    try:
        scheduler = new_scheduler(schedulers, fire_lock="none")
        scheduler.add_jobstore(store, "default")
        scheduler.start(paused=True)
        scheduler.add_timing_publish_job(persisted_func, "cron", hour=3, minute=30, id="cron", args=(1,))
        scheduler.add_timing_publish_job(persisted_func, "interval", seconds=5, id="interval", args=(2,))
        scheduler.add_timing_publish_job(persisted_func, "date", run_date=CODEC_NOW, id="date", args=(3,))
        scheduler.pause_job("interval")
        with pytest.raises(ConflictingIdError):
            store.add_job(scheduler.get_job("cron"))
        hash_key, zset_key = f"fl:scheduler:{jobs_key}", f"fl:scheduler:{jobs_key}:run_times"
        assert {k.decode() for k in client.hkeys(hash_key)} == {"cron", "interval", "date"}
        assert {m.decode() for m in client.zrange(zset_key, 0, -1)} == {"cron", "date"}  # paused: no run time
        assert json.loads(client.hget(hash_key, "cron"))["trigger"]["fields"]["hour"] == "3"
        before = {job.id: (job.next_run_time, str(job.trigger)) for job in scheduler.get_jobs()}
        assert [job.id for job in scheduler.get_jobs()] == ["cron", "date", "interval"]  # paused last
        scheduler.shutdown()

        # A tampered entry is skipped, and its run time removed so that it is not due forever.
        client.hset(hash_key, "tampered", "{}")
        client.zadd(zset_key, {"tampered": 1.0, "dangling": 2.0})
        again = RedisJobStore(REDIS_TEST_URL, jobs_key=jobs_key)
        later = new_scheduler(schedulers, fire_lock="none")
        later.add_jobstore(again, "default")
        later.start(paused=True)
        assert {job.id: (job.next_run_time, str(job.trigger)) for job in later.get_jobs()} == before
        assert again.get_due_jobs(datetime.datetime.now(datetime.timezone.utc)) == []
        assert {m.decode() for m in client.zrange(zset_key, 0, -1)} == {"cron", "date"}
        with pytest.raises(JobLookupError):
            again.remove_job("missing")
        again.remove_job("tampered")
        later.remove_all_jobs()
        assert not client.exists(hash_key) and not client.exists(zset_key)
    finally:
        client.delete(f"fl:scheduler:{jobs_key}", f"fl:scheduler:{jobs_key}:run_times")
        store.shutdown()


def test_the_scheduling_package_never_unpickles() -> None:
    for path in (REPO / "funboost_like" / "scheduling").glob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "pickle.load" not in text, path
