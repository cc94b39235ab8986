"""The machinery the base owns for every broker (brokers/base.py): the wait of fetch, held tokens,
settlements re-sent after an outage, error translation, fork safety and the maintenance threads.

The brokers here are the memory broker with one primitive changed, so each test shows what the base
does around a primitive, whatever the broker.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence

import pytest

from funboost_like import BrokerEnum, BrokerNotAvailable, ConcurrentModeEnum
from funboost_like.brokers import registry
from funboost_like.brokers.base import Delivery
from funboost_like.brokers.memory import MemoryBroker
from funboost_like.core.errors import BrokerConnectionError, BrokerError, DoubleAckError

from .conftest import in_forked_child, until

Q = "base_q"


class Flaky(MemoryBroker):
    """Its settling primitives fail on a 'connection error' while ``down`` is set."""

    connection_errors = (ConnectionResetError,)
    errors = (LookupError,)

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.acked: list[bytes] = []

    def _ack(self, deliveries: Sequence[Delivery]) -> None:
        if self.down:
            raise ConnectionResetError("server gone")
        self.acked.extend(d.body for d in deliveries)
        super()._ack(deliveries)


def test_a_settlement_lost_in_an_outage_is_sent_again_before_the_next_fetch() -> None:
    broker = Flaky()
    broker.publish_many(Q, [b"a", b"b"])
    got = broker.fetch(Q, 2, 1.0)
    broker.down = True
    with pytest.raises(BrokerConnectionError, match="server gone"):
        broker.ack(got)
    with pytest.raises(DoubleAckError):  # the base no longer holds them: it owns the re-send
        broker.ack(got[:1])
    assert broker.acked == []
    broker.down = False
    assert broker.fetch(Q, 5, 0.05) == []
    assert broker.acked == [b"a", b"b"] and broker.in_flight(Q) == 0


def test_client_errors_are_translated_with_the_cause_chained() -> None:
    class Broken(MemoryBroker):
        connection_errors = (ConnectionRefusedError,)
        errors = (LookupError,)

        def _put(self, queue: str, bodies: Sequence[bytes], *, priority: int, not_before: float | None) -> None:
            raise (ConnectionRefusedError if queue == "down" else KeyError)("no")

    broker = Broken()
    with pytest.raises(BrokerConnectionError, match="unreachable while publishing") as refused:
        broker.publish("down", b"x")
    assert isinstance(refused.value.__cause__, ConnectionRefusedError)
    with pytest.raises(BrokerError, match="failed publishing") as failed:
        broker.publish_many("other", [b"x"])
    assert isinstance(failed.value.__cause__, KeyError)


def test_a_broker_without_a_native_wait_is_polled_within_the_timeout() -> None:
    class NoWait(MemoryBroker):
        pass

    NoWait._wait = MemoryBroker.__mro__[1]._wait  # type: ignore[method-assign]  # the base's: no native wait
    broker = NoWait()
    assert not broker._waits
    started = time.monotonic()
    assert broker.fetch(Q, 1, 0.3) == []
    assert 0.29 <= time.monotonic() - started < 1.0
    threading.Timer(0.1, broker.publish, (Q, b"late")).start()
    started = time.monotonic()
    [d] = broker.fetch(Q, 1, 2.0)
    assert d.body == b"late" and time.monotonic() - started < 0.2  # the poll backs off to 50 ms at most


class Leased(MemoryBroker):
    """A memory broker with maintenance rounds every ``interval`` seconds, which call ``renew(name, deliveries)``
    and ``recover(name, queue)``."""

    def __init__(self, name: str = "", renew: Callable[[str, Sequence[Delivery]], object] | None = None,
                 recover: Callable[[str, str], object] | None = None, interval: float = 0.05) -> None:
        super().__init__()
        self.name, self.on_renew, self.on_recover, self.interval = name, renew, recover, interval

    def maintenance_interval(self) -> float:
        return self.interval

    def _renew(self, deliveries: Sequence[Delivery]) -> None:
        if self.on_renew is not None:
            self.on_renew(self.name, deliveries)

    def _recover(self, queue: str) -> int:
        if self.on_recover is not None:
            self.on_recover(self.name, queue)
        return 0


def maintenance_threads() -> int:
    return [t.name for t in threading.enumerate()].count("funboost_like-maintenance-Leased")


def test_a_maintenance_thread_renews_and_recovers_for_each_broker() -> None:
    renewed: dict[str, list[object]] = {"a": [], "b": []}
    recovered: list[str] = []

    def renew(name: str, deliveries: Sequence[Delivery]) -> None:
        renewed[name].append(sorted(d.token for d in deliveries))

    a, b = (Leased(name, renew, lambda name, queue: recovered.append(f"{name}:{queue}")) for name in "ab")
    a.publish(Q, b"x")
    [held] = a.fetch(Q, 1, 1.0)
    assert b.fetch("other", 1, 0) == []
    time.sleep(0.3)
    assert maintenance_threads() == 2
    assert [held.token] in renewed["a"] and [] in renewed["b"]
    assert "a:base_q" in recovered and "b:other" in recovered
    a.close()
    b.close()
    count = len(renewed["a"])
    time.sleep(0.2)
    assert len(renewed["a"]) == count  # a closed broker is no longer maintained


def test_a_broker_whose_server_stops_answering_holds_up_no_other_brokers_renewals() -> None:
    """A round blocked on a black-holed server (no answer, no reset) stalls its own broker only."""
    released = threading.Event()
    renewed: list[str] = []

    def renew(name: str, deliveries: Sequence[Delivery]) -> None:
        if name == "stuck":
            released.wait(10)
        renewed.append(name)

    stuck, healthy = Leased("stuck", renew), Leased("healthy", renew)
    try:
        assert stuck.fetch(Q, 1, 0) == []  # its thread is now blocked in its first round
        time.sleep(0.1)
        assert healthy.fetch(Q, 1, 0) == []
        time.sleep(0.5)
        assert renewed.count("healthy") >= 5 and "stuck" not in renewed
    finally:
        released.set()
        stuck.close()
        healthy.close()


def test_a_queue_fetched_for_the_first_time_gets_a_round_at_once() -> None:
    recovered: list[str] = []
    broker = Leased(recover=lambda name, queue: recovered.append(queue), interval=30.0)
    try:
        assert broker.fetch("first", 1, 0) == []
        assert until(lambda: recovered == ["first"])
        assert broker.fetch("second", 1, 0) == []  # not 30 s later: what died there is swept now
        assert until(lambda: "second" in recovered)
    finally:
        broker.close()


def test_the_maintenance_thread_of_a_closed_or_forgotten_broker_ends() -> None:
    closed, forgotten = Leased(), Leased()
    closed.fetch(Q, 1, 0)
    forgotten.fetch(Q, 1, 0)
    assert maintenance_threads() == 2
    closed.close()
    assert until(lambda: maintenance_threads() == 1)
    del forgotten
    gc.collect()
    assert until(lambda: maintenance_threads() == 0)


def test_a_maintenance_thread_that_died_is_started_again_by_the_next_first_fetch() -> None:
    renewed: list[int] = []

    def renew(name: str, deliveries: Sequence[Delivery]) -> None:
        renewed.append(1)
        if len(renewed) == 1:
            raise SystemExit  # not an Exception: it ends the thread (as a greenlet's kill would)

    broker = Leased(renew=renew)
    try:
        broker.fetch(Q, 1, 0)
        assert until(lambda: maintenance_threads() == 0 and renewed == [1])
        broker.fetch("another", 1, 0)
        assert until(lambda: len(renewed) >= 3)
    finally:
        broker.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_forgets_the_parents_held_tokens() -> None:
    forks: list[int] = []

    class Forking(MemoryBroker):
        def _after_fork(self) -> None:
            forks.append(os.getpid())

    broker = Forking()
    broker.publish(Q, b"x")
    [held] = broker.fetch(Q, 1, 1.0)

    def child() -> str:
        try:
            broker.ack([held])
        except DoubleAckError:
            return f"held={len(broker.held())} forks={forks == [os.getpid()]} double-ack"
        return "acked a parent's delivery"

    assert in_forked_child(child) == "held=0 forks=True double-ack"
    broker.ack([held])  # still the parent's to settle


def test_a_broker_that_renews_without_an_interval_is_refused_when_its_class_is_made() -> None:
    """The base runs ``_renew`` and ``_recover`` every ``maintenance_interval()`` seconds, and its default of
    0 meant never: a broker that forgot the interval lost every lease without a word."""
    with pytest.raises(TypeError, match="maintenance_interval"):
        class Forgetful(MemoryBroker):
            def _renew(self, deliveries: Sequence[Delivery]) -> None:
                pass


def test_an_ack_and_fetch_with_acks_of_another_queue_settles_them_in_their_own() -> None:
    broker = MemoryBroker()
    broker.publish("base_q1", b"1")
    broker.publish("base_q2", b"2")
    [one], [two] = broker.fetch("base_q1", 1, 0), broker.fetch("base_q2", 1, 0)
    assert broker.ack_and_fetch([two, one], "base_q1", 1, 0) == []
    assert broker.in_flight("base_q1") == broker.in_flight("base_q2") == 0
    broker.join("base_q1", 1)
    broker.join("base_q2", 1)


@pytest.mark.parametrize("body", [b'{"x": "\xff"}', b"\x80\x81 not text", b'{"x": "caf\xc3\xa9"}', b""])
def test_a_dead_letter_envelope_keeps_the_very_bytes_of_its_body(body: bytes) -> None:
    """A body that was not UTF-8 came back from its envelope with U+FFFD in place of its bytes."""
    from funboost_like.brokers.dead_letters import DeadLetter

    letter = DeadLetter("q", body, "reason", 1.5, 2)
    back = DeadLetter.from_envelope("q", letter.envelope())
    assert (back.body, back.reason, back.failed_at, back.attempts) == (body, "reason", 1.5, 2)


def test_a_kind_and_a_mode_read_as_their_numbers_on_every_python() -> None:
    """str() and a log line's %s give the seed's number, as on 3.11 (3.10's IntEnum gave "BrokerEnum.REDIS"):
    a kind passed as text to another process is read back with int()."""
    logged = logging.makeLogRecord({"msg": "%s %s", "args": (BrokerEnum.SQLITE, ConcurrentModeEnum.ASYNC)})
    assert [str(BrokerEnum.REDIS), logged.getMessage(), f"{BrokerEnum.KAFKA}"] == ["2", "6 4", "8"]
    assert str(ConcurrentModeEnum.GEVENT) == "2"
    assert BrokerEnum(int(str(BrokerEnum.NATS))) is BrokerEnum.NATS
    assert repr(BrokerEnum.MEMORY) == "<BrokerEnum.LOCAL_PYTHON_QUEUE: 3>"


def test_a_kind_whose_client_needs_a_newer_python_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """amqpstorm 3 and rabbitpy 3 need Python 3.11: on 3.10 the rabbitmq extra brings neither, and choosing
    their kinds names the Python needed instead of a pip install that cannot work there."""
    kind = BrokerEnum.RABBITMQ_RABBITPY
    monkeypatch.setitem(sys.modules, "funboost_like.brokers.rabbitmq_rabbitpy", None)  # its import fails
    monkeypatch.setitem(registry.NEEDS_PYTHON, kind, (sys.version_info[0], sys.version_info[1] + 1))
    with pytest.raises(BrokerNotAvailable, match=r"needs Python 3\.\d+ or later .*this is Python 3\.\d+"):
        registry.broker_class(kind)
    monkeypatch.setitem(registry.NEEDS_PYTHON, kind, (3, 10))
    with pytest.raises(BrokerNotAvailable, match=r"pip install 'funboost_like\[rabbitmq\]'"):
        registry.broker_class(kind)
