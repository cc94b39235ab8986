"""A consumer process for the Redis crash and fault tests (tests/test_redis_brokers.py, test_redis_faults.py).

Usage::

    python redis_worker.py QUEUE RECORD_FILE --broker KIND [--concurrent-num N] [--sleep SECONDS]

KIND is a BrokerEnum name (REDIS, RedisBrpopLpush, REDIS_STREAM, REDIS_ACK_ABLE). The consuming
function ``record(i)`` appends ``s <i> <pid>`` to RECORD_FILE when it starts and ``d <i> <pid>``
when it ends, each line with one ``write`` on a descriptor opened with O_APPEND (so lines of several
threads and processes never mix, and a killed process leaves whole lines). Settings come from the
environment: ``FUNBOOST_LIKE_REDIS_URL``, and for quick recovery in tests
``FUNBOOST_LIKE_REDIS_HEARTBEAT_SECONDS`` and ``FUNBOOST_LIKE_REDIS_DEAD_AFTER_SECONDS``.
``consume()`` is the last statement: the consumer threads keep the process alive until SIGINT/SIGTERM (or SIGKILL).
"""

from __future__ import annotations

import argparse
import logging
import os
import time

from funboost_like import BrokerEnum, task_deco

parser = argparse.ArgumentParser()
parser.add_argument("queue")
parser.add_argument("record_file")
parser.add_argument("--broker", required=True, choices=["REDIS", "RedisBrpopLpush", "REDIS_STREAM", "REDIS_ACK_ABLE"])
parser.add_argument("--concurrent-num", type=int, default=20)
parser.add_argument("--sleep", type=float, default=0.001)
args = parser.parse_args()

fd = os.open(args.record_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
pid = os.getpid()
pause = args.sleep


@task_deco(args.queue, broker_kind=BrokerEnum[args.broker], concurrent_num=args.concurrent_num,
           log_level=logging.INFO)
def record(i: int) -> None:
    os.write(fd, f"s {i} {pid}\n".encode())
    time.sleep(pause)
    os.write(fd, f"d {i} {pid}\n".encode())


if __name__ == "__main__":
    record.consume()
