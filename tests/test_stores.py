"""The key-value store contract (core/stores.py), run against every broker's store.

Memory and SQLite always run; Redis runs against a real server (database 15), skipping when it is
unreachable and failing when the ``CI`` environment variable is set.
"""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from funboost_like.brokers.base import Broker
from funboost_like.brokers.memory import MemoryBroker
from funboost_like.brokers.registry import get_broker
from funboost_like.core.config import patch_frame_config
from funboost_like.core.enums import BrokerEnum
from funboost_like.core.stores import KeyValueStore, MemoryKeyValueStore, SqliteKeyValueStore
from tests.conftest import require_server, subprocess_env

REDIS_URL = "redis://127.0.0.1:6379/15"


def redis_broker() -> Broker:
    require_server("Redis", "127.0.0.1", 6379)
    pytest.importorskip("redis")
    patch_frame_config(REDIS_URL=REDIS_URL)
    return get_broker(BrokerEnum.REDIS_ACK_ABLE)


def redis_cleanup(queue: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"fl:{{{queue}}}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(params=["memory", "sqlite", "redis"])
def broker_and_queue(request: pytest.FixtureRequest, queue_name: str) -> Iterator[tuple[Broker, str]]:
    if request.param == "memory":
        yield MemoryBroker(), queue_name
    elif request.param == "sqlite":
        yield get_broker(BrokerEnum.PERSISTQUEUE), queue_name
    else:
        broker = redis_broker()
        try:
            yield broker, queue_name
        finally:
            redis_cleanup(queue_name)


@pytest.fixture
def store(broker_and_queue: tuple[Broker, str]) -> KeyValueStore:
    broker, queue = broker_and_queue
    return broker.key_value_store(queue, "contract")


# -- the contract, on every store -------------------------------------------------------------------


def test_put_get_exists_delete(store: KeyValueStore) -> None:
    assert store.get("k") is None
    assert not store.exists("k")
    store.put("k", b"v1", None)
    assert store.get("k") == b"v1"
    assert store.exists("k")
    store.put("k", b"v2", None)
    assert store.get("k") == b"v2"
    store.delete("k")
    store.delete("k")  # deleting an absent key is fine
    assert store.get("k") is None
    assert not store.exists("k")


def test_binary_values_and_unicode_keys(store: KeyValueStore) -> None:
    value = bytes(range(256)) * 4
    store.put("clé:密钥 with spaces", value, None)
    assert store.get("clé:密钥 with spaces") == value
    store.put("empty", b"", None)
    assert store.get("empty") == b""
    assert store.exists("empty")


def test_expired_keys_are_invisible(store: KeyValueStore) -> None:
    store.put("short", b"x", 0.3)
    store.put("long", b"y", 30)
    store.put("forever", b"z", None)
    assert store.get("short") == b"x"
    time.sleep(0.45)
    assert store.get("short") is None
    assert not store.exists("short")
    assert store.get_many(["short", "long", "forever", "absent"]) == {"long": b"y", "forever": b"z"}


def test_put_replaces_the_expiry(store: KeyValueStore) -> None:
    store.put("k", b"1", 0.3)
    store.put("k", b"2", None)
    time.sleep(0.45)
    assert store.get("k") == b"2"
    store.put("k", b"3", 0.3)
    time.sleep(0.45)
    assert store.get("k") is None


def test_ttl_must_be_positive_or_none(store: KeyValueStore) -> None:
    for bad in (0, -1, 0.0):
        with pytest.raises(ValueError):
            store.put("k", b"v", bad)
        with pytest.raises(ValueError):
            store.add_if_absent("k", b"v", bad)
    assert store.get("k") is None


def test_add_if_absent(store: KeyValueStore) -> None:
    assert store.add_if_absent("k", b"first", None)
    assert not store.add_if_absent("k", b"second", None)
    assert store.get("k") == b"first"
    assert store.add_if_absent("brief", b"1", 0.3)
    assert not store.add_if_absent("brief", b"2", 0.3)
    time.sleep(0.45)
    assert store.add_if_absent("brief", b"3", None)  # an expired key counts as absent
    assert store.get("brief") == b"3"


def test_add_if_absent_has_exactly_one_winner_among_threads(store: KeyValueStore) -> None:
    winners: list[int] = []
    barrier = threading.Barrier(8)

    def race(n: int) -> None:
        barrier.wait()
        if store.add_if_absent("contended", str(n).encode(), 30):
            winners.append(n)

    threads = [threading.Thread(target=race, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(winners) == 1
    assert store.get("contended") == str(winners[0]).encode()


def test_get_many(store: KeyValueStore) -> None:
    for n in range(20):
        store.put(f"k{n}", f"v{n}".encode(), None)
    keys = [f"k{n}" for n in range(0, 30, 2)]
    assert store.get_many(keys) == {f"k{n}": f"v{n}".encode() for n in range(0, 20, 2)}
    assert store.get_many([]) == {}


def test_wait_returns_a_present_key_at_once(store: KeyValueStore) -> None:
    store.put("there", b"v", None)
    started = time.monotonic()
    assert store.wait("there", 5) == b"v"
    assert time.monotonic() - started < 0.5


def test_wait_gives_up_after_the_timeout(store: KeyValueStore) -> None:
    started = time.monotonic()
    assert store.wait("never", 0.3) is None
    took = time.monotonic() - started
    assert 0.28 <= took < 1.0
    assert store.wait("never", 0) is None


def test_wait_wakes_when_another_thread_puts(store: KeyValueStore) -> None:
    timer = threading.Timer(0.2, store.put, args=("later", b"here", None))
    started = time.monotonic()
    timer.start()
    try:
        assert store.wait("later", 10) == b"here"
    finally:
        timer.cancel()
    assert time.monotonic() - started < 1.0


def test_namespaces_and_queues_are_separate(broker_and_queue: tuple[Broker, str]) -> None:
    broker, queue = broker_and_queue
    one = broker.key_value_store(queue, "one")
    assert broker.key_value_store(queue, "one") is one
    two = broker.key_value_store(queue, "two")
    other_queue = broker.key_value_store(queue + "_other", "one")
    one.put("k", b"1", None)
    assert two.get("k") is None
    assert other_queue.get("k") is None
    with pytest.raises(ValueError):
        broker.key_value_store(queue, "bad namespace!")
    with pytest.raises(ValueError):
        broker.key_value_store(queue, "")


# -- memory ------------------------------------------------------------------------------------------


def test_memory_store_purges_expired_keys_on_writes() -> None:
    store = MemoryKeyValueStore()
    for n in range(100):
        store.put(f"k{n}", b"v", 0.05)
    store.put("kept", b"v", None)
    time.sleep(0.1)
    store.put("trigger", b"v", None)  # a write sweeps what expired
    assert len(store) == 2


# -- SQLite ------------------------------------------------------------------------------------------


def test_sqlite_store_file_sits_beside_the_queue_file(isolated_settings: Path) -> None:
    broker = get_broker(BrokerEnum.PERSISTQUEUE)
    store = broker.key_value_store("orders", "results")
    assert isinstance(store, SqliteKeyValueStore)
    store.put("k", b"v", None)
    assert Path(store.path) == isolated_settings / "orders@results.sqlite3"
    assert broker.path("orders") == isolated_settings / "orders.sqlite3"
    # A queue named like "<queue>.<namespace>" has a file of its own, never the store's.
    assert broker.path("orders.results") != Path(store.path)
    odd = broker.key_value_store("a queue/with odd:chars", "results")
    odd.put("k", b"v", None)
    assert Path(odd.path).parent == isolated_settings
    assert Path(odd.path).name.endswith("@results.sqlite3")


def test_sqlite_store_sweeps_expired_rows(tmp_path: Path) -> None:
    store = SqliteKeyValueStore(tmp_path / "kv.sqlite3")
    for n in range(10):
        store.put(f"k{n}", b"v", 0.05)
    store.put("kept", b"v", None)
    time.sleep(0.1)
    assert store.keys() == ["kept"]
    assert store.purge_expired() == 10
    assert store.purge_expired() == 0


_CHILD_PUT = """
import sys, time
from funboost_like.core.stores import SqliteKeyValueStore
time.sleep(float(sys.argv[2]))
SqliteKeyValueStore(sys.argv[1]).put("from-child", b"hello from another process", 60)
"""

_CHILD_RACE = """
import sys
from funboost_like.core.stores import SqliteKeyValueStore
store = SqliteKeyValueStore(sys.argv[1])
sys.stdout.write("won" if store.add_if_absent("prize", sys.argv[2].encode(), 60) else "lost")
"""


def test_sqlite_store_wait_sees_a_put_of_another_process(tmp_path: Path, isolated_settings: Path) -> None:
    path = tmp_path / "shared@results.sqlite3"
    store = SqliteKeyValueStore(path)
    assert store.get("from-child") is None  # the file exists before the child opens it
    child = subprocess.Popen([sys.executable, "-c", _CHILD_PUT, str(path), "0.5"],
                             env=subprocess_env(isolated_settings))
    try:
        started = time.monotonic()
        assert store.wait("from-child", 30) == b"hello from another process"
        assert time.monotonic() - started >= 0.3
    finally:
        assert child.wait(30) == 0


def test_sqlite_add_if_absent_has_one_winner_among_processes(tmp_path: Path, isolated_settings: Path) -> None:
    path = tmp_path / "race.sqlite3"
    SqliteKeyValueStore(path).get("prize")
    children = [subprocess.Popen([sys.executable, "-c", _CHILD_RACE, str(path), str(n)], stdout=subprocess.PIPE,
                                 env=subprocess_env(isolated_settings)) for n in range(4)]
    outputs = [child.communicate(timeout=60)[0].decode() for child in children]
    assert sorted(outputs) == ["lost", "lost", "lost", "won"]
    winner = outputs.index("won")
    assert SqliteKeyValueStore(path).get("prize") == str(winner).encode()


def _put_in_forked_child(store: SqliteKeyValueStore) -> None:
    store.put("from-fork", b"forked", None)


@pytest.mark.skipif(sys.platform == "win32" or "fork" not in multiprocessing.get_all_start_methods(),
                    reason="needs fork")
def test_sqlite_store_is_fork_safe(tmp_path: Path) -> None:
    store = SqliteKeyValueStore(tmp_path / "fork.sqlite3")
    store.put("before", b"parent", None)  # the parent holds an open connection when forking
    child = multiprocessing.get_context("fork").Process(target=_put_in_forked_child, args=(store,))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert store.get("from-fork") == b"forked"
    assert store.get("before") == b"parent"


# -- Redis -------------------------------------------------------------------------------------------


def test_redis_store_key_layout_and_expiry() -> None:
    broker = redis_broker()
    queue = f"test_kv_{uuid.uuid4().hex[:8]}"
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        store = broker.key_value_store(queue, "results")
        store.put("task-1", b"v", 10)
        store.put("task-2", b"v", None)
        assert client.get(f"fl:{{{queue}}}:results:task-1") == b"v"
        assert 0 < client.pttl(f"fl:{{{queue}}}:results:task-1") <= 10_000
        assert client.pttl(f"fl:{{{queue}}}:results:task-2") == -1
        with pytest.raises(ValueError):
            broker.key_value_store(queue, "inflight")  # the broker's own keys
    finally:
        redis_cleanup(queue)
        client.close()
