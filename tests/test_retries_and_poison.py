"""Retry with backoff through the broker, the true run count of a dead letter, the poison-message rule's
parameters, and its isolation of suspects (on the memory broker, with crashes simulated)."""

from __future__ import annotations

import threading
import time

import pytest

from funboost_like import BrokerEnum, ConfigurationError, PriorityConsumingControlConfig, task_deco
from funboost_like.brokers.base import Delivery
from funboost_like.brokers.memory import MemoryBroker
from funboost_like.brokers.registry import get_broker
from funboost_like.core import codec
from funboost_like.core.consumer import backoff_delay
from funboost_like.core.params import ConsumerParams

MEMORY = BrokerEnum.LOCAL_PYTHON_QUEUE


def memory() -> MemoryBroker:
    broker = get_broker(MEMORY)
    assert isinstance(broker, MemoryBroker)
    return broker


def test_dead_letter_records_every_run(queue_name: str) -> None:
    @task_deco(queue_name, broker_kind=MEMORY, max_retry_times=2, is_print_detail_exception=False)
    def always_fails(x: int) -> None:
        raise KeyError("boom")

    always_fails.push(1)
    always_fails.consume()
    with pytest.raises(KeyError):
        memory().join(queue_name, timeout=5)
    [letter] = memory().list_dead_letters(queue_name)
    assert letter.attempts == 3  # the first run and two retries, not one delivery


def test_retry_backoff_waits_in_the_broker_not_in_a_worker(queue_name: str, caplog: pytest.LogCaptureFixture) -> None:
    runs: list[float] = []
    others: list[float] = []

    @task_deco(queue_name, broker_kind=MEMORY, max_retry_times=2, retry_backoff=0.3, retry_jitter=False,
               concurrent_num=1, is_print_detail_exception=False)
    def flaky(x: int) -> None:
        if x == 0:
            runs.append(time.monotonic())
            raise ValueError("not yet")
        others.append(time.monotonic())

    flaky.push(0)
    flaky.consume()
    deadline = time.monotonic() + 5
    while not runs and time.monotonic() < deadline:
        time.sleep(0.01)
    flaky.push(1)  # the only worker is free while the failed call waits for its retry
    with pytest.raises(ValueError):
        memory().join(queue_name, timeout=10)
    assert len(runs) == 3
    assert others and others[0] < runs[1]
    gaps = [b - a for a, b in zip(runs, runs[1:], strict=False)]
    assert 0.28 <= gaps[0] < 1.0 and 0.58 <= gaps[1] < 1.5  # 0.3 s, then doubled
    [letter] = memory().list_dead_letters(queue_name)
    assert letter.attempts == 3 and "failed 3 time(s)" in letter.reason
    [final] = [r.getMessage() for r in caplog.records if "failed for good" in r.getMessage()]
    assert "after 3 run(s)" in final  # the runs of every delivery, as the dead letter says


@pytest.mark.parametrize("option", ["msg_expire_senconds", "misfire_grace_time"])
def test_a_retry_with_backoff_is_never_dropped_as_expired_or_misfired(queue_name: str, option: str) -> None:
    """Expiry and misfire grace are checked at a message's first turn only: its retry, due after the
    limit, was acknowledged unrun as "expired" and the RPC caller told the call never ran."""
    runs: list[int] = []

    @task_deco(queue_name, broker_kind=MEMORY, max_retry_times=2, retry_backoff=1.3, retry_jitter=False,
               is_using_rpc_mode=True, is_print_detail_exception=False)
    def flaky(x: int) -> int:
        runs.append(x)
        if len(runs) == 1:
            raise ValueError("not yet")
        return x * 2

    limits = {"msg_expire_senconds": PriorityConsumingControlConfig(msg_expire_senconds=1),
              "misfire_grace_time": PriorityConsumingControlConfig(countdown=0.05, misfire_grace_time=1)}
    result = flaky.publish({"x": 21}, priority_control_config=limits[option])
    flaky.consume()
    assert result.get(timeout=10) == 42
    assert runs == [21, 21]
    assert result.status_and_result["attempts"] == 2  # both runs, though the retry was another delivery


def test_backoff_delay_is_capped_and_jittered(queue_name: str) -> None:
    params = ConsumerParams(queue_name, retry_backoff=1.0, retry_backoff_max=5.0)
    assert [round(backoff_delay(params, n), 6) for n in (1, 2, 3, 4, 10)] != [1, 2, 4, 5, 5]  # jittered
    assert all(0.5 * min(5.0, 2.0 ** (n - 1)) <= backoff_delay(params, n) <= min(5.0, 2.0 ** (n - 1))
               for n in range(1, 12) for _ in range(20))
    params.retry_jitter = False
    assert [backoff_delay(params, n) for n in (1, 2, 3, 4, 10)] == [1, 2, 4, 5, 5]


@pytest.mark.parametrize("value", [0, -1, 2.5, "3", True])
def test_bad_max_crash_redeliveries_raises_at_decoration(queue_name: str, value: object) -> None:
    with pytest.raises(ConfigurationError, match="max_crash_redeliveries"):
        task_deco(queue_name, broker_kind=MEMORY, max_crash_redeliveries=value)(lambda x: x)


def test_retry_backoff_needs_a_delaying_broker(queue_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from funboost_like.brokers.base import Capabilities

    monkeypatch.setattr(MemoryBroker, "capabilities", Capabilities(redelivery="native", delay="none"))
    with pytest.raises(ConfigurationError, match="retry_backoff"):
        task_deco(queue_name, broker_kind=MEMORY, retry_backoff=1)(lambda x: x)
    task_deco(queue_name, broker_kind=MEMORY)(lambda x: x)  # the default needs no delay


class CrashCountingMemory(MemoryBroker):
    """A memory broker whose deliveries carry crash counts, as if their consumers had died before."""

    crashes: dict[bytes, int] = {}

    def _get(self, queue: str, max_n: int) -> list[Delivery]:
        got = super()._get(queue, max_n)
        for delivery in got:
            delivery.crashes = self.crashes.get(delivery.body, 0)
        return got


def test_a_suspect_runs_alone_and_a_poison_message_is_dead_lettered(queue_name: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    broker = CrashCountingMemory()
    monkeypatch.setattr("funboost_like.brokers.registry._instances", {(MEMORY, __import__("os").getpid()): broker})
    running = 0
    most_at_once: dict[int, int] = {}
    lock = threading.Lock()
    ran: list[int] = []

    @task_deco(queue_name, broker_kind=MEMORY, concurrent_num=8)
    def work(i: int) -> None:
        nonlocal running
        with lock:
            running += 1
            ran.append(i)
        time.sleep(0.05)
        with lock:
            most_at_once[i] = running
            running -= 1

    bodies = {i: codec.dumps({"i": i}) for i in range(6)}
    CrashCountingMemory.crashes = {bodies[0]: 3, bodies[1]: 1, bodies[2]: 2}  # 0 is poison with the default 3
    broker.publish_many(queue_name, list(bodies.values()))
    work.consume()
    broker.join(queue_name, timeout=10, fail_fast=False)
    assert sorted(ran) == [1, 2, 3, 4, 5]  # the poison message never ran
    assert most_at_once[1] == 1 and most_at_once[2] == 1  # the suspects ran alone
    [letter] = broker.list_dead_letters(queue_name)
    assert codec.loads(letter.body) == {"i": 0} and "died 3 time(s)" in letter.reason


def test_a_failure_of_the_framework_on_a_message_dead_letters_it_rather_than_looping(
        queue_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception that escaped the consumer's own code (not the function's) handed the message back, so
    it failed the same way at once, again and again (45 runs a second, found with a bad option value)."""
    runs: list[int] = []

    @task_deco(queue_name, broker_kind=MEMORY, log_level=50)
    def fails(x: int) -> None:
        runs.append(x)
        raise KeyError("boom")

    def broken(*_args: object) -> None:
        raise TypeError("a defect in the consumer")

    monkeypatch.setattr(fails.consumer, "_after_exception", broken)
    fails.push(1)
    fails.consume()
    try:
        memory().join(queue_name, timeout=5, fail_fast=False)
        [letter] = memory().list_dead_letters(queue_name)
        assert runs == [1] and "TypeError: a defect in the consumer" in letter.reason
    finally:
        fails.consumer.stop()


@pytest.mark.parametrize("options", [{"max_retry_times": "2"}, {"max_retry_times": -3}, {"function_timeout": "abc"},
                                     {"msg_expire_senconds": -3}, {"countdown": "5"}, {"misfire_grace_time": "x"},
                                     {"misfire_grace_time": 0.5}, {"is_using_rpc_mode": "yes"}])
def test_a_publish_option_of_the_wrong_type_raises_when_it_is_given(options: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError, match=next(iter(options))):
        PriorityConsumingControlConfig(**options)  # type: ignore[arg-type]
