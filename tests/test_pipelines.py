"""Pipelines (seed 2.4): a consuming function publishes to another queue and to its own queue.

Run on both embedded brokers; on SQLite the two queues are two files, and the publishes happen in
worker threads of the consumers while both consumers run in this process.
"""

from __future__ import annotations

import collections
import threading
import time

import pytest

from funboost_like import BrokerEnum, task_deco
from funboost_like.brokers.registry import get_broker


@pytest.mark.parametrize("kind", [BrokerEnum.PERSISTQUEUE, BrokerEnum.LOCAL_PYTHON_QUEUE], ids=lambda k: k.name)
def test_step1_feeds_itself_and_step2(kind: BrokerEnum, queue_name: str) -> None:
    step1_runs: collections.Counter[int] = collections.Counter()
    step2_runs: collections.Counter[int] = collections.Counter()
    lock = threading.Lock()

    @task_deco(f"{queue_name}_step1", broker_kind=kind, qps=20)
    def step1(x: int) -> None:
        with lock:
            step1_runs[x] += 1
        if x == 0:
            for i in range(1, 5):
                step1.pub(dict(x=x + i))  # to its own queue
        for j in range(10):
            step2.push(x * 100 + j)  # to the next step's queue
        time.sleep(0.05)

    @task_deco(f"{queue_name}_step2", broker_kind=kind, qps=200)
    def step2(y: int) -> None:
        with lock:
            step2_runs[y] += 1
        time.sleep(0.05)

    step1.push(0)
    step1.consume()
    step2.consume()
    expected_step2 = {x * 100 + j for x in range(5) for j in range(10)}
    deadline = time.monotonic() + 20
    while set(step2_runs) != expected_step2 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)  # let any duplicate show up
    step1.stop()
    step2.stop()
    assert step1.consumer.join(10) and step2.consumer.join(10)
    assert step1_runs == collections.Counter(range(5))  # each exactly once
    assert step2_runs == collections.Counter(expected_step2)
    broker = get_broker(kind)
    assert broker.count(f"{queue_name}_step1") == 0 and broker.count(f"{queue_name}_step2") == 0
    if kind == BrokerEnum.PERSISTQUEUE:  # two queues, two files
        assert broker.path(f"{queue_name}_step1").exists()  # type: ignore[attr-defined]
        assert broker.path(f"{queue_name}_step2").exists()  # type: ignore[attr-defined]
