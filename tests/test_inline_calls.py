"""Fast calls run on the fetcher thread itself (funboost_like/core/inline.py); slow ones never hold others up."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from funboost_like import BrokerEnum, PriorityConsumingControlConfig, task_deco
from funboost_like.brokers.base import Delivery
from funboost_like.concurrency.base import Pool
from funboost_like.core import inline
from funboost_like.core.calls import FAILED
from funboost_like.core.enums import ConcurrentModeEnum
from funboost_like.core.message import DecodedMessage, FunctionSignature

MEMORY = BrokerEnum.LOCAL_PYTHON_QUEUE


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def warm_up(f, done) -> int:
    """Run fast calls until the fetcher runs calls itself; return how many ran. ``done()`` counts them.

    One call that the machine happened to slow past 1 ms restarts the streak, so this may take a few
    rounds on a busy host.
    """
    f.consume()
    n = 0
    for _ in range(5):
        f.publish_many([{"x": i} for i in range(n, n + inline.FAST_CALLS_FIRST + 50)])
        n += inline.FAST_CALLS_FIRST + 50
        wait_for(lambda n=n: done() == n)
        if f.consumer._inline is not None and f.consumer._inline.ready:
            break
    assert f.consumer._inline is not None and f.consumer._inline.ready
    return n


def test_after_a_streak_of_fast_calls_the_fetcher_runs_them_itself(queue_name: str) -> None:
    threads: list[str] = []

    @task_deco(queue_name, broker_kind=MEMORY)
    def f(x: int) -> None:
        threads.append(threading.current_thread().name)

    total = inline.FAST_CALLS_FIRST + 2000
    f.publish_many([{"x": i} for i in range(total)])
    f.consume()
    wait_for(lambda: len(threads) == total)
    f.consumer.stop()
    f.consumer.join(5)
    fetcher = f"funboost_like-fetch-{queue_name}"
    assert fetcher not in threads[:inline.FAST_CALLS_FIRST]  # the pool measured them first
    assert threads.count(fetcher) >= 1000, sorted(set(threads))


def test_blocking_calls_never_run_on_the_fetcher(queue_name: str) -> None:
    threads: list[str] = []

    @task_deco(queue_name, broker_kind=MEMORY, concurrent_num=20)
    def f(x: int) -> None:
        time.sleep(0.002)
        threads.append(threading.current_thread().name)

    f.publish_many([{"x": i} for i in range(200)])
    f.consume()
    wait_for(lambda: len(threads) == 200)
    f.consumer.stop()
    f.consumer.join(5)
    assert f"funboost_like-fetch-{queue_name}" not in threads


def test_a_slow_call_on_the_fetcher_does_not_hold_up_its_batch(queue_name: str) -> None:
    finished: dict[int, float] = {}

    @task_deco(queue_name, broker_kind=MEMORY)
    def f(x: int) -> None:
        if x == -1:
            time.sleep(1.5)
        finished[x] = time.monotonic()

    warmed = warm_up(f, lambda: len(finished))
    started = time.monotonic()
    f.publish_many([{"x": -1}] + [{"x": 1000 + i} for i in range(30)])  # one batch: the slow call first
    wait_for(lambda: len(finished) == warmed + 31)
    f.consumer.stop()
    f.consumer.join(5)
    fast_done = max(finished[1000 + i] for i in range(30))
    assert fast_done - started < 0.5, "the batch waited for the slow call"
    assert finished[-1] - started >= 1.5


def test_a_message_with_its_own_timeout_runs_in_the_pool_and_is_stopped(queue_name: str) -> None:
    ran: list[int] = []

    @task_deco(queue_name, broker_kind=MEMORY, max_retry_times=0, is_print_detail_exception=False)
    def f(x: int) -> None:
        if x == -1:
            time.sleep(3)
        ran.append(x)

    warm_up(f, lambda: len(ran))
    f.publish({"x": -1}, PriorityConsumingControlConfig(function_timeout=0.2))
    wait_for(lambda: f.consumer.stats.counts[FAILED] == 1, timeout=5)  # stopped after 0.2 s, not 3 s
    f.consumer.stop()
    f.consumer.join(5)
    assert -1 not in ran
    letters = f.consumer.broker.list_dead_letters(queue_name)
    assert letters and "FunctionTimeoutError" in letters[0].reason, letters


def test_the_inline_decision_reads_the_decoded_message_not_the_raw_body(queue_name: str) -> None:
    """Argument values that spell "function_timeout" run on the fetcher like any other; a publish-time
    ``function_timeout`` (in ``extra``) still sends its call to a worker, where the timeout is enforced."""
    ran: list[tuple[str, str]] = []

    @task_deco(queue_name, broker_kind=MEMORY, max_retry_times=0, is_print_detail_exception=False)
    def f(x: Any) -> None:
        if x == "slow":
            time.sleep(3)
        ran.append((repr(x), threading.current_thread().name))

    warmed = warm_up(f, lambda: len(ran))
    fetcher = f"funboost_like-fetch-{queue_name}"
    lookalikes: list[Any] = ["function_timeout", {"function_timeout": 5}, '{"function_timeout": 5}']
    f.publish_many([{"x": x} for x in lookalikes * 5])
    wait_for(lambda: len(ran) == warmed + 15)
    on_fetcher = {x for x, thread in ran[warmed:] if thread == fetcher}
    assert on_fetcher == {repr(x) for x in lookalikes}, ran[warmed:]  # the raw-body search sent all to the pool

    f.publish({"x": "slow"}, PriorityConsumingControlConfig(function_timeout=0.2))
    wait_for(lambda: f.consumer.stats.counts[FAILED] == 1, timeout=5)  # stopped after 0.2 s, not 3 s
    f.consumer.stop()
    f.consumer.join(5)
    assert repr("slow") not in {x for x, _ in ran}
    letters = f.consumer.broker.list_dead_letters(queue_name)
    assert letters and "FunctionTimeoutError" in letters[0].reason, letters


class RecordingPool(Pool):
    max_workers = 1

    def __init__(self) -> None:
        self.submitted: list[tuple[Any, Any]] = []

    def submit(self, fn: Any, arg: Any) -> None:
        self.submitted.append((fn, arg))

    def drain(self) -> list[Any]:
        return [arg for _, arg in self.submitted]

    def shutdown(self, timeout: float | None = None) -> bool:
        return True

    @property
    def worker_count(self) -> int:
        return 0


def test_the_inline_runner_decodes_each_message_once_and_hands_timed_ones_over() -> None:
    calls: list[tuple[bytes, DecodedMessage | None, str]] = []

    def process(delivery: Delivery, message: DecodedMessage | None = None) -> None:
        calls.append((delivery.body, message, threading.current_thread().name))

    pool = RecordingPool()
    runner = inline.InlineRunner(process, FunctionSignature(lambda x: None), pool, logging.getLogger("test"),
                                 "test-inline", hand_over=lambda: None)
    bodies = [b'{"x": "function_timeout"}', b'{"x": {"function_timeout": 1}}',
              b'{"x": 1, "extra": {"task_id": "a", "function_timeout": 0.5}}', b'not json']
    try:
        assert runner.run([Delivery("q", body, token=i) for i, body in enumerate(bodies)], threading.Event())
    finally:
        runner.close()
    inline_calls = {body: message for body, message, _ in calls}
    assert set(inline_calls) == {bodies[0], bodies[1], bodies[3]}
    assert inline_calls[bodies[0]] is not None and inline_calls[bodies[0]].kwargs == {"x": "function_timeout"}
    assert inline_calls[bodies[3]] is None  # undecodable: process() dead-letters it with the reason
    [(fn, delivery)] = pool.submitted  # the timed call: to a worker, with its decoded form
    assert delivery.body == bodies[2] and pool.drain() == [delivery]  # unstarted, it goes back as a Delivery
    fn(delivery)
    body, message, _ = calls[-1]
    assert body == bodies[2] and message is not None and message.extra["function_timeout"] == 0.5


def test_no_inline_runner_under_a_rate_limit_a_timeout_or_another_mode(queue_name: str) -> None:
    cases = [dict(qps=100), dict(function_timeout=5), dict(concurrent_mode=ConcurrentModeEnum.ASYNC)]
    for index, extra in enumerate(cases):
        if extra.get("concurrent_mode") == ConcurrentModeEnum.ASYNC:
            async def g(x: int) -> None:
                return None
            booster = task_deco(f"{queue_name}_{index}", broker_kind=MEMORY, **extra)(g)
        else:
            booster = task_deco(f"{queue_name}_{index}", broker_kind=MEMORY, **extra)(lambda x: None)
        booster.consume()
        try:
            wait_for(lambda b=booster: b.consumer.is_running)
            assert booster.consumer._inline is None, extra
        finally:
            booster.consumer.stop()
            booster.consumer.join(5)


def test_a_long_call_on_the_fetcher_hands_fetching_to_a_new_thread(queue_name: str) -> None:
    finished: dict[int, float] = {}

    @task_deco(queue_name, broker_kind=MEMORY)
    def f(x: int) -> None:
        if x == -1:
            time.sleep(2.0)
        finished[x] = time.monotonic()

    warmed = warm_up(f, lambda: len(finished))
    first_fetcher = f.consumer._thread
    f.push(-1)
    time.sleep(inline.HAND_OVER_AFTER_SECONDS + 0.3)  # the long call runs on the fetcher, which handed over
    sent = time.monotonic()
    f.publish_many([{"x": 1000 + i} for i in range(20)])  # fetched by the new fetcher meanwhile
    wait_for(lambda: all(1000 + i in finished for i in range(20)))
    assert max(finished[1000 + i] for i in range(20)) - sent < 1.0
    assert -1 not in finished and f.consumer._thread is not first_fetcher
    f.consumer.stop()  # a graceful stop waits for the long call on the old fetcher thread
    assert f.consumer.join(10)
    assert -1 in finished and not first_fetcher.is_alive()
    assert f.consumer.stats.counts[0] == warmed + 21


def test_a_call_waiting_for_a_result_of_its_own_queue_does_not_deadlock(queue_name: str) -> None:
    @task_deco(queue_name, broker_kind=MEMORY, is_using_rpc_mode=True)
    def f(x: int) -> int:
        if x == -1:
            return f.push(7).get(timeout=10) + 1  # needs the consumer to fetch again meanwhile
        return x

    n = inline.FAST_CALLS_FIRST + 50
    results = [f.push(i) for i in range(n)]
    f.consume()
    assert [r.get(timeout=10) for r in results] == list(range(n))
    assert f.consumer._inline is not None and f.consumer._inline.ready
    assert f.push(-1).get(timeout=10) == 8
    f.consumer.stop()
    assert f.consumer.join(10)


def test_a_transactional_broker_takes_its_inline_batch_while_fast_calls_run_on_the_fetcher(
        queue_name: str, tmp_path: Any, monkeypatch: Any) -> None:
    """SQLACHEMY (a LeasedTable: one transaction per take) takes up to its inline_batch at once while the
    fetcher runs fast calls itself, not just concurrent_num; every message still runs exactly once."""
    from funboost_like import patch_frame_config
    from funboost_like.brokers.leased_table import LeasedTable

    patch_frame_config(SQLALCHEMY_URL=f"sqlite:///{tmp_path / 'q.sqlite3'}")
    sizes: list[int] = []
    original = LeasedTable._get, LeasedTable._ack_and_get

    def get(self: LeasedTable, queue: str, max_n: int) -> list[Delivery]:
        sizes.append(max_n)
        return original[0](self, queue, max_n)

    def ack_and_get(self: LeasedTable, deliveries: Any, queue: str, max_n: int) -> list[Delivery]:
        sizes.append(max_n)
        return original[1](self, deliveries, queue, max_n)

    monkeypatch.setattr(LeasedTable, "_get", get)
    monkeypatch.setattr(LeasedTable, "_ack_and_get", ack_and_get)
    seen: list[int] = []

    @task_deco(queue_name, broker_kind=BrokerEnum.SQLACHEMY, concurrent_num=5, log_level=logging.WARNING)
    def f(x: int) -> None:
        seen.append(x)

    try:
        n = warm_up(f, lambda: len(seen))
        f.publish_many([{"x": i} for i in range(n, n + 1000)])
        wait_for(lambda: len(seen) == n + 1000, 30)
        assert sorted(seen) == list(range(n + 1000))  # each once
        assert max(sizes) == LeasedTable.inline_batch > 5
    finally:
        f.consumer.stop()
        f.consumer.join(10)
