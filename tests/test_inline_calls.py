"""Fast calls run on the fetcher thread itself (funboost_like/core/inline.py); slow ones never hold others up."""

from __future__ import annotations

import threading
import time

from funboost_like import BrokerEnum, PriorityConsumingControlConfig, task_deco
from funboost_like.core import inline
from funboost_like.core.enums import ConcurrentModeEnum
from funboost_like.middleware.base import FAILED

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
