"""Seed section 2.1 (the manual form with get_consumer), runnable.

Copied from the seed with only the import changed and time scaled down 100x:
time.sleep(10) -> time.sleep(0.1). The printed text is translated to English.
"""
# ruff: noqa: I001  -- the seed's import line, kept as written
import time

from funboost_like import get_consumer

# The consuming function: an addition that pretends to take a while.
def f2(a, b):
    print(f'consuming this message {a} + {b} ......')
    time.sleep(0.1)  # simulates blocking work; concurrency gets around it.
    print(f'the result of computing {a} + {b} is {a + b}')


# broker_kind=6 is the local persistent queue (PERSISTQUEUE): no server needed.
consumer = get_consumer('queue_test2', consuming_function=f2, broker_kind=6)


# Publish the tasks; each dict maps to the function's parameters.
consumer.publisher_of_same_queue.clear()
[consumer.publisher_of_same_queue.publish(dict(a=i,b=i * 2)) for i in range(100)]


# Start taking tasks from the broker in a loop and run them with the function.
consumer.start_consuming_message()
