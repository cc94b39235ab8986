"""Seed section 2.8 (exact QPS; the pool grows and shrinks by itself), scaled down 10x, runnable:

    python test_frame/test_qps/demo.py

The seed runs ``f2`` at qps=2 for over five minutes while its duration changes: 0.01 s, then 7 s,
then 30 s, then 0.8 s, then nothing. Here every time is divided by 10 and the rate multiplied by 10,
so the number of calls running at once is the seed's: qps=20 and durations 0.001 s (0-6 s), 0.7 s
(6-12 s: about 14 threads), 3 s (12-24 s: about 60 threads), 0.08 s (24-30 s: the pool shrinks back
to a couple of threads), then no sleep. Each line shows the worker threads alive; the start rate
stays at 20 per second throughout. The idle keep-alive is 0.3 s instead of the default 10 s
(THREAD_KEEP_ALIVE_SECONDS), to see the shrinking within the demo's 36 seconds.
"""

from __future__ import annotations

import logging
import time

from funboost_like import BrokerEnum, ConcurrentModeEnum, patch_frame_config, task_deco

patch_frame_config(THREAD_KEEP_ALIVE_SECONDS=0.3)
t_start = time.time()


@task_deco("queue_test2_qps", qps=20, broker_kind=BrokerEnum.PERSISTQUEUE, concurrent_mode=ConcurrentModeEnum.THREADING,
           concurrent_num=600, log_level=logging.WARNING)
def f2(a: int, b: int) -> int:
    result = a + b
    elapsed = time.time() - t_start
    sleep_time: float | None = 0.001
    if elapsed > 6:  # the call gets slower: the pool must grow to hold the rate
        sleep_time = 0.7
    if elapsed > 12:
        sleep_time = 3
    if elapsed > 24:  # the call gets fast again: the pool must shrink
        sleep_time = 0.08
    if elapsed > 30:
        sleep_time = None
    print(f"{time.strftime('%H:%M:%S')}  {elapsed:5.1f}s  worker threads {f2.consumer.worker_count:3d}  "
          f"{a} + {b} = {result}, sleeping {sleep_time} s")
    if sleep_time is not None:
        time.sleep(sleep_time)  # blocking work; only concurrency gets around it
    return result


if __name__ == "__main__":
    f2.clear()
    for i in range(1000):
        f2.push(i, i * 2)
    f2.consume()
    time.sleep(36)
    f2.stop()
