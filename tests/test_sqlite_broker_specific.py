"""Behaviour of the SQLite broker (PERSISTQUEUE) beyond the shared broker contract.

Covers leases (renewal while alive, expiry after a SIGKILL), several processes on one file,
bounded file size, fork safety, the queue-name-to-file-name mapping, and queues spread over several
files (``SQLITE_FILES_PER_QUEUE``, the seed's ``MIDDLEWARE_NUM``).
"""

from __future__ import annotations

import collections
import gc
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

import funboost_like
from funboost_like.brokers.base import Delivery
from funboost_like.brokers.registry import get_broker
from funboost_like.brokers.sqlite import SqliteBroker
from funboost_like.core.config import patch_frame_config, settings
from funboost_like.core.enums import BrokerEnum
from funboost_like.core.errors import BrokerError, ConfigurationError, DoubleAckError
from funboost_like.core.sqlite_files import queue_file_name

from .conftest import open_descriptors

PACKAGE_ROOT = Path(funboost_like.__file__).resolve().parent.parent
Q = "jobs"


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "queues"
    patch_frame_config(SQLITE_QUEUES_PATH=str(path), SQLITE_LEASE_SECONDS=30.0)
    yield path
    settings.reset()


@pytest.fixture
def broker(folder: Path) -> Iterator[SqliteBroker]:
    b = SqliteBroker()
    yield b
    b.close()


def fetch_n(broker: SqliteBroker, queue: str, n: int, timeout: float = 5.0) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got.extend(broker.fetch(queue, n - len(got), 0.2))
    return got


def child_env(folder: Path, lease: float = 30.0) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PACKAGE_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["FUNBOOST_LIKE_SQLITE_QUEUES_PATH"] = str(folder)
    env["FUNBOOST_LIKE_SQLITE_LEASE_SECONDS"] = str(lease)
    env["FUNBOOST_LIKE_NO_USER_CONFIG"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def rows_in(path: Path) -> int:
    with closing(sqlite3.connect(path)) as conn, conn:
        return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])


# -- basics -------------------------------------------------------------------------------------


def test_is_the_registered_persistqueue_broker(folder: Path) -> None:
    assert isinstance(get_broker(BrokerEnum.PERSISTQUEUE), SqliteBroker)
    caps = SqliteBroker.capabilities
    assert caps.ack and caps.persistent and caps.delay and caps.priority and caps.cross_process
    assert caps.dead_letters and not caps.cross_host


def test_folder_created_lazily(folder: Path) -> None:
    b = SqliteBroker()
    assert not folder.exists()
    b.publish(Q, b"x")
    assert (folder / "jobs.sqlite3").is_file()
    b.close()


def test_round_trip(broker: SqliteBroker) -> None:
    broker.publish(Q, b'{"a":1}')
    broker.publish_many(Q, [b'{"b":2}', b'{"c":3}'])
    got = fetch_n(broker, Q, 3)
    assert [d.body for d in got] == [b'{"a":1}', b'{"b":2}', b'{"c":3}']
    assert all(type(d.body) is bytes and d.attempts == 1 and d.queue == Q for d in got)
    assert broker.in_flight(Q) == 3
    broker.ack(got)
    assert broker.in_flight(Q) == 0
    assert rows_in(broker.path(Q)) == 0
    assert broker.fetch(Q, 10, 0.05) == []


def test_ids_are_never_reused(broker: SqliteBroker) -> None:
    broker.publish(Q, b"a")
    [a] = broker.fetch(Q, 1, 1.0)
    broker.ack([a])  # the table is empty again, and the deleted row had the highest id
    broker.publish(Q, b"b")
    [b] = broker.fetch(Q, 1, 1.0)
    assert b.token > a.token
    broker.ack([b])


def test_priority_then_fifo(broker: SqliteBroker) -> None:
    for body, priority in [(b"p0", 0), (b"p5a", 5), (b"p1", 1), (b"p5b", 5), (b"p-1", -1)]:
        broker.publish(Q, body, priority=priority)
    got = fetch_n(broker, Q, 5)
    assert [d.body for d in got] == [b"p5a", b"p5b", b"p1", b"p0", b"p-1"]
    assert [d.priority for d in got] == [5, 5, 1, 0, -1]
    broker.ack(got)


def test_delayed_visibility(broker: SqliteBroker) -> None:
    broker.publish(Q, b"late", not_before=time.time() + 0.4)
    assert broker.fetch(Q, 1, 0) == []
    assert broker.count(Q) == 1
    started = time.monotonic()
    [d] = broker.fetch(Q, 1, 3.0)
    assert d.body == b"late"
    assert 0.25 < time.monotonic() - started < 1.5
    broker.ack([d])


def test_idle_fetch_honours_timeout(broker: SqliteBroker) -> None:
    started = time.monotonic()
    assert broker.fetch(Q, 5, 0.3) == []
    assert 0.25 <= time.monotonic() - started < 1.0
    assert broker.fetch(Q, 0, 1.0) == []


def test_publish_wakes_a_waiting_fetch_at_once(broker: SqliteBroker) -> None:
    result: list[float] = []

    def consume() -> None:
        ds = broker.fetch(Q, 1, 5.0)
        result.append(time.monotonic())
        broker.ack(ds)

    t = threading.Thread(target=consume)
    t.start()
    time.sleep(0.3)  # the fetch is now in its slow (50 ms) polling phase
    published = time.monotonic()
    broker.publish(Q, b"now")
    t.join(5)
    assert result and result[0] - published < 0.2


def inotify_instances() -> int:
    """How many inotify instances this process has open."""
    return open_descriptors().count("anon_inode:inotify")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify watches are Linux's")
def test_a_thread_that_waited_and_ended_leaves_no_inotify_instance_open(broker: SqliteBroker) -> None:
    """An idle fetch waits on an inotify watch of its thread. The watch outlived the thread: a consumer
    started and stopped 200 times in one process (a new fetcher thread each time) left 200 descriptors
    open, and past the user's inotify limit (128 by default) every new watch failed: fetches polled."""
    broker.publish(Q, b"x")
    broker.ack(fetch_n(broker, Q, 1))  # the files exist

    def consume_idle() -> None:
        assert broker.fetch(Q, 1, 0.05) == []

    before = inotify_instances()
    for _ in range(20):
        t = threading.Thread(target=consume_idle)
        t.start()
        t.join()
    gc.collect()
    assert inotify_instances() == before


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts this process's descriptors in /proc")
def test_a_thread_keeps_a_bounded_number_of_files_open(broker: SqliteBroker, folder: Path) -> None:
    """Each thread keeps a connection per queue file it used (three descriptors with the WAL). A publisher
    pushing to ever more queues, or the maintenance thread renewing leases in them, kept every one open:
    a process that had used 200 queues had 1,300 descriptors open, past select()'s limit and the usual
    ulimit of 1,024."""
    from funboost_like.brokers import sqlite

    def open_in_folder() -> int:
        return sum(link.startswith(str(folder)) for link in open_descriptors())

    queues = [f"many_{i}" for i in range(sqlite._CONNECTIONS_PER_THREAD + 20)]
    for queue in queues:
        broker.publish(queue, b"x")
    assert open_in_folder() <= 3 * sqlite._CONNECTIONS_PER_THREAD
    assert [broker.count(queue) for queue in queues] == [1] * len(queues)  # the closed ones open again


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify watches are Linux's")
def test_an_idle_fetch_waits_in_a_process_with_over_a_thousand_descriptors_open(broker: SqliteBroker) -> None:
    """The idle wait watched its inotify descriptor with select(), which takes none from 1,024 on: in a
    process with that many files or sockets open every idle fetch raised ValueError."""
    import resource

    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 1100:
        pytest.skip("needs a limit of 1,100 open descriptors")
    broker.publish(Q, b"x")
    broker.ack(fetch_n(broker, Q, 1))  # the files exist
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1030)]
    try:
        result: list[object] = []

        def consume() -> None:  # a new thread: its watch gets a descriptor above 1,024
            try:
                assert broker.fetch(Q, 1, 0.1) == []
                broker.publish(Q, b"y")
                result.append(broker.fetch(Q, 1, 1.0))
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                result.append(exc)

        t = threading.Thread(target=consume)
        t.start()
        t.join(10)
        assert len(result) == 1 and isinstance(result[0], list) and [d.body for d in result[0]] == [b"y"], result
        broker.ack(result[0])
    finally:
        for fd in filler:
            os.close(fd)


def test_nack_requeue_with_delay_counts_an_attempt(broker: SqliteBroker) -> None:
    broker.publish(Q, b"x")
    [d] = fetch_n(broker, Q, 1)
    broker.nack(d, requeue=True, delay=0.4)
    assert broker.fetch(Q, 1, 0.1) == []
    assert broker.count(Q) == 1
    [again] = broker.fetch(Q, 1, 3.0)
    assert again.attempts == 2 and again.body == b"x"
    broker.nack(again, requeue=False)
    assert broker.count(Q) == 0
    assert rows_in(broker.path(Q)) == 0


def test_release_does_not_count_an_attempt(broker: SqliteBroker) -> None:
    broker.publish_many(Q, [b"a", b"b"])
    got = fetch_n(broker, Q, 2)
    broker.release(got)
    assert broker.count(Q) == 2
    again = fetch_n(broker, Q, 2)
    assert [(d.body, d.attempts) for d in again] == [(b"a", 1), (b"b", 1)]
    broker.ack(again)


def test_dead_letters_newest_first_with_reason(broker: SqliteBroker) -> None:
    broker.publish_many(Q, [b"first", b"second"])
    first, second = fetch_n(broker, Q, 2)
    broker.dead_letter(first, "not JSON")
    broker.dead_letter(second, "failed 3 times", ValueError("boom"))
    assert broker.count(Q) == 0 and rows_in(broker.path(Q)) == 0
    letters = broker.list_dead_letters(Q)
    assert [(x.body, x.reason, x.queue, x.attempts) for x in letters] == [
        (b"second", "failed 3 times", Q, 1),
        (b"first", "not JSON", Q, 1),
    ]
    assert letters[0].failed_at >= letters[1].failed_at > time.time() - 60
    assert len(broker.list_dead_letters(Q, limit=1)) == 1
    assert broker.purge_dead_letters(Q) == 2
    assert broker.list_dead_letters(Q) == []


def test_settling_twice_raises(broker: SqliteBroker) -> None:
    broker.publish_many(Q, [b"a", b"b"])
    a, b = fetch_n(broker, Q, 2)
    broker.ack([a])
    for settle in (
        lambda: broker.ack([a]),
        lambda: broker.nack(a),
        lambda: broker.nack(a, requeue=False),
        lambda: broker.release([a]),
        lambda: broker.dead_letter(a, "x"),
    ):
        with pytest.raises(DoubleAckError):
            settle()
    with pytest.raises(DoubleAckError):  # the valid one of the batch is still acked
        broker.ack([b, a])
    assert broker.in_flight(Q) == 0
    assert rows_in(broker.path(Q)) == 0


def test_purge_and_count_leave_held_messages_alone(broker: SqliteBroker) -> None:
    broker.publish_many(Q, [b"1", b"2", b"3"])
    broker.publish(Q, b"later", not_before=time.time() + 60)
    [held] = broker.fetch(Q, 1, 1.0)
    assert broker.count(Q) == 3  # two ready + one delayed; the held one does not count
    assert broker.purge(Q) == 3
    assert broker.count(Q) == 0
    broker.ack([held])
    assert rows_in(broker.path(Q)) == 0


def test_large_batches(broker: SqliteBroker) -> None:
    broker.publish_many(Q, [str(i).encode() for i in range(1200)])
    got = broker.fetch(Q, 1200, 1.0)
    assert [int(d.body) for d in got] == list(range(1200))
    broker.release(got[:700])  # more than one IN (...) chunk
    broker.ack(got[700:])
    again = broker.fetch(Q, 1000, 1.0)
    assert len(again) == 700 and all(d.attempts == 1 for d in again)
    broker.ack(again)
    assert rows_in(broker.path(Q)) == 0


def test_invalid_synchronous_setting(folder: Path) -> None:
    patch_frame_config(SQLITE_SYNCHRONOUS="SOMETIMES")
    with pytest.raises(ConfigurationError):
        SqliteBroker().publish(Q, b"x")
    patch_frame_config(SQLITE_SYNCHRONOUS="full")
    b = SqliteBroker()
    b.publish(Q, b"x")
    assert b.count(Q) == 1
    b.close()


# -- leases -------------------------------------------------------------------------------------


def test_leases_are_renewed_while_the_holder_lives(folder: Path) -> None:
    patch_frame_config(SQLITE_LEASE_SECONDS=0.6)
    holder, other = SqliteBroker(), SqliteBroker()
    holder.publish(Q, b"long call")
    [d] = holder.fetch(Q, 1, 1.0)
    time.sleep(1.5)  # well past the lease
    assert other.fetch(Q, 1, 0) == []
    holder.ack([d])
    holder.close()
    other.close()


def test_an_expired_lease_hands_the_message_to_another_consumer(folder: Path) -> None:
    patch_frame_config(SQLITE_LEASE_SECONDS=0.4)
    dead, alive = SqliteBroker(), SqliteBroker()
    dead.publish(Q, b"x")
    [d] = dead.fetch(Q, 1, 1.0)
    dead.close()  # stops renewing, like a killed process
    assert dead.in_flight(Q) == 1
    [again] = alive.fetch(Q, 1, 3.0)
    assert again.body == b"x" and again.attempts == 2 and again.token == d.token
    dead.nack(d)  # a stale requeue must not take the message from its new holder
    assert dead.in_flight(Q) == 0
    assert alive.count(Q) == 0
    assert alive.fetch(Q, 1, 0) == []
    alive.ack([again])
    alive.close()
    dead.close()


HOLDER = textwrap.dedent(
    """
    import sys, time
    from funboost_like.brokers.sqlite import SqliteBroker
    b = SqliteBroker()
    [d] = b.fetch(sys.argv[1], 1, 10.0)
    print(d.token, flush=True)
    time.sleep(60)
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkilled_consumer_message_comes_back_after_the_lease(broker: SqliteBroker, folder: Path) -> None:
    lease = 1.2
    patch_frame_config(SQLITE_LEASE_SECONDS=lease)
    broker.publish(Q, b"survivor")
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, Q], env=child_env(folder, lease), stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        token = int(child.stdout.readline())
        assert broker.fetch(Q, 1, 2.5) == []  # the live child keeps renewing across several leases
        child.send_signal(signal.SIGKILL)
        child.wait(5)
        killed = time.monotonic()
        [d] = broker.fetch(Q, 1, 5.0)
        assert time.monotonic() - killed < lease + 1.0
        assert (d.token, d.body, d.attempts) == (token, b"survivor", 2)
        broker.ack([d])
    finally:
        child.kill()
        child.wait(5)
        if child.stdout is not None:
            child.stdout.close()


CONSUMER = textwrap.dedent(
    """
    import random, sys, time
    from pathlib import Path
    from funboost_like.brokers.sqlite import SqliteBroker
    queue, index, sync = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    b = SqliteBroker()
    b.count(queue)  # open the file before the start line
    (sync / f"ready-{index}").touch()
    while not (sync / "go").exists():
        time.sleep(0.002)
    seen = []
    while True:
        got = b.fetch(queue, random.randint(1, 20), 0.3)
        if not got:
            break
        seen.extend(d.body.decode() for d in got)
        b.ack(got)
    b.close()
    print(" ".join(seen))
    """
)


def test_four_processes_consume_each_message_exactly_once(broker: SqliteBroker, folder: Path, tmp_path: Path) -> None:
    total, workers = 4000, 4
    broker.publish_many(Q, [str(i).encode() for i in range(total)])
    sync = tmp_path / "sync"
    sync.mkdir()
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CONSUMER, Q, str(i), str(sync)],
            env=child_env(folder), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(workers)
    ]
    try:
        deadline = time.monotonic() + 20
        while len(list(sync.glob("ready-*"))) < workers and time.monotonic() < deadline:
            time.sleep(0.01)
        (sync / "go").touch()
        outputs = [child.communicate(timeout=30) for child in children]
    finally:
        for child in children:
            child.kill()
            child.wait(5)
            for stream in (child.stdout, child.stderr):
                if stream is not None:
                    stream.close()
    assert [child.returncode for child in children] == [0] * workers, [err for _, err in outputs]
    per_child = [out.split() for out, _ in outputs]
    counts = collections.Counter(body for seen in per_child for body in seen)
    assert set(counts) == {str(i) for i in range(total)}
    assert set(counts.values()) == {1}
    assert sum(1 for seen in per_child if seen) >= 2  # they really ran side by side
    assert rows_in(broker.path(Q)) == 0


# -- files ----------------------------------------------------------------------------------------


def test_file_size_stays_bounded_over_many_cycles(broker: SqliteBroker) -> None:
    path = broker.path(Q)
    body = b"x" * 300
    sizes = []
    for _ in range(25):
        broker.publish_many(Q, [body] * 1000)
        for _ in range(20):
            got = broker.fetch(Q, 100, 0)
            if not got:
                break
            broker.ack(got)
        assert broker.count(Q) == 0
        wal = path.with_name(path.name + "-wal")
        sizes.append(path.stat().st_size + (wal.stat().st_size if wal.exists() else 0))
    assert max(sizes[5:]) <= max(sizes[:5]) * 1.25 + 64 * 1024, sizes


def test_queue_file_names() -> None:
    assert queue_file_name("orders") == "orders.sqlite3"
    assert queue_file_name("a.b-c_D9") == "a.b-c_D9.sqlite3"
    odd = ["a/b", "../etc/passwd", ".hidden", "..", "", "x" * 121, "x" * 500, "x" * 500 + "y", "a b", "a%20b",
           "中文", "a~b", "a\\b", "a:b", "CON\x00"]
    names = [queue_file_name(q) for q in odd]
    assert len(set(names)) == len(odd)  # distinct queues never share a file
    for name in names:
        assert "/" not in name and "\\" not in name and "\x00" not in name and ":" not in name
        assert not name.startswith(".")
        assert name.endswith(".sqlite3") and "~" in name  # "~" never appears in a plain name
        assert len(name) <= 120
    assert queue_file_name("a/b") != queue_file_name("a%2Fb")


def test_extra_file_names_never_collide() -> None:
    assert queue_file_name("orders", 0) == "orders.sqlite3" and queue_file_name("orders", 2) == "orders+2.sqlite3"
    queues = ["a", "a+1", "a.1", "a%2B1", "a@x", "a~b", "x" * 120, "中文", "a b", "a+1+1"]
    names = [queue_file_name(q, k) for q in queues for k in range(4)]
    assert len(set(names)) == len(names)
    assert not any("@" in name for name in names)  # a key-value store's file always has one
    assert all(queue_file_name(q, k).startswith(queue_file_name(q)[:-len(".sqlite3")] + "+") for q in queues
               for k in (1, 3))


def test_odd_queue_names_round_trip(broker: SqliteBroker, folder: Path) -> None:
    for queue in ["a/b c", ".hidden", "x" * 300]:
        broker.publish(queue, queue.encode())
        [d] = broker.fetch(queue, 1, 1.0)
        assert d.body == queue.encode()
        broker.ack([d])
        assert broker.path(queue).parent == folder
    assert len(list(folder.glob("*.sqlite3"))) == 3


# -- concurrency ----------------------------------------------------------------------------------


def test_many_threads_publish_and_consume_each_message_once(broker: SqliteBroker) -> None:
    publishers, per_publisher = 2, 500
    total = publishers * per_publisher
    seen: list[bytes] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def publish(p: int) -> None:
        for i in range(per_publisher):
            broker.publish(Q, f"{p}-{i}".encode())

    def consume() -> None:
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                with lock:
                    if len(seen) >= total:
                        return
                got = broker.fetch(Q, 7, 0.1)
                broker.ack(got)
                with lock:
                    seen.extend(d.body for d in got)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=consume) for _ in range(6)]
    threads += [threading.Thread(target=publish, args=(p,)) for p in range(publishers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert sorted(seen) == sorted(f"{p}-{i}".encode() for p in range(publishers) for i in range(per_publisher))


def test_threads_opening_a_new_file_at_once_all_succeed(broker: SqliteBroker) -> None:
    errors: list[BaseException] = []
    for round_ in range(15):
        queue = f"fresh{round_}"
        barrier = threading.Barrier(8)

        def first_use(q: str = queue, b: threading.Barrier = barrier) -> None:
            try:
                b.wait(5)
                broker.publish(q, b"x")
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=first_use) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert not errors, errors
        assert broker.count(queue) == 8


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_never_reuses_the_parents_connections(broker: SqliteBroker) -> None:
    broker.publish(Q, b"parent")
    [held] = broker.fetch(Q, 1, 1.0)
    parent_owner = broker.owner
    pid = os.fork()
    if pid == 0:  # child: exit code tells the parent what went wrong
        code = 1
        try:
            code = 2 if broker.owner == parent_owner else 3 if broker.in_flight(Q) != 0 else 0
            if code == 0:
                broker.publish(Q, b"child")
                code = 0 if broker.count(Q) == 1 else 4
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    [d] = broker.fetch(Q, 1, 1.0)
    assert d.body == b"child"
    broker.ack([held, d])


# -- crash counting (the poison-message rule reads it) -------------------------------------------


def test_a_lease_that_ran_out_counts_a_crash_and_settled_returns_do_not(folder: Path) -> None:
    patch_frame_config(SQLITE_LEASE_SECONDS=0.3)
    dead, alive = SqliteBroker(), SqliteBroker()
    dead.publish(Q, b"x")
    [d] = dead.fetch(Q, 1, 1.0)
    assert d.crashes == 0
    dead.close()  # stops renewing, like a killed process
    [again] = alive.fetch(Q, 1, 3.0)
    assert (again.attempts, again.crashes) == (2, 1)
    alive.nack(again)
    [after_nack] = alive.fetch(Q, 1, 1.0)
    assert (after_nack.attempts, after_nack.crashes) == (3, 1)  # a nack counts an attempt, not a crash
    alive.release([after_nack])
    [after_release] = alive.fetch(Q, 1, 1.0)
    assert (after_release.attempts, after_release.crashes) == (3, 1)
    alive.nack(after_release, delay=0.2)  # a retry with backoff waits in the delayed table
    [after_delay] = alive.fetch(Q, 1, 3.0)
    assert (after_delay.attempts, after_delay.crashes) == (4, 1)  # the delay kept the death (it lost it)
    alive.ack([after_delay])
    alive.close()


def test_files_of_earlier_versions_get_the_crashes_column(folder: Path) -> None:
    path = folder / queue_file_name(Q)
    folder.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(path)) as conn, conn:  # the schema before crash counting
        conn.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, priority INTEGER NOT NULL "
                     "DEFAULT 0, visible_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, owner TEXT, "
                     "body BLOB NOT NULL)")
        conn.execute("INSERT INTO messages (priority, visible_at, body) VALUES (0, 0, x'7b7d')")
        conn.execute("CREATE TABLE delayed (id INTEGER PRIMARY KEY AUTOINCREMENT, priority INTEGER NOT NULL "
                     "DEFAULT 0, due REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, body BLOB NOT NULL)")
        conn.execute("INSERT INTO delayed (priority, due, attempts, body) VALUES (0, 0, 2, x'5b5d')")
    broker = SqliteBroker()
    got = sorted(fetch_n(broker, Q, 2), key=lambda d: d.body)
    assert [(d.body, d.attempts, d.crashes) for d in got] == [(b"[]", 3, 0), (b"{}", 1, 0)]
    broker.nack(got[0], delay=0.1)
    [d] = broker.fetch(Q, 1, 2.0)
    assert (d.body, d.attempts, d.crashes) == (b"[]", 4, 0)
    broker.ack([got[1], d])
    broker.close()


# -- several files per queue (SQLITE_FILES_PER_QUEUE) ----------------------------------------------


def files_of(folder: Path, queue: str = Q) -> dict[str, int]:
    """Rows in ``messages`` and ``delayed`` of every file of ``queue``, by file name."""
    counts = {}
    for path in sorted(folder.glob(f"{queue}*.sqlite3")):
        with closing(sqlite3.connect(path)) as conn, conn:
            counts[path.name] = sum(int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
                                    for table in ("messages", "delayed"))
    return counts


def test_messages_spread_over_the_files_and_come_out_merged(folder: Path) -> None:
    patch_frame_config(SQLITE_FILES_PER_QUEUE=3)
    broker = SqliteBroker()
    for i in range(30):
        broker.publish(Q, str(i).encode())
    assert files_of(folder) == {f"{Q}.sqlite3": 10, f"{Q}+1.sqlite3": 10, f"{Q}+2.sqlite3": 10}
    broker.publish_many(Q, [b"batch"] * 7)  # a batch stays in one file
    assert sorted(files_of(folder).values()) in ([10, 10, 17],)
    broker.publish(Q, b"urgent", priority=5)
    assert broker.count(Q) == 38
    got = fetch_n(broker, Q, 38)
    assert [d.body for d in got] == [b"urgent", *(str(i).encode() for i in range(30)), *[b"batch"] * 7]
    assert {d.token[0] if isinstance(d.token, tuple) else 0 for d in got} == {0, 1, 2}  # tokens name their file
    first, second, third = got[1:4]  # in three different files
    broker.nack(first, delay=0.2)
    broker.release([second])
    broker.dead_letter(third, "bad")
    broker.ack([d for d in got if d not in (first, second, third)])
    again = fetch_n(broker, Q, 2, timeout=3)
    assert sorted(d.body for d in again) == [b"0", b"1"] and {d.attempts for d in again} == {1, 2}
    broker.ack(again)
    assert [letter.body for letter in broker.list_dead_letters(Q)] == [b"2"]
    assert broker.count(Q) == 0 and set(files_of(folder).values()) == {0}
    assert broker.purge_dead_letters(Q) == 1
    broker.close()


def test_priority_and_order_across_files_for_a_batch(folder: Path) -> None:
    patch_frame_config(SQLITE_FILES_PER_QUEUE=2)
    broker = SqliteBroker()
    for i in range(6):
        broker.publish(Q, f"low{i}".encode())
        broker.publish(Q, f"high{i}".encode(), priority=3)
    got = broker.fetch(Q, 8, 1.0)  # one fetch: the first 8 of both files merged
    assert [d.body for d in got] == [*(f"high{i}".encode() for i in range(6)), b"low0", b"low1"]
    broker.ack(got)
    assert [d.body for d in fetch_n(broker, Q, 4)] == [f"low{i}".encode() for i in range(2, 6)]
    broker.close()


def test_changing_the_file_count_loses_nothing(folder: Path) -> None:
    consumer = SqliteBroker()  # one file, like a process started before the change
    assert consumer.fetch(Q, 10, 0) == [] and consumer.count(Q) == 0
    patch_frame_config(SQLITE_FILES_PER_QUEUE=4)
    publisher = SqliteBroker()
    for i in range(12):
        publisher.publish(Q, str(i).encode())
    publisher.publish(Q, b"later", not_before=time.time() + 0.3)
    assert len(files_of(folder)) == 4
    patch_frame_config(SQLITE_FILES_PER_QUEUE=1)
    started = time.monotonic()
    got = fetch_n(consumer, Q, 13, timeout=5)  # file 0 at once, the others once it re-reads the file count
    assert sorted(d.body for d in got) == sorted([*(str(i).encode() for i in range(12)), b"later"])
    assert time.monotonic() - started < 3
    consumer.ack(got)
    fresh = SqliteBroker()  # a process started with N=1 after the queue had 4 files
    publisher.publish_many(Q, [b"x"] * 5)  # still into one of 4 files
    assert fresh.count(Q) == 5 and len(fetch_n(fresh, Q, 5)) == 5 and fresh.count(Q) == 0
    patch_frame_config(SQLITE_FILES_PER_QUEUE=2)
    assert SqliteBroker().purge(Q) == 0 and sum(files_of(folder).values()) == 5  # held by `fresh`, not waiting
    for b in (consumer, publisher, fresh):
        b.close()


def test_middleware_num_is_the_seeds_name_of_the_setting(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    patch_frame_config(MIDDLEWARE_NUM=2)
    assert settings.get("SQLITE_FILES_PER_QUEUE") == 2 and settings.get("MIDDLEWARE_NUM") == 2
    broker = SqliteBroker()
    broker.publish(Q, b"a")
    broker.publish(Q, b"b")
    assert files_of(folder) == {f"{Q}.sqlite3": 1, f"{Q}+1.sqlite3": 1}
    broker.close()
    patch_frame_config(SQLITE_FILES_PER_QUEUE=3, MIDDLEWARE_NUM=5)  # at one level, the own name wins
    assert settings.get("SQLITE_FILES_PER_QUEUE") == 3
    settings.reset()
    monkeypatch.setenv("FUNBOOST_LIKE_MIDDLEWARE_NUM", "4")
    assert settings.get("SQLITE_FILES_PER_QUEUE") == 4
    monkeypatch.setenv("FUNBOOST_LIKE_SQLITE_FILES_PER_QUEUE", "2")
    settings.reset()
    assert settings.get("SQLITE_FILES_PER_QUEUE") == 2
    for wrong in (0, -1, 1.5, "2"):  # 1.5 and "2" are refused as soon as they are given, 0 and -1 when used
        with pytest.raises(ConfigurationError, match="SQLITE_FILES_PER_QUEUE"):
            patch_frame_config(SQLITE_QUEUES_PATH=str(folder), MIDDLEWARE_NUM=wrong)
            SqliteBroker().publish(Q, b"x")



def test_leases_in_every_file_are_renewed_and_expire_with_their_holder(folder: Path) -> None:
    patch_frame_config(SQLITE_FILES_PER_QUEUE=2, SQLITE_LEASE_SECONDS=0.6)
    holder, other = SqliteBroker(), SqliteBroker()
    for i in range(4):
        holder.publish(Q, str(i).encode())
    held = holder.fetch(Q, 4, 1.0)
    assert len(held) == 4 and len({isinstance(d.token, tuple) for d in held}) == 2  # from both files
    time.sleep(1.5)  # well past the lease: renewed in both files
    assert other.fetch(Q, 4, 0) == [] and other.count(Q) == 0
    holder.close()  # stops renewing, like a killed process
    back = fetch_n(other, Q, 4, timeout=3)
    assert sorted((d.body, d.token, d.attempts, d.crashes) for d in back) == sorted(
        (d.body, d.token, 2, 1) for d in held)
    other.ack(back)
    assert other.count(Q) == 0
    other.close()


def test_a_publish_to_any_file_wakes_a_waiting_fetch_at_once(folder: Path) -> None:
    patch_frame_config(SQLITE_FILES_PER_QUEUE=3)
    consumer, publisher = SqliteBroker(), SqliteBroker()
    assert consumer.fetch(Q, 1, 0.1) == []  # its watch on the three WAL files is set up
    woke: list[float] = []

    def wait_for_one() -> None:
        got = consumer.fetch(Q, 1, 5.0)
        woke.append(time.monotonic())
        consumer.ack(got)

    for i in range(6):  # the rotation reaches every file
        waiting = threading.Thread(target=wait_for_one)
        waiting.start()
        time.sleep(0.1)
        published = time.monotonic()
        publisher.publish(Q, str(i).encode())
        waiting.join(6)
        assert len(woke) == i + 1 and woke[i] - published < 0.2
    assert len(files_of(folder)) == 3
    for b in (consumer, publisher):
        b.close()


def test_a_watch_looks_again_soon_after_a_write_whose_commit_may_not_be_visible_yet(tmp_path: Path) -> None:
    """SQLite appends to the WAL file before it publishes the commit in the (unwatched) shared memory
    index, so a fetch woken by the write can find nothing: the next waits are short (1 ms doubling to
    64 ms), then long again. Seen under load: a message waited 0.5 s for the next long wait."""
    from funboost_like.brokers.file_watch import FileWatch

    paths = [tmp_path / "a-wal", tmp_path / "b-wal"]
    for path in paths:
        path.write_bytes(b"")
    watch = FileWatch([str(path) for path in paths])
    if watch._fd < 0:
        pytest.skip("no inotify here: the watch polls")
    started = time.monotonic()
    watch.wait(0.3)  # nothing written: a watched wait lasts its timeout
    assert time.monotonic() - started >= 0.25
    with open(paths[1], "ab") as f:
        f.write(b"x")
    started = time.monotonic()
    watch.wait(5.0)
    assert time.monotonic() - started < 0.2  # the write ends the wait at once
    started = time.monotonic()
    for _ in range(7):  # no new write: 1 + 2 + ... + 64 ms
        watch.wait(5.0)
    assert time.monotonic() - started < 1.5  # before the fix: 7 waits of 0.5 s
    started = time.monotonic()
    watch.wait(0.3)
    assert time.monotonic() - started >= 0.25  # long again
    watch.close()


def test_an_ack_refused_while_another_process_holds_the_file_is_sent_again(folder: Path) -> None:
    """A long write of another process (a big publish_many, a purge) held the queue file past the busy
    timeout while a call finished: its ack failed with "database is locked" and was dropped, the row was no
    longer renewed, and after the lease the same live process ran its finished call again, counted as its
    own death. Now the ack is sent again before the next fetch, the lease renewed meanwhile."""
    patch_frame_config(SQLITE_BUSY_TIMEOUT_SECONDS=0.2, SQLITE_LEASE_SECONDS=1.5)
    a, other = SqliteBroker(), SqliteBroker()  # two consumers (two owners) on one file
    try:
        a.publish(Q, b'{"x": 1}')
        (held,) = fetch_n(a, Q, 1)
        locker = sqlite3.connect(a.path(Q), timeout=5, isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")
        with pytest.raises(BrokerError, match="locked"):
            a.ack([held])  # the call finished; the file is held by someone else
        locker.execute("COMMIT")
        locker.close()
        deadline = time.monotonic() + 3 * 1.5  # the lease would have run out twice
        while time.monotonic() < deadline:
            assert other.fetch(Q, 1, 0.3) == [], "a consumer took a finished call back"
        assert a.fetch(Q, 1, 0) == []  # sends the ack first
        assert a.count(Q) == 0 and rows_in(a.path(Q)) == 0
    finally:
        a.close()
        other.close()
