"""Seed 2.6: several processes, each with its own thread pool, on one queue.

The seed publishes 10,000 calls and starts 16 processes whose function fetches
``http://www.baidu.com/content-search.xml``. Scaled for a small machine and for running offline:
2,000 calls, 4 processes, and a 0.2 s ``time.sleep`` **instead of the HTTP request** (the same kind
of wait: the thread blocks, the pool grows). The queue is on REDIS_ACK_ABLE, as in the seed, when a
Redis server answers at ``REDIS_URL``; otherwise on PERSISTQUEUE (SQLite), which needs no server.

Run ``python test_frame/test_multi_process/demo.py``; each call prints its argument, the process and
the thread that ran it. Ctrl-C (or SIGTERM to the parent) stops the four children gracefully:
running calls finish, unstarted messages go back to the queue. Kill one child with ``kill -9``
and the supervisor starts another in its place.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from urllib.parse import urlsplit

from funboost_like import BrokerEnum, ConcurrentModeEnum, run_consumer_with_multi_process, task_deco
from funboost_like.core.config import settings


def redis_is_up() -> bool:
    url = urlsplit(str(settings.get("REDIS_URL")))
    try:
        with socket.create_connection((url.hostname or "127.0.0.1", url.port or 6379), timeout=0.5):
            return True
    except OSError:
        return False


BROKER = BrokerEnum.REDIS_ACK_ABLE if redis_is_up() else BrokerEnum.PERSISTQUEUE


@task_deco("test_multi_process_queue", broker_kind=BROKER, concurrent_mode=ConcurrentModeEnum.THREADING, qps=100)
def fff(x: int) -> None:
    time.sleep(0.2)  # the seed does requests.get("http://www.baidu.com/content-search.xml") here
    print(x, os.getpid(), threading.get_ident(), BROKER.name)


if __name__ == "__main__":
    for i in range(2000):
        fff.push(i)
    # fff.consume()  # one process, many threads
    run_consumer_with_multi_process(fff, 4)  # four processes, each with its own thread pool
