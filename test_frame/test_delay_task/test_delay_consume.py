"""Seed section 2.9 (delayed tasks), the consumer: nothing changes on the consuming side.

Copied from the seed with only the import changed. Runs on REDIS_ACK_ABLE as in the seed, so a Redis
server is needed (setting REDIS_URL, environment variable FUNBOOST_LIKE_REDIS_URL). From the
repository root:

    python -m test_frame.test_delay_task.test_delay_consume      # in one terminal
    python -m test_frame.test_delay_task.test_delay_publish      # in another
"""
# ruff: noqa: I001  -- the seed's import line, kept as written
from funboost_like import task_deco,BrokerEnum

@task_deco('test_delay',broker_kind=BrokerEnum.REDIS_ACK_ABLE)
def f(x):
    print(x)

if __name__ == '__main__':
    f.consume()
