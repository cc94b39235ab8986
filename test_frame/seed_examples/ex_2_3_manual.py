"""Seed section 2.3 (the same as 2.2 in the manual get_consumer form), runnable.

Copied from the seed with only the import changed and time scaled down 50x: qps 0.2 -> 10.
The Redis address comes from the setting REDIS_URL (environment variable FUNBOOST_LIKE_REDIS_URL).
"""
# ruff: noqa: I001  -- the seed's import line, kept as written
from funboost_like import get_consumer,BrokerEnum

def add(a, b):
    print(a + b)

# consuming_function must be given by hand here.
consumer = get_consumer('queue_test_f01', consuming_function=add,qps=10, broker_kind=BrokerEnum.REDIS_ACK_ABLE)
for i in range(10, 20):
    consumer.publisher_of_same_queue.publish(dict(a=i, b=i * 2)) # publish a task
consumer.start_consuming_message()   # consume the tasks with start_consuming_message
