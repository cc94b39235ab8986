"""Seed section 2.2 (decorator form on REDIS_ACK_ABLE), runnable.

Copied from the seed with only the import changed and time scaled down 50x: qps 0.2 -> 10.
The Redis address comes from the setting REDIS_URL (environment variable FUNBOOST_LIKE_REDIS_URL).
"""
# ruff: noqa: I001  -- the seed's import line, kept as written
# Decorator form, for example:

from funboost_like import task_deco,BrokerEnum

@task_deco('queue_test_f01', qps=10, broker_kind=BrokerEnum.REDIS_ACK_ABLE)  # 10 calls a second, on Redis with acks.
def add(a, b):
    print(a + b)

for i in range(10, 20):
    add.pub(dict(a=i, b=i * 2))  # publish a task with add.pub
    add.push(i, b=i * 2)  # publish a task with add.push
add.consume()                    # consume the tasks with add.consume
