"""Seed section 2.7 (RPC mode), the remote side: the consumer that computes the sums.

Copied from the seed with only the import changed. Runs on REDIS_ACK_ABLE, so a Redis server is
needed (setting REDIS_URL, environment variable FUNBOOST_LIKE_REDIS_URL). From the repository root:

    python -m test_frame.test_rpc.test_consume      # in one terminal
    python -m test_frame.test_rpc.test_publish      # in another
"""
# ruff: noqa: I001  -- the seed's import line, kept as written
from funboost_like import task_deco, BrokerEnum

@task_deco('test_rpc_queue', is_using_rpc_mode=True, broker_kind=BrokerEnum.REDIS_ACK_ABLE)
def add(a, b):
    return a + b

if __name__ == '__main__':
    add.consume()
