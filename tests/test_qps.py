"""Exact QPS (seed 1.0.1.2, 2.1.2, 2.8): the start rate holds whatever the call's duration; the pool
grows to what the rate needs and shrinks back when calls get short.

The machine has two cores shared with other test runs: rates are checked within 10% here (the
benchmark ``benchmarks/qps.py`` measures the 2% bar over 20 s), thread counts within a band.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from funboost_like import BrokerEnum, patch_frame_config, task_deco
from funboost_like.core.ratelimit import RateLimiter


def sample_workers(booster: Any, until: float, every: float = 0.05) -> list[int]:
    sizes = []
    while time.monotonic() < until:
        sizes.append(booster.consumer.worker_count)
        time.sleep(every)
    return sizes


def mean_rate(starts: list[float]) -> float:
    """Starts per second from the mean interval between the first and the last start."""
    return (len(starts) - 1) / (starts[-1] - starts[0])


# -- the limiter alone -----------------------------------------------------------------------------


def test_very_low_rate_waits_the_whole_interval_and_stops_promptly() -> None:
    limiter = RateLimiter(0.01)  # one start per 100 s
    assert limiter.interval == 100.0
    stop = threading.Event()
    began = time.monotonic()
    assert limiter.wait(stop) is True  # the first start is at once
    assert time.monotonic() - began < 0.1
    result: list[bool] = []
    waiter = threading.Thread(target=lambda: result.append(limiter.wait(stop)))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive() and not result  # the second start is 100 s away
    stopped = time.monotonic()
    stop.set()
    waiter.join(2.0)
    assert result == [False]  # a stop ends the wait at once, and says the slot was not taken
    assert time.monotonic() - stopped < 1.0


def test_limiter_holds_the_rate_and_builds_no_burst_after_a_gap() -> None:
    limiter = RateLimiter(50)
    stop = threading.Event()
    starts = []
    for _ in range(51):
        limiter.wait(stop)
        starts.append(time.monotonic())
    assert 45 <= mean_rate(starts) <= 55
    time.sleep(0.3)  # idle: no credit for the missed slots
    limiter.wait(stop)
    after_gap = time.monotonic()
    limiter.wait(stop)
    assert time.monotonic() - after_gap >= 0.015  # the next start is a full interval later, not a burst


# -- a consumer --------------------------------------------------------------------------------


def test_consumer_at_qps_0_01_runs_one_call_then_waits(queue_name: str) -> None:
    runs: list[int] = []

    @task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, qps=0.01)
    def f(i: int) -> None:
        runs.append(i)

    f.push(1)
    f.push(2)
    f.consume()
    deadline = time.monotonic() + 3
    while not runs and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(1.0)
    assert runs == [1]  # the second call is 100 s away
    f.stop()
    assert f.consumer.join(5)  # the stop interrupts the limiter's wait
    assert f.get_message_count() == 1  # the waiting message went back to the queue
    assert f.consumer.stats.as_dict()["released"] == 1  # and is counted so (it was not)


def test_slow_calls_at_qps_20_grow_the_pool_to_what_the_rate_needs(queue_name: str) -> None:
    starts: list[float] = []

    @task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, qps=20, concurrent_num=500)
    def f(i: int) -> None:
        starts.append(time.monotonic())
        time.sleep(0.3)

    f.publish_many([{"i": i} for i in range(200)])
    f.consume()
    began = time.monotonic()
    sizes = sample_workers(f, began + 3.0)
    f.stop()
    window = [t for t in starts if began + 1.0 <= t < began + 3.0]
    assert 18 <= mean_rate(window) <= 22, mean_rate(window)
    # 20 starts/s of 0.3 s calls keep 6 running: the pool grows to about that, far below the ceiling.
    assert 5 <= max(sizes) <= 12, sizes


def test_pool_shrinks_back_when_calls_become_short(queue_name: str) -> None:
    """Seed 2.8 scaled down: 0.3 s calls, then 5 ms calls, at a constant 20 starts/s."""
    patch_frame_config(THREAD_KEEP_ALIVE_SECONDS=0.15)
    starts: list[float] = []
    duration = [0.3]

    @task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, qps=20, concurrent_num=600)
    def f(i: int) -> None:
        starts.append(time.monotonic())
        time.sleep(duration[0])

    f.publish_many([{"i": i} for i in range(300)])
    f.consume()
    began = time.monotonic()
    long_phase = sample_workers(f, began + 2.0)
    duration[0] = 0.005
    switched = time.monotonic()
    short_phase = sample_workers(f, switched + 3.0)
    f.stop()
    assert max(long_phase) >= 5, long_phase
    assert max(short_phase[-10:]) <= 3, short_phase  # idle workers left after the keep-alive
    window = [t for t in starts if switched + 1.0 <= t < switched + 3.0]
    assert 18 <= mean_rate(window) <= 22, mean_rate(window)  # the rate did not move
