"""ZeroMQ (kind ZEROMQ): what the contract suite does not cover.

No server: the broker starts the hub of a port itself (a process of its own); every test here uses a
free port of its own and stops that hub at the end.
"""

from __future__ import annotations

import collections
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from funboost_like import BrokerEnum, task_deco
from funboost_like.brokers.registry import get_broker
from funboost_like.brokers.zeromq_broker import ZeroMqBroker, listening
from funboost_like.core import runtime
from funboost_like.core.config import patch_frame_config
from funboost_like.core.errors import BrokerConnectionError

from .conftest import subprocess_env
from .standin import free_port, port_for_another_process

pytest.importorskip("zmq")

WORKER = Path(__file__).with_name("contract_worker.py")  # concurrent_num=4, records "s|d <i> <pid>" lines


@pytest.fixture
def port_queue() -> Iterator[str]:
    """A queue named after a free port; its hub (if one was started) is stopped at the end, after the
    consumers (a consumer starts a hub again when it finds none)."""
    queue = str(port_for_another_process())  # a hub process binds it
    patch_frame_config(ZEROMQ_HUB_IDLE_SECONDS=30.0)  # a hub left behind by accident goes away soon
    yield queue
    runtime.stop_all(timeout=10)
    patch_frame_config(ZEROMQ_HOST="127.0.0.1")  # a test may have pointed it elsewhere
    if listening("127.0.0.1", int(queue)):
        broker = get_broker(BrokerEnum.ZEROMQ)
        assert isinstance(broker, ZeroMqBroker)
        broker.stop_hub(queue)


def plain(x: int) -> int:
    return x


def test_queue_names_are_ports_checked_at_decoration_time() -> None:
    for bad in ("queue_a", "80", "65536", "030778", "3.5", "30778 "):
        with pytest.raises(ValueError, match="TCP port"):
            task_deco(bad, broker_kind=BrokerEnum.ZEROMQ)(plain)
    assert task_deco("30778", broker_kind=BrokerEnum.ZEROMQ)(plain)(3) == 3  # no I/O at decoration time
    patch_frame_config(ZEROMQ_PORT=30779)  # named queues, all in the hub of that port
    task_deco("queue_a", broker_kind=BrokerEnum.ZEROMQ)(plain)


def test_capabilities_refuse_what_the_hub_does_not_keep() -> None:
    for unsupported in ({"is_using_rpc_mode": True}, {"do_task_filtering": True},
                        {"broker_exclusive_config": {"exchange_name": "x", "exchange_type": "fanout"}}):
        with pytest.raises(ValueError):
            task_deco("30778", broker_kind=BrokerEnum.ZEROMQ, **unsupported)(plain)  # type: ignore[call-overload]


def test_publish_first_starts_the_hub_and_it_keeps_the_calls_for_the_consumer(port_queue: str) -> None:
    ran: list[int] = []
    all_ran = threading.Event()

    @task_deco(port_queue, broker_kind=BrokerEnum.ZEROMQ, concurrent_num=8)
    def double(x: int) -> None:
        ran.append(x * 2)
        if len(ran) == 30:
            all_ran.set()

    assert not listening("127.0.0.1", int(port_queue))
    for i in range(10):
        double.push(i)
    double.publish_many([{"x": i} for i in range(10, 30)])
    assert double.get_message_count() == 30  # a publish returns once the hub holds the message
    double.consume()
    assert all_ran.wait(20)
    assert sorted(ran) == [2 * i for i in range(30)]
    assert double.get_message_count() == 0


def test_a_hub_that_stopped_is_started_again_and_unreachable_hosts_fail_clearly(port_queue: str) -> None:
    broker = get_broker(BrokerEnum.ZEROMQ)
    assert isinstance(broker, ZeroMqBroker)
    broker.publish(port_queue, b"{}")
    first = broker.stop_hub(port_queue)  # what it held is gone with it
    assert broker.count(port_queue) == 0 and broker.ping(port_queue) != first
    patch_frame_config(ZEROMQ_HOST="192.0.2.1", ZEROMQ_TIMEOUT_SECONDS=0.5)  # TEST-NET-1: nothing there
    other = ZeroMqBroker()
    try:
        with pytest.raises(BrokerConnectionError, match="nothing listens on tcp://192.0.2.1"):
            other.publish(str(free_port()), b"{}")
    finally:
        other.close()


def test_an_unreachable_hub_is_named_in_a_sentence() -> None:
    """The error read "the ZeroMQ hubs at 192.0.2.1 is unreachable while ..."."""
    patch_frame_config(ZEROMQ_HOST="192.0.2.1", ZEROMQ_TIMEOUT_SECONDS=0.5)  # TEST-NET-1: nothing there
    broker = ZeroMqBroker()
    try:
        with pytest.raises(BrokerConnectionError, match=r"^ZeroMQ at 192\.0\.2\.1 is unreachable while publishing"):
            broker.publish(str(free_port()), b"{}")
    finally:
        broker.close()


def test_a_lone_push_polls_for_the_hubs_reply_and_a_batch_or_a_shared_moment_does_not(
        port_queue: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One-by-one pushes poll the DEALER socket for the hub's reply for a moment (as the Redis, NATS and
    MQTT publishers do, docs/performance.md); a batch waits blocking, and so does a push while another
    thread of the process talks to the hub, and for SHARED_QUIET_SECONDS after."""
    from funboost_like.brokers import socket_spin, zeromq_broker

    spins: list[float] = []
    real = zeromq_broker.spin
    monkeypatch.setattr(zeromq_broker, "spin", lambda ready, budget: (spins.append(budget), real(ready, budget))[-1])
    broker = ZeroMqBroker()
    try:
        broker.ping(port_queue)  # the hub started
        time.sleep(2 * socket_spin.SHARED_QUIET_SECONDS)
        for i in range(10):
            broker.publish(port_queue, json.dumps({"x": i}).encode())
        assert spins == [zeromq_broker.SPIN_SECONDS] * 10
        broker.publish_many(port_queue, [json.dumps({"x": i}).encode() for i in range(10, 30)])
        assert len(spins) == 10
        [link] = broker._links.values()
        assert not link.sharing.alone(2)  # another thread talks to the hub right now
        broker.publish(port_queue, b'{"x": 30}')
        assert len(spins) == 10
        time.sleep(2 * socket_spin.SHARED_QUIET_SECONDS)
        broker.publish(port_queue, b'{"x": 31}')
        assert len(spins) == 11 and broker.count(port_queue) == 32
    finally:
        broker.close()


def test_a_lone_push_stops_polling_for_the_hubs_reply_while_polling_is_the_slower_way(
        port_queue: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Polling for the reply of a hub (a process whose reply also needs the ZeroMQ I/O threads of both
    sides) took 0.3-0.6x of blocking's rate here: pushes measure both ways in turns and keep the faster
    (socket_spin.PollChoice, as the Redis kinds do; here each poll costs 2 ms)."""
    from funboost_like.brokers import socket_spin, zeromq_broker

    polled: list[float] = []
    monkeypatch.setattr(zeromq_broker, "spin", lambda ready, budget: (polled.append(budget), time.sleep(0.002)))
    broker = ZeroMqBroker()
    try:
        broker.ping(port_queue)  # the hub started
        time.sleep(2 * socket_spin.SHARED_QUIET_SECONDS)
        trial = socket_spin.PollChoice.TRIAL
        for i in range(2 * trial + 100):
            broker.publish(port_queue, json.dumps({"x": i}).encode())
        assert len(polled) == trial  # the polling trial, then blocking kept
        assert broker.count(port_queue) == 2 * trial + 100
    finally:
        broker.close()


def records(path: Path) -> tuple[collections.Counter[int], dict[int, set[int]], set[int]]:
    """(starts per call, calls started per pid, calls done)."""
    started: collections.Counter[int] = collections.Counter()
    by_pid: dict[int, set[int]] = collections.defaultdict(set)
    done: set[int] = set()
    if path.exists():
        for line in path.read_text().splitlines():
            kind, ident, pid = line.split()
            if kind == "s":
                started[int(ident)] += 1
                by_pid[int(pid)].add(int(ident))
            else:
                done.add(int(ident))
    return started, by_pid, done


def eventually(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_two_consumer_processes_share_a_port_and_a_kill_loses_at_most_what_it_held(
        port_queue: str, tmp_path: Path, children: list[subprocess.Popen[bytes]]) -> None:
    broker = get_broker(BrokerEnum.ZEROMQ)
    total = 48
    broker.ping(port_queue)  # the hub runs before the consumers come
    record, env = tmp_path / "record", subprocess_env(tmp_path / "sqlite_queues")
    logs = [tmp_path / f"worker-{n}.log" for n in range(2)]
    for path in logs:
        with open(path, "wb") as log:
            children.append(subprocess.Popen([sys.executable, str(WORKER), port_queue, str(int(BrokerEnum.ZEROMQ)),
                                              str(record), "plain"], env=env, stdout=log, stderr=subprocess.STDOUT))
    first, second = children
    eventually(lambda: all(b"consuming queue" in path.read_bytes() for path in logs), 30, "both consumers to start")
    broker.publish_many(port_queue, [json.dumps({"i": i, "seconds": 0.15}).encode() for i in range(total)])
    eventually(lambda: len(records(record)[1][first.pid]) >= 4 and len(records(record)[1][second.pid]) >= 1, 30,
               "both consumers to start calls")
    first.kill()
    first.wait(10)
    started, by_pid, done = records(record)
    held_at_kill = by_pid[first.pid] - done

    def finished() -> bool:
        started, by_pid, done = records(record)
        return broker.count(port_queue) == 0 and by_pid[second.pid] <= done

    eventually(finished, 30, "the second consumer to run every call left")
    started, by_pid, done = records(record)
    lost = set(range(total)) - done
    assert max(started.values()) == 1  # at-most-once: no call ran twice
    assert lost <= held_at_kill | (set(range(total)) - set(started))  # only what the killed consumer held
    assert len(lost) <= 4  # its concurrent_num: it never holds more than its free room
    assert by_pid[second.pid] - by_pid[first.pid] == by_pid[second.pid]
    print(f"lost {len(lost)} of {total} calls to one SIGKILL (held by the killed consumer: {len(held_at_kill)})")
