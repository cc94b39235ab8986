"""A consumer process for the crash, multi-process and graceful-stop tests (tests/test_crash_recovery.py).

Usage::

    python sqlite_worker.py QUEUE RECORD_FILE [--concurrent-num N] [--sleep SECONDS] [--push N] [--qps QPS]

The consuming function ``record(i)`` appends ``s <i> <pid>`` to RECORD_FILE when it starts and
``d <i> <pid>`` when it ends, each line with one ``write`` on a descriptor opened with O_APPEND
(so lines of several threads and processes never mix, and a killed process leaves whole lines).
It follows the seed's pattern: optionally push ``--push`` calls, then ``consume()`` as the last
statement, so the main thread ends at once and the consumer threads keep the process alive until
SIGINT/SIGTERM. Settings come from the environment (``FUNBOOST_LIKE_<SETTING>``).
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
parser.add_argument("--concurrent-num", type=int, default=20)
parser.add_argument("--sleep", type=float, default=0.001)
parser.add_argument("--push", type=int, default=0)
parser.add_argument("--qps", type=float, default=0)
args = parser.parse_args()

fd = os.open(args.record_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
pid = os.getpid()
pause = args.sleep


@task_deco(args.queue, broker_kind=BrokerEnum.PERSISTQUEUE, concurrent_num=args.concurrent_num, qps=args.qps,
           log_level=logging.INFO)
def record(i: int) -> None:
    os.write(fd, f"s {i} {pid}\n".encode())
    time.sleep(pause)
    os.write(fd, f"d {i} {pid}\n".encode())


if __name__ == "__main__":
    for n in range(args.push):
        record.push(n)
    print(f"ready {pid}", flush=True)
    record.consume()
