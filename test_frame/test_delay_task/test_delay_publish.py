"""Seed section 2.9 (delayed tasks), the publisher. Run from the repository root, with the consumer running:

    python -m test_frame.test_delay_task.test_delay_publish

Copied from the seed with only the import changed, and one more change: the seed's eta is the fixed
date 2021-05-19 17:56:30, which is in the past now (those messages would run at once, or be dropped
by their misfire_grace_time), so the example uses "now + 30 seconds" instead (``eta_base`` below).
"""
# ruff: noqa: I001  -- the seed's code, kept as written
# Use publish, not push: push takes only the function's own arguments; publish also takes control
# parameters (compare celery's apply_async and delay).

from test_frame.test_delay_task.test_delay_consume import f
import datetime
import time
from funboost_like import PriorityConsumingControlConfig

"""
Publishing delayed tasks: the function does not run as soon as the message is published.

Only one of countdown and eta may be set.
countdown: run this many seconds after publishing.
eta: run once at this exact time (a naive datetime is in the TIMEZONE setting, "" = local time).

misfire_grace_time: when the message's turn comes, still run it if it is at most this many seconds
later than its due time.
misfire_grace_time None: the message always runs, however late a backlog makes it.
misfire_grace_time not None: an integer >= 1, the seconds after the due time within which the message
still runs. The smaller it is, the more likely a slow consumer drops messages; 100000000 is
practically None. (Same idea as apscheduler's misfire_grace_time.)
"""
# The seed has datetime.datetime(2021, 5, 19, 17, 56, 30) here, a date now in the past.
eta_base = datetime.datetime.now() + datetime.timedelta(seconds=30)

for i in range(1, 20):
    time.sleep(1)

    # Runs 10 seconds after publishing. misfire_grace_time is None: if a backlog makes it later, it still runs.
    f.publish({'x': i}, priority_control_config=PriorityConsumingControlConfig(countdown=10))

    # Runs at eta_base + i seconds. misfire_grace_time is None: if a backlog makes it later, it still runs.
    f.publish({'x': i * 10}, priority_control_config=PriorityConsumingControlConfig(
        eta=eta_base + datetime.timedelta(seconds=i)))

    # Runs 10 seconds after publishing. misfire_grace_time=30: dropped if its turn comes more than 40 (10 + 30)
    # seconds after publishing; run if its turn comes 20 seconds after publishing, since 20 < 10 + 30.
    f.publish({'x': i * 100}, priority_control_config=PriorityConsumingControlConfig(
        countdown=10, misfire_grace_time=30))

    # Runs at eta_base + i seconds. misfire_grace_time=30: dropped if its turn comes more than 30 seconds
    # after that; run if its turn comes 20 seconds after it.
    f.publish({'x': i * 1000}, priority_control_config=PriorityConsumingControlConfig(
        eta=eta_base + datetime.timedelta(seconds=i),
        misfire_grace_time=30))

    # Runs unless its turn comes more than 100 million seconds late: practically never dropped.
    f.publish({'x': i * 10000}, priority_control_config=PriorityConsumingControlConfig(
        eta=eta_base + datetime.timedelta(seconds=i),
        misfire_grace_time=100000000))
