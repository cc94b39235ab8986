"""Seed section 1.0.0.1 (simple example), runnable.

Copied from the seed with only the import changed and time scaled down 4x-5x so a test runs fast:
qps 5 -> 20, time.sleep(3) -> time.sleep(0.15), range(100) -> range(20).
"""
# ruff: noqa: I001  -- the seed's import line, kept as written
import time
from funboost_like import task_deco, BrokerEnum

@task_deco("task_queue_name1",qps=20,broker_kind=BrokerEnum.PERSISTQUEUE)  # many parameters control how it runs.
def task_fun(x,y):
    print(f'{x} + { y} = {x + y}')
    time.sleep(0.15)   # calls run concurrently around this wait, so 20 still start each second.

if __name__ == "__main__":
    for i in range(20):
        task_fun.push(i, y=i * 2) # the publisher publishes tasks
    task_fun.consume()            # the consumer starts its loop and runs the tasks concurrently
