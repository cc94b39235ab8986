"""Seed section 6.15 (RedisBrpopLpush: a Redis list moved by LMOVE into per-consumer lists, with acks).

The seed gives no code for this section, only ``@task_deco('queue_test_f01',
broker_kind=BrokerEnum.RedisBrpopLpush,)``: this is section 6.14's example with that broker kind.
The Redis address comes from the setting REDIS_URL (environment variable FUNBOOST_LIKE_REDIS_URL).
Stop it with Ctrl-C (or SIGTERM).
"""
# ruff: noqa: I001  -- the seed's import line, kept as written
from funboost_like import task_deco, BrokerEnum


@task_deco('queue_test_f01', broker_kind=BrokerEnum.RedisBrpopLpush,)
def f(a, b):
    print(f'{a} + {b} = {a + b}')

if __name__ == '__main__':
    for i in range(100):
        f.push(i , b=i * 2)
    f.consume()
