"""The operations registry: queues known from their first publish, worker records with heartbeats,
stale records shown as such and then gone, and the setting that turns it all off."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from funboost_like import BrokerEnum, patch_frame_config, task_deco
from funboost_like.brokers.registry import get_broker
from funboost_like.core.errors import BrokerConnectionError
from funboost_like.ops import registry
from funboost_like.ops.service import OpsService
from tests.conftest import OPS_REDIS_LOCK, in_forked_child, lock_path, subprocess_env
from tests.standin import port_for_another_process

pytestmark = pytest.mark.ops_registry


def wait_for(check: Callable[[], Any], timeout: float = 5.0, what: str | Callable[[], str] = "the condition") -> Any:
    """Poll ``check`` until it returns something true; fail after ``timeout`` seconds (``what`` may be a
    function: it is called then, to describe the state at the failure)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what() if callable(what) else what}")
        time.sleep(0.02)


@pytest.fixture
def fast_beats() -> None:
    patch_frame_config(OPS_HEARTBEAT_SECONDS=0.2)


def test_a_queue_is_known_from_its_first_publish(queue_name: str) -> None:
    @task_deco(queue_name, broker_kind=BrokerEnum.PERSISTQUEUE)
    def f(x: int) -> None:
        return None

    service = OpsService()
    assert queue_name not in [q["queue"] for q in service.queues()]
    for i in range(3):
        f.push(i)
    [row] = [q for q in service.queues() if q["queue"] == queue_name]
    assert row["broker"] == "PERSISTQUEUE" and row["depth"] == 3 and row["consumers"] == 0
    store = registry.ops_store(f.broker)
    assert registry.known_queue(store, queue_name)
    assert service.kind_of(queue_name) == BrokerEnum.PERSISTQUEUE
    assert BrokerEnum.PERSISTQUEUE in registry.used_kinds()


def test_a_running_consumer_registers_and_beats(queue_name: str, fast_beats: None) -> None:
    @task_deco(queue_name, broker_kind=BrokerEnum.MEMORY, concurrent_num=4, log_level=logging.WARNING)
    def f(x: int) -> None:
        return None

    f.consume()
    service = OpsService(kinds=[BrokerEnum.MEMORY])
    [worker] = wait_for(lambda: service.workers(queue_name), what="the worker record")
    assert worker["pid"] == os.getpid() and worker["broker"] == "LOCAL_PYTHON_QUEUE"
    assert worker["concurrent_num"] == 4 and worker["params"]["function"].endswith("f")
    assert worker["stale"] is False and worker["paused"] is False
    assert "password" not in str(worker).lower()
    first_beat = worker["beat_at"]
    wait_for(lambda: service.workers(queue_name)[0]["beat_at"] > first_beat, what="a second heartbeat")
    for i in range(20):
        f.push(i)
    wait_for(lambda: service.workers(queue_name)[0]["succeeded"] == 20, what="the counts in the record")
    assert [q["consumers"] for q in service.queues() if q["queue"] == queue_name] == [1]
    f.consumer.stop()
    assert f.consumer.join(5)
    assert service.workers(queue_name) == []  # a clean stop removes the record at once


def test_registration_can_be_turned_off(queue_name: str) -> None:
    patch_frame_config(OPS_REGISTRY=False)

    @task_deco(queue_name, broker_kind=BrokerEnum.MEMORY, log_level=logging.WARNING)
    def f(x: int) -> None:
        return None

    f.push(1)
    f.consume()
    assert not [m for m in f.consumer.middlewares if type(m).__name__ == "OpsMiddleware"]
    time.sleep(0.3)  # a registering consumer would have written its record by now
    service = OpsService(kinds=[BrokerEnum.MEMORY])
    assert service.queues() == [] and service.workers() == []


_WORKER = textwrap.dedent("""
    import logging, sys, time
    from funboost_like import BrokerEnum, task_deco

    @task_deco(sys.argv[1], broker_kind=BrokerEnum.PERSISTQUEUE, log_level=logging.WARNING)
    def f(x):
        time.sleep(0.01)

    f.consume()
""")


def test_a_killed_consumer_is_shown_stale_then_expires(queue_name: str, isolated_settings: Path, tmp_path: Path,
                                                       children: list[subprocess.Popen[bytes]]) -> None:
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    child = subprocess.Popen([sys.executable, str(script), queue_name],
                             env=subprocess_env(isolated_settings, FUNBOOST_LIKE_OPS_HEARTBEAT_SECONDS="0.2"))
    children.append(child)
    service = OpsService()
    [worker] = wait_for(lambda: service.workers(queue_name), timeout=15, what="the child's worker record")
    assert worker["pid"] == child.pid and not worker["stale"]
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    killed_at = time.monotonic()
    [stale] = wait_for(lambda: [w for w in service.workers(queue_name) if w["stale"]], what="a stale record")
    assert time.monotonic() - killed_at < 2.0  # 3 beats of 0.2 s, give or take a beat
    assert [q["stale_consumers"] for q in service.queues() if q["queue"] == queue_name] == [1]
    wait_for(lambda: service.workers(queue_name) == [], what="the record to expire")  # 10 beats


def test_tests_of_the_registry_in_redis_run_one_at_a_time(ops_registry_in_redis: str) -> None:
    """Each test using ``ops_registry_in_redis`` deletes every registry record at its teardown, so no other
    process may hold the fixture meanwhile: no other pytest-xdist worker, no other test session. (An
    ``xdist_group`` mark, ignored by pytest 9.2 with pytest-xdist 3.8, was all that kept them apart: the
    teardown of one deleted the control record another had just written, and the ZeroMQ worker of
    the ops-store test below resumed before it had reported the pause.)"""
    fcntl = pytest.importorskip("fcntl")  # no lock on Windows

    def try_the_lock() -> str:
        with open(lock_path(OPS_REDIS_LOCK), "ab") as handle:  # a new open file: its own flock
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return "held"
            return "taken"

    assert in_forked_child(try_the_lock) == "held"


def test_the_registry_lives_in_redis(queue_name: str, ops_registry_in_redis: str, fast_beats: None) -> None:
    @task_deco(queue_name, broker_kind=BrokerEnum.REDIS_ACK_ABLE, log_level=logging.WARNING)
    def f(x: int) -> None:
        return None

    f.push(1)
    f.consume()
    service = OpsService(kinds=[BrokerEnum.REDIS_ACK_ABLE])
    [worker] = wait_for(lambda: service.workers(queue_name), what="the worker record in Redis")
    assert worker["broker"] == "REDIS_ACK_ABLE"
    assert service.kind_of(queue_name) == BrokerEnum.REDIS_ACK_ABLE
    assert BrokerEnum.REDIS_ACK_ABLE in registry.used_kinds()  # this host's index names the kind
    wait_for(lambda: service.status(queue_name)["depth"] == 0, what="the message to be consumed")
    f.clear()


def test_a_broker_without_key_value_records_keeps_its_registry_in_the_embedded_store(
        isolated_settings: Path) -> None:
    from funboost_like.brokers.base import Broker, Capabilities
    from funboost_like.core.stores import SqliteKeyValueStore

    class Plain(Broker):
        kind = BrokerEnum.MQTT
        capabilities = Capabilities()

    store = registry.ops_store(Plain())
    assert isinstance(store, SqliteKeyValueStore) and Path(store.path).parent == isolated_settings
    registry.index_queue(store, "a", int(BrokerEnum.MQTT))
    registry.index_queue(store, "b", int(BrokerEnum.MQTT))
    registry.index_queue(store, "a", int(BrokerEnum.MQTT))  # once only
    assert [q["queue"] for q in registry.queues(store)] == ["a", "b"]
    slots = [registry.claim_worker_slot(store, {"id": str(n), "beat_at": time.time(), "interval": 2.0}, 2.0)
             for n in range(registry.BLOCK + 2)]  # past the first block of slots
    assert slots == list(range(registry.BLOCK + 2))
    assert len(registry.workers(store)) == registry.BLOCK + 2
    registry.release_worker_slot(store, 3, "3")
    assert registry.claim_worker_slot(store, {"id": "new", "beat_at": time.time()}, 2.0) == 3  # lowest free


_ZEROMQ_WORKER = textwrap.dedent("""
    import faulthandler, logging, signal, sys
    from funboost_like import BrokerEnum, task_deco

    faulthandler.register(signal.SIGUSR1)  # the test asks for every thread's stack when a wait fails

    @task_deco(sys.argv[1], broker_kind=BrokerEnum.ZEROMQ, log_level=logging.INFO)
    def f(x):
        return x

    f.consume()
""")


def test_a_broker_without_key_value_records_shares_its_registry_through_ops_store_broker(
        isolated_settings: Path, tmp_path: Path, ops_registry_in_redis: str, fast_beats: None,
        children: list[subprocess.Popen[bytes]]) -> None:
    """A ZeroMQ consumer on "host A" (its own data folder) and the CLI's service on "host B" (another one)
    meet in the Redis records named by OPS_STORE_BROKER: B finds the kind, the worker, and pauses it."""
    pytest.importorskip("zmq")
    port = str(port_for_another_process())  # the child's hub binds it
    host_a = tmp_path / "host_a"
    script = tmp_path / "zeromq_worker.py"
    script.write_text(_ZEROMQ_WORKER)
    log = tmp_path / "worker.log"
    with open(log, "wb") as output:  # shown if a wait fails: this test was rerun three times in CI
        child = subprocess.Popen([sys.executable, str(script), port], stdout=output, stderr=subprocess.STDOUT,
                                 env=subprocess_env(host_a, FUNBOOST_LIKE_OPS_HEARTBEAT_SECONDS="0.2",
                                                    FUNBOOST_LIKE_OPS_STORE_BROKER="REDIS",
                                                    FUNBOOST_LIKE_REDIS_URL=ops_registry_in_redis))
    children.append(child)
    patch_frame_config(OPS_STORE_BROKER="REDIS")  # host B: isolated_settings' folder, never used by the child

    def seen(what: str) -> str:
        if child.poll() is None:  # where its threads are (this test was rerun in CI: the pause never showed)
            child.send_signal(signal.SIGUSR1)
            time.sleep(0.5)
        return f"{what} (worker {'exited ' + str(child.poll()) if child.poll() is not None else 'running'}; " \
               f"its output: {log.read_text('utf-8', 'replace')[-6000:]!r})"

    service = OpsService()  # no kinds named: the shared store says which kinds the hosts used
    [worker] = wait_for(lambda: BrokerEnum.ZEROMQ in service.kinds() and service.workers(port), timeout=30,
                        what=lambda: seen("the ZeroMQ worker's record in Redis"))
    assert worker["pid"] == child.pid and worker["broker"] == "ZEROMQ" and worker["paused"] is False
    service.pause(port)
    wait_for(lambda: any(w["paused"] for w in service.workers(port)), timeout=15,
             what=lambda: seen("the child to see the pause"))
    assert not (isolated_settings / f"{registry.OPS_QUEUE}@kind{int(BrokerEnum.ZEROMQ)}.sqlite3").exists()


def test_ops_store_broker_must_have_key_value_records(isolated_settings: Path) -> None:
    from funboost_like.brokers.registry import get_broker
    from funboost_like.core.errors import ConfigurationError

    patch_frame_config(OPS_STORE_BROKER="ZEROMQ")
    with pytest.raises(ConfigurationError, match="OPS_STORE_BROKER='ZEROMQ'.*no key-value records"):
        registry.ops_store(get_broker(BrokerEnum.KAFKA))


def test_a_queue_is_indexed_after_its_first_publish_that_reached_the_server(
        queue_name: str, ops_registry_in_redis: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not before it: a publish to an unreachable server then waits out one timeout, not two (one for the
    registry's write, one for the publish)."""
    from .tcp_cut import CuttableLink

    writes: list[str] = []
    index_queue = registry.index_queue
    monkeypatch.setattr(registry, "index_queue",
                        lambda store, queue, kind: (writes.append(queue), index_queue(store, queue, kind)))
    link = CuttableLink(6379)
    try:
        patch_frame_config(REDIS_URL=f"redis://127.0.0.1:{link.port}/14")
        link.cut()

        @task_deco(queue_name, broker_kind=BrokerEnum.REDIS_ACK_ABLE)
        def f(x: int) -> None:
            return None

        with pytest.raises(BrokerConnectionError):
            f.push(1)
        assert writes == [] and registry.retries.pending() == []
        link.restore()
        f.push(2)
        f.push(3)
        assert writes == [queue_name]
        assert registry.known_queue(registry.ops_store(f.broker), queue_name)
    finally:
        link.close()


def test_a_queue_whose_record_failed_is_recorded_once_the_store_is_back(
        queue_name: str, ops_registry_in_redis: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A consumer (or publisher) that met its store down records its queue later, without waiting for it."""
    from funboost_like.brokers.registry import get_broker

    from .tcp_cut import CuttableLink

    monkeypatch.setattr(registry, "RETRY_SECONDS", 0.05)
    link = CuttableLink(6379)
    try:
        patch_frame_config(REDIS_URL=f"redis://127.0.0.1:{link.port}/14")
        broker = get_broker(BrokerEnum.REDIS_ACK_ABLE)
        link.cut()
        with caplog.at_level(logging.WARNING, logger="funboost_like.ops"):
            registry.note_queue(broker, queue_name)  # never raises
        assert "trying again in the background" in caplog.text
        time.sleep(0.3)  # retries meanwhile fail
        assert registry.retries.pending() == [queue_name]
        link.restore()
        wait_for(lambda: registry.known_queue(registry.ops_store(broker), queue_name), what="the retried record")
        assert registry.retries.pending() == []
        wait_for(lambda: not any(t.name == "funboost_like-ops-retries" for t in threading.enumerate()),
                 what="the retry thread to end")
    finally:
        link.close()


def test_a_command_on_a_queue_is_not_held_up_by_a_broker_that_does_not_answer(queue_name: str) -> None:
    """This host once used MongoDB, whose server now accepts connections and says nothing: looking a queue
    up read every used broker in turn, so every command waited out MongoDB's timeout first."""
    import socket

    silent = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel does), never answers
    try:
        patch_frame_config(MONGO_URL=f"mongodb://127.0.0.1:{silent.getsockname()[1]}/t?serverSelectionTimeoutMS=6000")
        registry.note_kind(int(BrokerEnum.MONGOMQ))

        @task_deco(queue_name, broker_kind=BrokerEnum.PERSISTQUEUE)
        def f(x: int) -> None:
            return None

        f.push(1)
        service = OpsService()
        assert BrokerEnum.MONGOMQ in service.kinds()
        started = time.monotonic()
        assert service.kind_of(queue_name) == BrokerEnum.PERSISTQUEUE
        assert time.monotonic() - started < 3.0
        assert service.status(queue_name)["depth"] == 1
    finally:
        silent.close()


def test_a_listing_asks_a_broker_that_does_not_answer_once_not_once_a_queue(queue_name: str) -> None:
    """Listing the queues counted each queue of a broker that was down in turn, each waiting out the client's
    timeout: with a Pulsar server gone, ``funboost_like queues`` took 10 s per Pulsar queue (2.5 minutes
    on a host that had used 16 of them), and the dashboard's page as long."""
    import socket

    silent = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel does), never answers
    try:
        patch_frame_config(HTTPSQS_URL=f"http://127.0.0.1:{silent.getsockname()[1]}/", HTTPSQS_TIMEOUT_SECONDS=1.0)
        registry.note_kind(int(BrokerEnum.HTTPSQS))
        store = registry.ops_store(get_broker(BrokerEnum.HTTPSQS))
        for n in range(4):
            registry.index_queue(store, f"{queue_name}_{n}", int(BrokerEnum.HTTPSQS))

        @task_deco(queue_name, broker_kind=BrokerEnum.PERSISTQUEUE)
        def f(x: int) -> None:
            return None

        f.push(1)
        service = OpsService()
        started = time.monotonic()
        rows = {(row["queue"], row["broker"]): row for row in service.queues()}
        took = time.monotonic() - started
        assert rows[(queue_name, "PERSISTQUEUE")]["depth"] == 1
        assert [rows[(f"{queue_name}_{n}", "HTTPSQS")]["depth"] for n in range(4)] == [None] * 4
        assert all("unreachable" in rows[(f"{queue_name}_{n}", "HTTPSQS")]["error"] for n in range(4))
        assert [e for e in service.errors if e.startswith("HTTPSQS: depths not read")], service.errors
        assert took < 3.0, f"{took:.1f} s"  # one timeout of 1 s, not four
    finally:
        silent.close()
