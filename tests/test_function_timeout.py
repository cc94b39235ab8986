"""function_timeout: a call running longer is stopped or abandoned, counts as a failure, frees its slot."""

from __future__ import annotations

import threading
import time

import pytest

from funboost_like import BrokerEnum, PriorityConsumingControlConfig, task_deco
from funboost_like.brokers.memory import MemoryBroker
from funboost_like.brokers.registry import get_broker
from funboost_like.concurrency.timeouts import watchdog
from funboost_like.core.errors import FunctionTimeoutError

MEMORY = BrokerEnum.LOCAL_PYTHON_QUEUE


def memory() -> MemoryBroker:
    broker = get_broker(MEMORY)
    assert isinstance(broker, MemoryBroker)
    return broker


def test_pure_python_call_is_stopped_and_dead_lettered(queue_name: str) -> None:
    attempts: list[float] = []

    @task_deco(queue_name, broker_kind=MEMORY, function_timeout=0.2, max_retry_times=1, is_print_detail_exception=False)
    def spin(x: int) -> None:
        attempts.append(time.monotonic())
        while True:  # pure Python: the timeout exception stops it at the next bytecode
            sum(range(50))

    spin.push(1)
    started = time.monotonic()
    spin.consume()
    with pytest.raises(FunctionTimeoutError):
        memory().join(queue_name, timeout=10)
    assert len(attempts) == 2  # first run and one retry, each stopped
    assert time.monotonic() - started < 2.0
    [letter] = memory().list_dead_letters(queue_name)
    assert "FunctionTimeoutError" in letter.reason and "failed 2 time(s)" in letter.reason
    assert "longer than function_timeout=0.2s" in letter.reason  # the interrupted run says which limit too


def test_call_blocked_in_c_is_abandoned_and_its_slot_freed(queue_name: str) -> None:
    done: list[int] = []
    release = threading.Event()

    @task_deco(queue_name, broker_kind=MEMORY, function_timeout=0.3, max_retry_times=0, concurrent_num=1,
               is_print_detail_exception=False)
    def maybe_stuck(x: int) -> None:
        if x == 0:
            release.wait(10)  # blocked in C: the timeout cannot interrupt it, so the run is abandoned
        done.append(x)

    maybe_stuck.push(0)
    maybe_stuck.push(1)
    started = time.monotonic()
    maybe_stuck.consume()
    with pytest.raises(FunctionTimeoutError):
        memory().join(queue_name, timeout=5)
    memory().join(queue_name, timeout=5, fail_fast=False)
    # concurrent_num=1: message 1 could only run because the stuck call's slot was freed
    assert done == [1]
    assert time.monotonic() - started < 3.0
    release.set()
    time.sleep(0.2)
    assert done == [1, 0]  # the stuck call ended late; its result was ignored, nothing settled twice
    assert len(memory().list_dead_letters(queue_name)) == 1


def test_abandoned_call_is_retried_in_a_fresh_worker(queue_name: str) -> None:
    runs: list[int] = []
    release = threading.Event()

    @task_deco(queue_name, broker_kind=MEMORY, function_timeout=0.3, max_retry_times=2, is_print_detail_exception=False)
    def first_run_hangs(x: int) -> int:
        runs.append(x)
        if len(runs) == 1:
            release.wait(10)
        return x

    first_run_hangs.push(5)
    first_run_hangs.consume()
    memory().join(queue_name, timeout=5)
    assert runs == [5, 5]
    assert memory().list_dead_letters(queue_name) == []
    release.set()


def test_fast_calls_are_not_affected_and_timeout_can_be_set_per_message(queue_name: str) -> None:
    done: list[int] = []

    @task_deco(queue_name, broker_kind=MEMORY, function_timeout=5, max_retry_times=0, is_print_detail_exception=False)
    def f(x: int) -> None:
        if x == 99:
            time.sleep(1)
        done.append(x)

    f.publish_many([{"x": i} for i in range(2000)])
    f.publish({"x": 99}, PriorityConsumingControlConfig(function_timeout=0.2))
    f.consume()
    with pytest.raises(FunctionTimeoutError):
        memory().join(queue_name, timeout=10)
    memory().join(queue_name, timeout=10, fail_fast=False)
    assert sorted(done)[:2000] == list(range(2000))


def test_a_message_asking_for_a_timeout_beyond_any_wait_does_not_end_the_watchdog(queue_name: str) -> None:
    """``function_timeout`` in a message's ``extra`` is anyone's to write: a deadline further than a
    thread can wait (1e300 s) must not end the watchdog thread with an OverflowError."""

    @task_deco(queue_name, broker_kind=MEMORY, function_timeout=0.3, max_retry_times=0, is_print_detail_exception=False)
    def f(x: int) -> None:
        if x == 1:
            while True:  # pure Python: stopped by the watchdog at its deadline
                sum(range(50))

    memory().publish(queue_name, b'{"x": 0, "extra": {"function_timeout": 1e300}}')
    f.consume()
    memory().join(queue_name, timeout=5)
    time.sleep(0.2)  # the watchdog has looked at the far deadline by now
    thread = watchdog._thread
    assert thread is not None and thread.is_alive()
    f.push(1)
    with pytest.raises(FunctionTimeoutError):
        memory().join(queue_name, timeout=5)
    assert watchdog._thread is thread  # the same thread stopped the call: it was never restarted
