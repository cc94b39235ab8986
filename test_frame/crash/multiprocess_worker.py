"""A supervisor of consumer processes for the multi-process tests (tests/test_multiprocess.py).

Usage::

    python multiprocess_worker.py QUEUE RECORD_FILE [--processes N] [--start-method fork|spawn]
                                  [--concurrent-num N] [--sleep SECONDS]

``run_consumer_with_multi_process(record, N)`` starts N child processes consuming QUEUE (PERSISTQUEUE)
and blocks until SIGINT/SIGTERM. The consuming function ``record(i)`` appends ``s <i> <pid>`` when a
call starts and ``d <i> <pid>`` when it ends to RECORD_FILE, each line with one ``write`` on a
descriptor opened with O_APPEND, as test_frame/crash/sqlite_worker.py does. The supervisor writes
``supervisor <pid>`` first. With ``spawn`` every child imports this script again (as ``__mp_main__``,
with the same command line) and finds ``record`` there by reference.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

from funboost_like import BrokerEnum, run_consumer_with_multi_process, task_deco

parser = argparse.ArgumentParser()
parser.add_argument("queue")
parser.add_argument("record_file")
parser.add_argument("--processes", type=int, default=3)
parser.add_argument("--start-method", default=None)
parser.add_argument("--concurrent-num", type=int, default=10)
parser.add_argument("--sleep", type=float, default=0.0)
args = parser.parse_args()

pause = args.sleep
fd = os.open(args.record_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)  # O_APPEND: whole lines, any process


@task_deco(args.queue, broker_kind=BrokerEnum.PERSISTQUEUE, concurrent_num=args.concurrent_num,
           log_level=logging.INFO)
def record(i: int) -> None:
    pid = os.getpid()
    os.write(fd, f"s {i} {pid}\n".encode())
    if pause:
        time.sleep(pause)
    os.write(fd, f"d {i} {pid}\n".encode())


if __name__ == "__main__":
    os.write(fd, f"supervisor {os.getpid()}\n".encode())
    run_consumer_with_multi_process(record, args.processes, start_method=args.start_method)
