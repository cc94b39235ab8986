"""Seed section 2.4 (two steps; step1 publishes to step2 and to itself), runnable.

Copied from the seed with only the import changed and time scaled down 20x:
qps 0.5 -> 10 and 3 -> 60, time.sleep(10) -> time.sleep(0.5), and step1's fan-out
range(1, 300) -> range(1, 5) (so step1 runs for x = 0..4 and step2 gets 50 values).
"""
# ruff: noqa: I001  -- the seed's import line, kept as written
import time

from funboost_like import task_deco, BrokerEnum


@task_deco('queue_test_step1', qps=10, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE)
def step1(x):
    print(f'the value of x is {x}')
    if x == 0:
        for i in range(1, 5):
            step1.pub(dict(x=x + i))
    for j in range(10):
        step2.push(x * 100 + j)  # push takes the function's arguments, pub takes one dict
    time.sleep(0.5)


@task_deco('queue_test_step2', qps=60, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE)
def step2(y):
    print(f'the value of y is {y}')
    time.sleep(0.5)


if __name__ == '__main__':
    # step1.clear()
    step1.push(0)    # push a task to step1's queue.

    step1.consume()  # consume() returns at once, so two consumers can be started in a row.
    step2.consume()
