"""Do-not-run time window (seed 2.1.2 parameters), runnable: ``python test_frame/test_time_window/demo.py``.

The seed's parameters are ``is_do_not_run_by_specify_time_effect=True`` and
``do_not_run_by_specify_time=('10:00:00', '22:00:00')`` (no calls from 10:00 to 22:00). To see it
within seconds, the window here starts 3 seconds from now and lasts 5 seconds, in local time (or in
the TIMEZONE setting when it is set). Calls run at 2 per second, stop while the window lasts (the
messages wait in the queue: see "waiting"), then go on. A message fetched just before the window
opened may still start at its rate slot, up to 1/qps seconds into the window.
"""

from __future__ import annotations

import datetime
import logging
import time

from funboost_like import BrokerEnum, task_deco

now = datetime.datetime.now()
window = ((now + datetime.timedelta(seconds=3)).strftime("%H:%M:%S"),
          (now + datetime.timedelta(seconds=8)).strftime("%H:%M:%S"))


@task_deco("demo_time_window", broker_kind=BrokerEnum.PERSISTQUEUE, qps=2, is_do_not_run_by_specify_time_effect=True,
           do_not_run_by_specify_time=window, log_level=logging.INFO)
def f(x: int) -> None:
    at = f"{datetime.datetime.now():%H:%M:%S.%f}"[:-3]
    print(f"{at}  ran f({x}); waiting in the queue: {f.get_message_count()}")


if __name__ == "__main__":
    print(f"do-not-run window: {window[0]} to {window[1]}")
    f.clear()
    for i in range(24):
        f.push(i)
    f.consume()
    time.sleep(13)
    f.stop()
