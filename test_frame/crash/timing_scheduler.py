"""A scheduler process for the timing tests (tests/test_timing.py): several of them share one job store.

Usage::

    python timing_scheduler.py QUEUE RUN_SECONDS [--add-job JOB_ID] [--interval SECONDS]

It schedules nothing unless ``--add-job`` is given, in which case it adds an interval timing publish
job for ``record(n=1)`` with that id (replacing a stored one). Then it starts
``fsdf_background_scheduler``, prints ``started <pid>``, runs for RUN_SECONDS and shuts down. The
job store, the fire-time lock and the queue folder come from the environment
(``FUNBOOST_LIKE_SCHEDULER_JOB_STORE``, ``FUNBOOST_LIKE_SCHEDULER_SQLITE_DIR``, ...). Nothing consumes:
the test counts the messages published to QUEUE (PERSISTQUEUE).

The job refers to ``__main__:record``: every scheduler process runs this same script, so each finds
``record`` in its own main module.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from funboost_like import BrokerEnum, fsdf_background_scheduler, task_deco

parser = argparse.ArgumentParser()
parser.add_argument("queue")
parser.add_argument("run_seconds", type=float)
parser.add_argument("--add-job", default="")
parser.add_argument("--interval", type=float, default=0.5)
args = parser.parse_args()


@task_deco(args.queue, broker_kind=BrokerEnum.PERSISTQUEUE)
def record(n: int) -> None:
    raise AssertionError("nothing consumes in this test")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    if args.add_job:
        fsdf_background_scheduler.add_timing_publish_job(record, "interval", seconds=args.interval, id=args.add_job,
                                                         kwargs={"n": 1}, replace_existing=True)
    fsdf_background_scheduler.start()
    sys.stdout.write(f"started {os.getpid()}\n")
    sys.stdout.flush()
    time.sleep(args.run_seconds)
    fsdf_background_scheduler.shutdown()
