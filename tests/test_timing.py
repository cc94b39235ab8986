"""Timing jobs: fsdf_background_scheduler, timing_publish_deco, persistent job stores, fire-time locks."""

from __future__ import annotations

import collections
import datetime
import pickle
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("apscheduler")

from funboost_like import BrokerEnum, patch_frame_config, task_deco  # noqa: E402
from funboost_like.scheduling.fire_lock import RedisFireTimeLock, SqliteFireTimeLock  # noqa: E402
from funboost_like.scheduling.jobstores import SQLiteJobStore  # noqa: E402
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
    with pytest.raises(ValueError, match="top level"):
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

    # What is stored is a reference and the call's arguments, never a booster.
    with sqlite3.connect(scheduler_dir / "jobs.sqlite3") as conn:
        stored = conn.execute("SELECT id, job_state FROM apscheduler_jobs").fetchall()
    states = {job_id: pickle.loads(blob) for job_id, blob in stored}
    assert set(states) == {"persisted_interval", "persisted_date"}
    state = states["persisted_interval"]
    assert state["func"] == "funboost_like.scheduling.timing:publish_by_reference"
    assert state["args"] == (f"{__name__}:persisted_func", (), {"n": 1}) and state["kwargs"] == {}

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

    with sqlite3.connect(scheduler_dir / "fire_locks.sqlite3") as conn:
        claims = conn.execute("SELECT fire_time, owner FROM fire_locks WHERE job_id = 'shared'"
                              " ORDER BY fire_time").fetchall()

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
        assert type(scheduler._jobstores["default"]).__name__ == "RedisJobStore"
        assert wait_for(lambda: persisted_func.get_message_count() >= 2, 5)
    finally:
        scheduler.remove_job(job_id)
        scheduler.shutdown()
        client = RedisFireTimeLock(REDIS_TEST_URL)._redis()
        keys = client.keys(f"funboost_like:fire_lock:{job_id}:*")
        if keys:
            client.delete(*keys)
        client.close()
