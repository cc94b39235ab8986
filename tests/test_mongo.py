"""Behaviour of the MONGOMQ broker beyond the shared contract suite, on SecantusDB (the MongoDB
stand-in, DESIGN §8; tests/mongo_server.py starts it when nothing listens on 127.0.0.1:27117).

Two consumer processes on one collection, a lease running out into another consumer's take,
ids never reused, records expiring before the server's TTL monitor runs, collections and indexes made
on first use and never at import, passwords kept out of logs and errors. Every test drops the
collections of its queue.
"""

from __future__ import annotations

import collections
import logging
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from funboost_like import BrokerEnum, task_deco
from funboost_like.brokers.maintenance import maintenance
from funboost_like.brokers.registry import get_broker
from funboost_like.core.config import patch_frame_config, settings
from funboost_like.core.errors import BrokerConnectionError, ConfigurationError

from .conftest import require_server, subprocess_env
from .mongo_server import HOST, PORT, URL

pymongo = pytest.importorskip("pymongo")

from funboost_like.brokers.mongo import MongoBroker, collection_base  # noqa: E402


@pytest.fixture
def mongo() -> None:
    require_server("MongoDB (SecantusDB)", HOST, PORT)
    patch_frame_config(MONGO_URL=URL)


@pytest.fixture
def broker(mongo: None, queue_name: str) -> Iterator[MongoBroker]:
    b = MongoBroker()
    yield b
    b.drop_collections(queue_name)
    b.close()


def names(broker: MongoBroker) -> set[str]:
    return set(broker.database().list_collection_names())


CONSUMER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from funboost_like.brokers.registry import get_broker

    queue, sync = sys.argv[1], Path(sys.argv[2])
    broker = get_broker(5)
    broker.count(queue)  # connected: ready
    (sync / f"ready-{sys.argv[3]}").touch()
    while not (sync / "go").exists():
        time.sleep(0.005)
    seen, idle_since = [], time.monotonic()
    while time.monotonic() - idle_since < 1.5:
        got = broker.fetch(queue, 1 + len(seen) % 7, 0.1)  # single takes and batches of up to 7
        if got:
            seen += [d.body.decode() for d in got]
            broker.ack(got)
            idle_since = time.monotonic()
    print(" ".join(seen))
    """
)


def test_two_consumer_processes_never_take_one_message_twice(broker: MongoBroker, queue_name: str,
                                                             tmp_path: Path) -> None:
    total = 300
    broker.publish_many(queue_name, [str(i).encode() for i in range(total)])
    sync = tmp_path / "sync"
    sync.mkdir()
    env = subprocess_env(tmp_path / "sqlite_queues", FUNBOOST_LIKE_MONGO_URL=URL)
    children = [subprocess.Popen([sys.executable, "-c", CONSUMER, queue_name, str(sync), str(i)], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        deadline = time.monotonic() + 30
        while len(list(sync.glob("ready-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        (sync / "go").touch()
        outputs = [child.communicate(timeout=90) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait(5)
    assert [child.returncode for child in children] == [0, 0], [err for _, err in outputs]
    per_child = [out.split() for out, _ in outputs]
    counts = collections.Counter(body for seen in per_child for body in seen)
    assert set(counts) == {str(i) for i in range(total)}
    assert set(counts.values()) == {1}
    assert all(per_child)  # both really took part
    assert broker.count(queue_name) == 0


def test_a_lease_that_ran_out_goes_to_the_next_taker_with_the_death_counted(broker: MongoBroker,
                                                                          queue_name: str) -> None:
    patch_frame_config(MONGO_LEASE_SECONDS=0.3)
    broker.publish_many(queue_name, [b"a", b"b"])
    held = broker.fetch(queue_name, 2, 1.0)
    maintenance.discard(broker)  # its leases are no longer renewed: as if its process had died
    assert [d.body for d in held] == [b"a", b"b"]
    other = MongoBroker()  # another consumer (another owner)
    try:
        assert other.fetch(queue_name, 2, 0.05) == []
        time.sleep(0.35)
        again = other.fetch(queue_name, 2, 1.0)
        assert [(d.body, d.attempts, d.crashes) for d in again] == [(b"a", 2, 1), (b"b", 2, 1)]
        broker.ack(held)  # late: no longer its rows, so nothing happens
        assert broker.count(queue_name) == 0 and other.fetch(queue_name, 2, 0.05) == []
        other.ack(again)
        assert other.database()[f"fl.q.{queue_name}"].count_documents({}) == 0
    finally:
        other.close()


def test_ids_increase_and_are_never_reused(broker: MongoBroker, queue_name: str) -> None:
    broker.publish_many(queue_name, [b"1", b"2"])
    first = broker.fetch(queue_name, 2, 1.0)
    broker.ack(first)
    broker.publish(queue_name, b"3")
    assert broker.purge(queue_name) == 1
    broker.publish(queue_name, b"4")
    [last] = broker.fetch(queue_name, 1, 1.0)
    assert [d.token for d in first] == [1, 2] and last.token == 4
    broker.ack([last])


def test_records_expire_before_the_ttl_monitor_runs(broker: MongoBroker, queue_name: str) -> None:
    store = broker.key_value_store(queue_name, "results")
    store.put("short", b"1", 0.2)
    store.put("kept", b"2", None)
    assert store.add_if_absent("short", b"other", None) is False
    kv = broker.database()[f"fl.kv.{queue_name}"]
    [ttl] = [index for index in kv.list_indexes() if index["name"] == "ttl"]
    assert dict(ttl["key"]) == {"expires_at": 1} and ttl["expireAfterSeconds"] == 0
    time.sleep(0.3)
    assert kv.count_documents({}) == 2  # still stored (the server's monitor runs every 60 s) ...
    assert store.get("short") is None and store.get_many(["short", "kept"]) == {"kept": b"2"}  # ... invisible
    assert store.add_if_absent("short", b"new", 5) is True and store.get("short") == b"new"  # taken over
    store.put("gone", b"3", 0.05)
    time.sleep(0.1)
    assert store.purge_expired() == 1 and kv.count_documents({}) == 2


def test_collections_and_indexes_are_made_on_first_use_never_at_import(mongo: None, queue_name: str,
                                                                        tmp_path: Path) -> None:
    code = ("import funboost_like, funboost_like.brokers.mongo\n"
            "from funboost_like import task_deco\n"
            "from funboost_like.brokers.registry import get_broker\n"
            "get_broker(5)\n"
            f"task_deco({queue_name!r}, broker_kind=5)(lambda x: x)\n")
    env = subprocess_env(tmp_path / "sqlite_queues", FUNBOOST_LIKE_MONGO_URL="mongodb://127.0.0.1:1/nothing_there")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr  # no server reached: nothing was asked of one
    broker = get_broker(BrokerEnum.MONGOMQ)
    assert isinstance(broker, MongoBroker)
    try:
        assert not {f"fl.q.{queue_name}", f"fl.dl.{queue_name}"} & names(broker)
        broker.publish(queue_name, b"{}")
        assert {f"fl.q.{queue_name}", f"fl.dl.{queue_name}"} <= names(broker)
        assert f"fl.kv.{queue_name}" not in names(broker)  # made by the first use of the records
        take = broker.database()[f"fl.q.{queue_name}"].index_information()["take"]
        assert take["key"] == [("priority", -1), ("_id", 1), ("visible_at", 1)]
    finally:
        broker.drop_collections(queue_name)
    assert not {f"fl.q.{queue_name}", f"fl.dl.{queue_name}"} & names(broker)


def test_password_never_reaches_a_log_or_an_error(caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cretPW"
    patch_frame_config(MONGO_URL=f"mongodb://app:{secret}@127.0.0.1:1/jobs?serverSelectionTimeoutMS=300")
    assert secret not in repr(settings.as_dict())
    broker = MongoBroker()
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(BrokerConnectionError) as failed:
            broker.publish("jobs", b"{}")
        logging.getLogger("funboost_like").error("logged with the error: %s", failed.value, exc_info=failed.value)
    assert "127.0.0.1" in str(failed.value) and secret not in str(failed.value)
    assert secret not in caplog.text
    broker.close()
    patch_frame_config(MONGO_URL=f"mongodb://app:{secret}@127.0.0.1:notaport/jobs")
    with pytest.raises(ConfigurationError) as bad:
        MongoBroker().count("jobs")
    assert secret not in str(bad.value) and "***" in str(bad.value)


def test_collection_names() -> None:
    assert collection_base("orders.v2") == "orders.v2"
    odd = collection_base("a$b" + "x" * 300)
    assert len(odd) <= 72 and "$" not in odd and odd != collection_base("a$c" + "x" * 300)


def test_end_to_end_with_rpc_results(mongo: None, queue_name: str) -> None:
    @task_deco(queue_name, broker_kind=BrokerEnum.MONGOMQ, is_using_rpc_mode=True, concurrent_num=2)
    def add(x: int, y: int) -> int:
        return x + y

    try:
        add.consume()
        assert add.push(1, 2).result == 3  # type: ignore[union-attr]
    finally:
        add.stop()
        broker = get_broker(BrokerEnum.MONGOMQ)
        assert isinstance(broker, MongoBroker)
        broker.drop_collections(queue_name)


def test_single_pushes_take_their_ids_from_a_block_and_a_forked_child_reserves_its_own(
        broker: MongoBroker, queue_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each push was two writes (the counter's $inc, then the insert): half the one-by-one rate of one
    insert. Now a block of ids serves the pushes of the next 0.1 s. A forked child must not hand out its
    parent's block (a duplicate id would fail the insert)."""
    from funboost_like.brokers import mongo as mongo_module
    from funboost_like.brokers.mongo import ID_BLOCK, SEQUENCES

    from .conftest import in_forked_child

    monkeypatch.setattr(mongo_module, "ID_BLOCK_SECONDS", 60.0)  # the block outlives a slow fork

    counter = broker.database()[SEQUENCES]
    name = f"fl.q.{collection_base(queue_name)}"
    broker.publish(queue_name, b'{"x": 0}')
    broker.publish(queue_name, b'{"x": 1}')
    assert counter.find_one({"_id": name})["n"] == ID_BLOCK  # one $inc for both

    def push_in_child() -> str:
        broker.publish(queue_name, b'{"x": 2}')
        return "ok"

    assert in_forked_child(push_in_child) == "ok"
    broker.publish(queue_name, b'{"x": 3}')
    assert counter.find_one({"_id": name})["n"] == 2 * ID_BLOCK  # the child's block
    got = broker.fetch(queue_name, 10, 1.0)
    assert [d.body for d in got] == [b'{"x": 0}', b'{"x": 1}', b'{"x": 3}', b'{"x": 2}']  # ids: 1, 2, 3; 33
    broker.ack(got)
