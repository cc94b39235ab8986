"""Seed section 6.14 (REDIS_STREAM: a Redis stream read through a consumer group, with acks), runnable.

Copied from the seed with only the import changed. The Redis address comes from the setting
REDIS_URL (environment variable FUNBOOST_LIKE_REDIS_URL). Stop it with Ctrl-C (or SIGTERM).
"""
# ruff: noqa: I001  -- the seed's import line, kept as written
from funboost_like import task_deco, BrokerEnum


@task_deco('queue_test_f01', broker_kind=BrokerEnum.REDIS_STREAM,)
def f(a, b):
    print(f'{a} + {b} = {a + b}')

if __name__ == '__main__':
    for i in range(100):
        f.push(i , b=i * 2)
    f.consume()
