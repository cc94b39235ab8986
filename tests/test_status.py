"""Status and result persistence (``function_result_status_persistance_conf``) and the consumer's stats."""

from __future__ import annotations

import itertools
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from funboost_like import (
    BrokerEnum,
    ExceptionForRequeue,
    FunctionResultStatusPersistanceConfig,
    patch_frame_config,
    task_deco,
)
from funboost_like.brokers.memory import MemoryBroker
from funboost_like.brokers.registry import get_broker
from funboost_like.core import status_store
from funboost_like.core.status_store import (
    CALLBACKED,
    FAILED,
    FINISHED,
    NOT_STARTED,
    REQUEUED,
    RUNNING,
    SKIPPED,
    StatusEvent,
    StatusRecord,
    StatusStore,
    close_all_status_stores,
    merge_events,
    open_status_store,
)
from funboost_like.middleware.status import record_callbacked
from tests.conftest import subprocess_env

MEMORY = BrokerEnum.LOCAL_PYTHON_QUEUE
STATUS_ONLY = FunctionResultStatusPersistanceConfig(is_save_status=True, is_save_result=False)
WITH_RESULT = FunctionResultStatusPersistanceConfig(is_save_status=True, is_save_result=True)


@pytest.fixture(autouse=True)
def status_dir(isolated_settings: Path, tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "status"
    patch_frame_config(STATUS_DB_PATH=str(folder))
    yield folder
    close_all_status_stores()


def memory() -> MemoryBroker:
    broker = get_broker(MEMORY)
    assert isinstance(broker, MemoryBroker)
    return broker


def wait_for(condition: Callable[[], bool], timeout: float, what: str | Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what if isinstance(what, str) else what()}")
        time.sleep(0.01)


def status_of(store: StatusStore, task_id: str) -> str | None:
    record = store.get(task_id)
    return record.status if record is not None else None


# -- the lifecycle on the memory broker ----------------------------------------------------------

def test_lifecycle_not_started_running_finished(queue_name: str, status_dir: Path) -> None:
    release = threading.Event()

    @task_deco(queue_name, broker_kind=MEMORY, function_result_status_persistance_conf=WITH_RESULT)
    def add(a: int, b: int) -> dict[str, int]:
        release.wait(10)
        return {"sum": a + b}

    before = time.time()
    task_id = add.push(1, b=2).task_id
    store = open_status_store(queue_name)
    record = store.get(task_id)
    assert record is not None and record.status == NOT_STARTED
    assert record.kwargs == {"a": 1, "b": 2} and record.queue == queue_name
    assert record.publish_time is not None and before <= record.publish_time <= time.time()
    assert record.started_at is None and record.host is None

    add.consume()
    wait_for(lambda: status_of(store, task_id) == RUNNING, 5, "the running record")
    running = store.get(task_id)
    assert running is not None
    assert running.host == socket.gethostname() and running.pid == os.getpid() and running.script == sys.argv[0]
    assert running.started_at is not None and running.started_at >= running.publish_time  # type: ignore[operator]
    assert running.deliveries == 1 and running.finished_at is None and not running.result_saved

    release.set()
    memory().join(queue_name, timeout=5)
    wait_for(lambda: status_of(store, task_id) == FINISHED, 5, "the finished record")
    done = store.get(task_id)
    assert done is not None
    assert done.result == {"sum": 3} and done.result_saved and done.exception is None
    assert done.attempts == 1 and done.kwargs == {"a": 1, "b": 2}
    assert done.duration is not None and 0 < done.duration < 10
    assert done.finished_at == pytest.approx(done.started_at + done.duration)  # type: ignore[operator]
    assert done.expires_at == pytest.approx(done.finished_at + WITH_RESULT.expire_seconds)  # type: ignore[operator]
    assert (status_dir / f"{queue_name}.sqlite3").exists()
    assert store.counts_by_status()[FINISHED] == 1


def test_failed_records_the_exception_and_attempts(queue_name: str) -> None:
    @task_deco(queue_name, broker_kind=MEMORY, max_retry_times=2, is_print_detail_exception=False,
               function_result_status_persistance_conf=WITH_RESULT)
    def divide(a: int, b: int) -> float:
        return a / b

    task_id = divide.push(1, 0).task_id
    ok_id = divide.push(6, 3).task_id
    divide.consume()
    with pytest.raises(ZeroDivisionError):
        memory().join(queue_name, timeout=5)
    store = open_status_store(queue_name)
    wait_for(lambda: status_of(store, task_id) == FAILED and status_of(store, ok_id) == FINISHED, 5, "outcomes")
    failed = store.get(task_id)
    assert failed is not None
    assert failed.attempts == 3  # the first run and two retries
    assert failed.exception is not None and failed.exception.startswith("ZeroDivisionError: division by zero")
    assert "Traceback" in failed.exception and "return a / b" in failed.exception
    assert not failed.result_saved and failed.result is None
    ok = store.get(ok_id)
    assert ok is not None and ok.result == 2.0 and ok.attempts == 1


def test_result_is_not_stored_unless_asked(queue_name: str) -> None:
    @task_deco(queue_name, broker_kind=MEMORY, function_result_status_persistance_conf=STATUS_ONLY)
    def add(a: int, b: int) -> int:
        return a + b

    task_id = add.push(1, 2).task_id
    add.consume()
    memory().join(queue_name, timeout=5)
    store = open_status_store(queue_name)
    wait_for(lambda: status_of(store, task_id) == FINISHED, 5, "the finished record")
    record = store.get(task_id)
    assert record is not None and record.result is None and not record.result_saved
    assert record.kwargs == {"a": 1, "b": 2} and record.attempts == 1


def test_result_that_is_not_json_is_kept_as_its_repr(queue_name: str) -> None:
    class Point:
        def __repr__(self) -> str:
            return "Point(1, 2)"

    @task_deco(queue_name, broker_kind=MEMORY, function_result_status_persistance_conf=WITH_RESULT)
    def make(n: int) -> Point:
        return Point()

    task_id = make.push(1).task_id
    make.consume()
    memory().join(queue_name, timeout=5)
    store = open_status_store(queue_name)
    wait_for(lambda: status_of(store, task_id) == FINISHED, 5, "the finished record")
    record = store.get(task_id)
    assert record is not None and record.result == "Point(1, 2)" and record.result_saved


def test_nothing_is_recorded_when_status_persistence_is_off(queue_name: str, status_dir: Path) -> None:
    @task_deco(queue_name, broker_kind=MEMORY)
    def add(a: int, b: int) -> int:
        return a + b

    task_id = add.push(1, 2).task_id
    add.consume()
    memory().join(queue_name, timeout=5)
    record_callbacked(add.publisher, task_id)  # a no-op
    assert open_status_store(queue_name).get(task_id) is None
    assert not status_dir.exists()


def test_requeued_then_finished_and_skipped(queue_name: str) -> None:
    runs = itertools.count()

    @task_deco(queue_name, broker_kind=MEMORY, msg_expire_senconds=0.3,
               function_result_status_persistance_conf=WITH_RESULT)
    def flaky(n: int) -> int:
        if n == 1 and next(runs) == 0:
            raise ExceptionForRequeue("not yet")
        return n

    stale_id = flaky.push(0).task_id
    time.sleep(0.5)  # older than msg_expire_senconds when its turn comes
    requeued_id = flaky.push(1).task_id
    flaky.consume()
    memory().join(queue_name, timeout=5)
    store = open_status_store(queue_name)
    wait_for(lambda: status_of(store, requeued_id) == FINISHED and status_of(store, stale_id) == SKIPPED, 5,
             "final statuses")
    again = store.get(requeued_id)
    assert again is not None and again.deliveries == 2 and again.attempts == 1 and again.result == 1
    skipped = store.get(stale_id)
    assert skipped is not None and skipped.exception is not None and "expired" in skipped.exception
    assert skipped.started_at is None and skipped.attempts == 0


def test_requeued_record_while_waiting_to_run_again(queue_name: str) -> None:
    store = open_status_store(queue_name)
    now = time.time()
    run = StatusEvent("t", queue_name, RUNNING, now, started_at=now, host="h", pid=1)
    requeued = StatusEvent("t", queue_name, REQUEUED, now + 1, started_at=now, attempts=1, finished_at=now + 1,
                           duration=1.0)
    for event in (run, requeued):
        store.record(event)
        store.flush()
    record = store.get("t")
    assert record is not None and record.status == REQUEUED and record.duration == 1.0
    store.record(StatusEvent("t", queue_name, RUNNING, now + 2, started_at=now + 2, host="h2", pid=2))
    record = store.get("t")
    assert record is not None and record.status == RUNNING
    assert record.host == "h2" and record.finished_at is None and record.duration is None and record.attempts is None


# -- the store -----------------------------------------------------------------------------------

def test_query_filters_and_counts(queue_name: str) -> None:
    store = open_status_store(queue_name)
    base = 1_700_000_000.0
    statuses = [NOT_STARTED, RUNNING, FINISHED, FAILED, FINISHED, CALLBACKED, FINISHED]
    for i, status in enumerate(statuses):
        store.record(StatusEvent(f"task{i}", queue_name, status, base + i, kwargs=f'{{"i": {i}}}'))
    counts = store.counts_by_status()
    assert counts == {NOT_STARTED: 1, RUNNING: 1, REQUEUED: 0, FINISHED: 3, FAILED: 1, SKIPPED: 0, CALLBACKED: 1}
    assert [r.task_id for r in store.query(status=FINISHED)] == ["task6", "task4", "task2"]
    assert [r.task_id for r in store.query(status=FINISHED, newest_first=False, limit=2)] == ["task2", "task4"]
    assert [r.task_id for r in store.query(status=[FAILED, RUNNING])] == ["task3", "task1"]
    assert [r.task_id for r in store.query(since=base + 2, until=base + 5)] == ["task4", "task3", "task2"]
    assert len(store.query(limit=None)) == 7 and len(store.query()) == 7 and store.query(limit=0) == []
    assert store.query(status=FINISHED, since=base + 5) == [store.get("task6")]
    record = store.get("task3")
    assert isinstance(record, StatusRecord) and record.kwargs == {"i": 3} and record.as_dict()["status"] == FAILED
    assert store.get("missing") is None
    with pytest.raises(ValueError, match="unknown status"):
        store.query(status="done")
    assert store.clear() == 7 and store.counts_by_status()[FINISHED] == 0


def test_a_store_without_file_reads_empty(queue_name: str, status_dir: Path) -> None:
    store = open_status_store(queue_name)
    assert store.get("x") is None and store.query() == [] and store.delete_expired() == 0
    assert set(store.counts_by_status().values()) == {0}
    assert not status_dir.exists()  # reading creates nothing
    assert open_status_store(queue_name) is store


def test_expiry_deletes_old_rows(queue_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = FunctionResultStatusPersistanceConfig(is_save_status=True, expire_seconds=1)

    @task_deco(queue_name, broker_kind=MEMORY, function_result_status_persistance_conf=conf)
    def f(i: int) -> None:
        pass

    ids = [f.push(i).task_id for i in range(3)]
    store = open_status_store(queue_name)
    record = store.get(ids[0])
    assert record is not None and record.expires_at == pytest.approx(record.publish_time + 1)  # type: ignore[operator]
    store.record(StatusEvent("keep", queue_name, FINISHED, time.time()))  # no expires_at: kept forever
    assert store.delete_expired(now=time.time()) == 0
    assert store.delete_expired(now=time.time() + 1.5) == 3
    assert [r.task_id for r in store.query()] == ["keep"]

    # The writer also deletes expired rows by itself, periodically.
    monkeypatch.setattr(status_store, "EXPIRY_INTERVAL_SECONDS", 0.05)
    store.close()  # the next record starts a writer that reads the patched interval
    f.push(9)
    store.flush()
    assert len(store.query()) == 2
    wait_for(lambda: [r.task_id for r in store.query()] == ["keep"], 5, "the writer to delete the expired row")


def test_record_callbacked_is_final(queue_name: str) -> None:
    @task_deco(queue_name, broker_kind=MEMORY, function_result_status_persistance_conf=WITH_RESULT)
    def add(a: int, b: int) -> int:
        return a + b

    task_id = add.push(1, 2).task_id
    add.consume()
    memory().join(queue_name, timeout=5)
    store = open_status_store(queue_name)
    wait_for(lambda: status_of(store, task_id) == FINISHED, 5, "the finished record")
    record_callbacked(add.publisher, task_id)
    record = store.get(task_id)
    assert record is not None and record.status == CALLBACKED
    assert record.result == 3 and record.attempts == 1 and record.kwargs == {"a": 1, "b": 2}
    # A late record from another process (with a later clock) never moves it back.
    store.record(StatusEvent(task_id, queue_name, FINISHED, time.time() + 60, result="4"))
    record = store.get(task_id)
    assert record is not None and record.status == CALLBACKED and record.result == 3


def test_a_result_callback_marks_the_call_callbacked(queue_name: str) -> None:
    """End to end with RPC mode: AsyncResult.set_callback runs, then the record becomes callbacked."""
    seen: list[object] = []

    @task_deco(queue_name, broker_kind=MEMORY, is_using_rpc_mode=True,
               function_result_status_persistance_conf=WITH_RESULT)
    def add(a: int, b: int) -> int:
        return a + b

    handle = add.push(2, 3)
    handle.set_callback(seen.append)
    add.consume()
    store = open_status_store(queue_name)
    wait_for(lambda: status_of(store, handle.task_id) == CALLBACKED, 10, "the callbacked record")
    record = store.get(handle.task_id)
    assert record is not None and record.result == 5 and record.attempts == 1 and len(seen) == 1


def test_events_arriving_out_of_order(queue_name: str) -> None:
    """The consumer's process may write before the publisher's: a late not_started only fills gaps."""
    store = open_status_store(queue_name)
    now = time.time()
    store.record(StatusEvent("t", queue_name, RUNNING, now + 1, started_at=now + 1, host="h", pid=7))
    store.record(StatusEvent("t", queue_name, FINISHED, now + 2, started_at=now + 1, attempts=1,
                             finished_at=now + 2, duration=1.0))
    store.flush()
    store.record(StatusEvent("t", queue_name, NOT_STARTED, now, kwargs='{"a": 1}', publish_time=now,
                             host="publisher"))
    record = store.get("t")
    assert record is not None and record.status == FINISHED and record.updated_at == now + 2
    assert record.kwargs == {"a": 1} and record.publish_time == now and record.host == "h" and record.pid == 7


STATUS_CHOICES = (NOT_STARTED, RUNNING, FINISHED, FAILED, REQUEUED, SKIPPED, CALLBACKED)


T = TypeVar("T")


def random_event(rng: random.Random, task_id: str) -> StatusEvent:
    def maybe(value: T) -> T | None:
        return value if rng.random() < 0.6 else None

    status = rng.choice(STATUS_CHOICES)
    started = maybe(float(rng.randint(0, 5))) if status in (RUNNING, FINISHED, FAILED, REQUEUED) else None
    return StatusEvent(
        task_id, "q", status, float(rng.randint(0, 5)), kwargs=maybe(f'{{"k": {rng.randint(0, 3)}}}'),
        result=maybe(str(rng.randint(0, 3))), exception=maybe(f"E{rng.randint(0, 3)}"),
        attempts=maybe(rng.randint(0, 3)), host=maybe(f"h{rng.randint(0, 3)}"), started_at=started,
        finished_at=maybe(float(rng.randint(0, 5))), duration=maybe(float(rng.randint(0, 5))),
    )


def test_merging_a_batch_in_memory_equals_writing_event_by_event(queue_name: str) -> None:
    """The writer merges the events of one call within a batch; the row must be the same as without."""
    one_by_one = open_status_store(queue_name + "_a")
    merged = open_status_store(queue_name + "_b")
    rng = random.Random(20240521)
    for case in range(300):
        events = [random_event(rng, f"t{case}") for _ in range(rng.randint(2, 5))]
        for event in events:
            one_by_one.record(event)
            one_by_one.flush()
        combined = events[0]
        for event in events[1:]:
            combined = merge_events(combined, event)
        merged.record(combined)
    merged.flush()
    for case in range(300):
        a, b = one_by_one.get(f"t{case}"), merged.get(f"t{case}")
        assert a is not None and b is not None
        assert a.as_dict() == b.as_dict(), f"case {case}"


def test_a_forked_child_writes_with_its_own_connection(queue_name: str) -> None:
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    store = open_status_store(queue_name)
    store.record(StatusEvent("parent", queue_name, FINISHED, time.time()))
    store.flush()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1  # an exception
        try:
            child_store = open_status_store(queue_name)
            child_store.record(StatusEvent("child", queue_name, FINISHED, time.time(), pid=os.getpid()))
            code = 2 if not child_store.flush(5) else 3 if child_store.get("parent") is None else 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), status
    assert os.WEXITSTATUS(status) == 0, {1: "the child raised", 2: "its flush timed out (5 s)",
                                         3: "it did not find the parent's record"}.get(os.WEXITSTATUS(status))
    store.record(StatusEvent("parent2", queue_name, FINISHED, time.time()))
    record = store.get("child")
    assert record is not None and record.pid == pid
    assert {r.task_id for r in store.query()} == {"parent", "parent2", "child"}


FORKS = """
import os, sys, time
from funboost_like.core import status_store
from funboost_like.core.status_store import FINISHED, StatusEvent, open_status_store

status_store.IDLE_WRITER_EXIT_SECONDS = 0.0  # each writer closes its connection right after its batch
stuck = 0
for i in range(20):
    store = open_status_store(f"{sys.argv[1]}_{i}")
    store.record(StatusEvent("parent", store.queue_name, FINISHED, time.time()))
    store.flush()
    pid = os.fork()  # while the writer may be closing its connection, inside SQLite
    if pid == 0:
        child = open_status_store(f"{sys.argv[1]}_{i}")  # the same file as the parent's writer
        child.record(StatusEvent("child", child.queue_name, FINISHED, time.time()))
        os._exit(0 if child.flush(2) else 2)
    stuck += os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0
print("STUCK", stuck)
"""


def test_a_child_forked_while_a_writer_is_inside_sqlite_can_still_write(isolated_settings: Path,
                                                                       queue_name: str) -> None:
    """A fork while a writer thread was inside SQLite left SQLite's mutexes locked in the child, whose
    first connection to that file then waited forever (10 of these 20 forks without the fork guard)."""
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    proc = subprocess.run([sys.executable, "-c", FORKS, queue_name], capture_output=True, text=True, timeout=120,
                          env=subprocess_env(isolated_settings))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "STUCK 0" in proc.stdout, proc.stdout


def test_flush_and_close_write_everything(queue_name: str) -> None:
    store = open_status_store(queue_name)
    for i in range(5000):
        store.record(StatusEvent(f"t{i}", queue_name, NOT_STARTED, float(i)))
    store.close()
    assert store.counts_by_status()[NOT_STARTED] == 5000


# -- across processes on SQLite ------------------------------------------------------------------

WORKER = """
import logging
import sys

from funboost_like import BrokerEnum, FunctionResultStatusPersistanceConfig, task_deco


@task_deco(sys.argv[1], broker_kind=BrokerEnum.PERSISTQUEUE, max_retry_times=1, log_level=logging.WARNING,
           is_print_detail_exception=False,
           function_result_status_persistance_conf=FunctionResultStatusPersistanceConfig(True, True))
def add(a: int, b: int) -> int:
    if a < 0:
        raise ValueError(f"negative: {a}")
    return a + b


if __name__ == "__main__":
    print("ready", flush=True)
    add.consume()
"""


def test_lifecycle_across_processes_on_sqlite(queue_name: str, tmp_path: Path, isolated_settings: Path,
                                              status_dir: Path) -> None:
    @task_deco(queue_name, broker_kind=BrokerEnum.PERSISTQUEUE, function_result_status_persistance_conf=WITH_RESULT)
    def add(a: int, b: int) -> int:
        raise AssertionError("runs in the workers only")

    ids = {add.push(i, b=1).task_id: i for i in range(-3, 37)}
    store = open_status_store(queue_name)
    assert store.counts_by_status()[NOT_STARTED] == 40
    worker = tmp_path / "status_worker.py"
    worker.write_text(textwrap.dedent(WORKER))
    env = subprocess_env(isolated_settings, FUNBOOST_LIKE_STATUS_DB_PATH=str(status_dir))
    children = []
    for n in range(2):
        with open(tmp_path / f"worker{n}.log", "wb") as log:  # a file: a full pipe never blocks a worker
            children.append(subprocess.Popen([sys.executable, str(worker), queue_name], env=env, cwd=tmp_path,
                                             stdout=log, stderr=subprocess.STDOUT))
    try:
        def all_done() -> bool:
            counts = store.counts_by_status()
            return counts[FINISHED] == 37 and counts[FAILED] == 3

        wait_for(all_done, 30, lambda: f"40 terminal records from the workers; {store.counts_by_status()}; logs:\n"
                 + "\n".join(p.read_text() for p in sorted(tmp_path.glob("worker*.log"))))
    finally:
        for child in children:
            child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(20)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(5)
    pids = {child.pid for child in children}
    for record in store.query(limit=None):
        i = ids[record.task_id]
        assert record.kwargs == {"a": i, "b": 1}
        assert record.pid in pids and record.host == socket.gethostname()
        assert record.script == str(worker) and record.publish_time is not None
        assert record.started_at is not None and record.started_at >= record.publish_time
        if i < 0:
            assert record.status == FAILED and record.attempts == 2
            assert record.exception is not None and record.exception.startswith(f"ValueError: negative: {i}")
        else:
            assert record.status == FINISHED and record.result == i + 1 and record.attempts == 1


# -- cost ----------------------------------------------------------------------------------------

def test_status_persistence_keeps_consuming_fast(queue_name: str) -> None:
    """A loose bound (the machine may be shared): benchmarks/status_overhead.py measures it properly."""
    n = 20_000
    counter = itertools.count(1)
    done = threading.Event()

    @task_deco(queue_name, broker_kind=MEMORY, log_level="WARNING", function_result_status_persistance_conf=STATUS_ONLY)
    def f(x: int) -> int:
        if next(counter) == n:
            done.set()
        return x

    f.publish_many([{"x": i} for i in range(n)])
    store = open_status_store(queue_name)
    store.flush()  # the not_started records are written before the clock starts
    started = time.perf_counter()
    f.consume()
    assert done.wait(60)
    rate = n / (time.perf_counter() - started)
    assert store.flush(30)
    assert store.counts_by_status()[FINISHED] == n
    assert rate > 12_000, f"{rate:.0f} calls/s with status persistence on"


# -- stats (item 10) -----------------------------------------------------------------------------

def test_estimate_is_consistent_with_the_rate_and_backlog(queue_name: str) -> None:
    @task_deco(queue_name, broker_kind=MEMORY, qps=50, log_level="WARNING")
    def f(i: int) -> None:
        pass

    f.publish_many([{"i": i} for i in range(1000)])
    f.consume()
    time.sleep(4.0)
    stats = f.consumer.stats.as_dict()
    figures = f.consumer.estimate()
    rate, waiting, left = figures["rate_per_second_last_minute"], figures["waiting"], figures["seconds_left"]
    assert 35 <= rate <= 60
    done = stats["succeeded"]
    assert 140 <= done <= 230
    assert 1000 - done - 25 <= waiting <= 1000 - done  # at most ~0.2 s of calls prefetched
    assert left == pytest.approx(waiting / rate)
    assert stats["rate_per_second_last_minute"] == pytest.approx(rate, abs=5)
    assert stats["failed"] == 0 and stats["skipped"] == 0
