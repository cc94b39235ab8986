"""function_timeout demo: a slow call is stopped, retried, then dead-lettered; fast ones are not affected."""

from __future__ import annotations

import time

from funboost_like import BrokerEnum, task_deco
from funboost_like.brokers.memory import MemoryBroker


@task_deco("timeout_demo", broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, function_timeout=0.5, max_retry_times=1)
def work(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


if __name__ == "__main__":
    for seconds in (0.1, 2.0, 0.2):
        work.push(seconds)
    work.consume()
    broker = work.broker
    assert isinstance(broker, MemoryBroker)
    broker.join(work.queue_name, timeout=10, fail_fast=False)
    for letter in broker.list_dead_letters(work.queue_name):
        print("dead-lettered:", letter.reason.splitlines()[0])
    work.stop()
