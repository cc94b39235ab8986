"""Seed section 2.4 (a two-step pipeline) on the embedded SQLite broker, runnable:

    python test_frame/test_pipeline/demo.py

``step1`` publishes to its own queue and to ``step2``'s queue; the two consumers run side by side.
As in the seed, but on PERSISTQUEUE (the default broker: two queue files, no server needed) and
scaled down 20x: qps 0.5 -> 10 and 3 -> 60, time.sleep(10) -> time.sleep(0.5), and step1's
fan-out range(1, 300) -> range(1, 5). So step1 runs for x = 0..4 and step2 for 50 values. Because
the queues are files, a second copy of this script on the same machine shares the work.
"""

from __future__ import annotations

import logging
import time

from funboost_like import BrokerEnum, task_deco


@task_deco("queue_test_step1_sqlite", qps=10, broker_kind=BrokerEnum.PERSISTQUEUE, log_level=logging.WARNING)
def step1(x: int) -> None:
    print(f"step1: x = {x}")
    if x == 0:
        for i in range(1, 5):
            step1.pub(dict(x=x + i))  # to its own queue
    for j in range(10):
        step2.push(x * 100 + j)  # to the next step: push takes the arguments, pub one dict
    time.sleep(0.5)


@task_deco("queue_test_step2_sqlite", qps=60, broker_kind=BrokerEnum.PERSISTQUEUE, log_level=logging.WARNING)
def step2(y: int) -> None:
    print(f"step2: y = {y}")
    time.sleep(0.5)


if __name__ == "__main__":
    step1.clear()
    step2.clear()
    step1.push(0)
    step1.consume()  # consume() returns at once, so both consumers start here
    step2.consume()
    time.sleep(4)
    step1.stop()
    step2.stop()
