"""Seed 2.5 / 5.7: publish calls on a schedule with ``fsdf_background_scheduler``.

The seed's code, with its fixed dates (2020-07-24 13:53:06, every day at 14:51:20) moved to a few
seconds from now so that every job fires while you watch: an interval job every 3 seconds, a date
job once 5 seconds from now, and a cron job at the wall-clock second 10 seconds from now (then at
that time every day). The queue is the seed's LOCAL_PYTHON_QUEUE (in this process).

Run ``python test_frame/test_timing/demo.py``; stop it with Ctrl-C. With
``FUNBOOST_LIKE_SCHEDULER_JOB_STORE=sqlite`` the jobs are kept in a SQLite file and survive a restart
(give them ids and ``replace_existing=True`` then, see docs/timing.md).
"""

from __future__ import annotations

import datetime

from funboost_like import BrokerEnum, fsdf_background_scheduler, task_deco, timing_publish_deco


@task_deco("queue_test_666", broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE)
def consume_func(x: int, y: int) -> None:
    print(f"{x} + {y} = {x + y}")


if __name__ == "__main__":
    now = datetime.datetime.now()
    once_at = now + datetime.timedelta(seconds=5)
    daily_at = now + datetime.timedelta(seconds=10)
    # Publish every 3 seconds, so it is consumed every 3 seconds.
    fsdf_background_scheduler.add_job(timing_publish_deco(consume_func), "interval", id="3_second_job", seconds=3,
                                      kwargs={"x": 5, "y": 6})
    # Once, at a given time.
    fsdf_background_scheduler.add_job(timing_publish_deco(consume_func), "date", run_date=once_at, args=(5, 6))
    # Every day at a given hour, minute and second.
    fsdf_background_scheduler.add_timing_publish_job(consume_func, "cron", day_of_week="*", hour=daily_at.hour,
                                                     minute=daily_at.minute, second=daily_at.second, args=(5, 6))
    # Start the schedule.
    fsdf_background_scheduler.start()

    # Start consuming.
    consume_func.consume()
