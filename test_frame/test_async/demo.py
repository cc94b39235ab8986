"""Seed 6.13: an async consuming function on the memory queue, only the import changed.

(The seed pushes 100 calls and consumes forever; this copy stops when the queue is empty.)
"""

import asyncio

from funboost_like import BrokerEnum, ConcurrentModeEnum, task_deco


# This code uses the in-process queue: it needs no broker and can be copied and run as is.
@task_deco('test_async_queue2', concurrent_mode=ConcurrentModeEnum.ASYNC,
           broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, concurrent_num=500, qps=20)
async def async_f(x):
    # An asynchronous wait: time.sleep(1) here would allow one call per second whatever the concurrency.
    await asyncio.sleep(1)
    print(id(asyncio.get_event_loop()))  # the same loop for every call
    print(x)


if __name__ == '__main__':
    async_f.clear()
    for i in range(100):
        async_f.push(i, )
    async_f.consume()
    async_f.broker.join(async_f.queue_name, timeout=60)  # type: ignore[attr-defined]
    async_f.stop()
