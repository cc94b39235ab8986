"""Do-not-run time windows (``is_do_not_run_by_specify_time_effect`` / ``do_not_run_by_specify_time``).

Inside the window the consumer fetches nothing: messages wait in the queue, none is prefetched.
"""

from __future__ import annotations

import datetime
import logging
import time
import zoneinfo
from typing import Any

import pytest

from funboost_like import BrokerEnum, get_consumer, patch_frame_config, task_deco
from funboost_like.core.errors import ConfigurationError
from funboost_like.middleware.time_window import TimeWindow, parse_window, seconds_inside
from tests.conftest import until

T = datetime.time


def hms(moment: datetime.datetime) -> str:
    return moment.strftime("%H:%M:%S")


# -- the window's format ------------------------------------------------------------------------------


def test_parse_window() -> None:
    assert parse_window(("10:00:00", "22:00:00")) == (T(10), T(22))
    assert parse_window(["22:30", "6:05:09"]) == (T(22, 30), T(6, 5, 9))


@pytest.mark.parametrize("window", [
    ("25:00:00", "06:00:00"), ("10:60:00", "11:00:00"), ("10:00:00",), "10:00:00-12:00:00",
    ("10:00:00", "10:00:00"), (10, 12), ("10h", "12h"), None,
])
def test_a_malformed_window_fails_at_decoration_time(window: Any, queue_name: str) -> None:
    with pytest.raises(ConfigurationError, match="do_not_run_by_specify_time"):
        task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, is_do_not_run_by_specify_time_effect=True,
                  do_not_run_by_specify_time=window)
    with pytest.raises(ConfigurationError, match="do_not_run_by_specify_time"):
        get_consumer(queue_name, consuming_function=lambda: None, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE,
                     is_do_not_run_by_specify_time_effect=True, do_not_run_by_specify_time=window)


# -- when it pauses, and for how long ---------------------------------------------------------------------


def at(hour: int, minute: int = 0, second: int = 0) -> datetime.datetime:
    return datetime.datetime(2024, 6, 1, hour, minute, second)


def test_seconds_inside_a_daytime_window() -> None:
    start, end = T(10), T(22)
    assert seconds_inside(at(9, 59, 59), start, end) == 0
    assert seconds_inside(at(10), start, end) == 12 * 3600  # the start is inside
    assert seconds_inside(at(21, 59, 30), start, end) == 30
    assert seconds_inside(at(22), start, end) == 0  # the end is not


def test_seconds_inside_a_window_crossing_midnight() -> None:
    start, end = T(22), T(6)
    assert seconds_inside(at(21, 59), start, end) == 0
    assert seconds_inside(at(23), start, end) == 7 * 3600
    assert seconds_inside(at(0, 0), start, end) == 6 * 3600
    assert seconds_inside(at(5, 59, 59), start, end) == 1
    assert seconds_inside(at(6), start, end) == 0
    assert seconds_inside(at(12), start, end) == 0


def test_seconds_inside_count_real_time_across_a_daylight_saving_change() -> None:
    paris = zoneinfo.ZoneInfo("Europe/Paris")  # clocks jump from 02:00 to 03:00 on 2024-03-31
    moment = datetime.datetime(2024, 3, 31, 1, 0, tzinfo=paris)
    assert seconds_inside(moment, T(1), T(4)) == 2 * 3600


def test_pause_for_reads_the_clock_in_its_zone() -> None:
    zone = zoneinfo.ZoneInfo("Asia/Shanghai")
    asked: list[Any] = []

    def clock(tz: Any) -> datetime.datetime:
        asked.append(tz)
        return datetime.datetime(2024, 6, 1, 23, 30, tzinfo=tz)

    window = TimeWindow(T(22), T(6), zone, logging.getLogger("test"), "q", clock=clock)
    assert window.pause_for() == 6.5 * 3600
    assert asked == [zone]


# -- a consumer -----------------------------------------------------------------------------------


def test_not_active_unless_enabled(queue_name: str) -> None:
    now = datetime.datetime.now()
    ran: list[int] = []

    window = (hms(now - datetime.timedelta(minutes=1)), hms(now + datetime.timedelta(hours=1)))

    @task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, do_not_run_by_specify_time=window)
    def f(x: int) -> None:
        ran.append(x)

    assert not any(isinstance(m, TimeWindow) for m in f.consumer.middlewares)
    f.push(1)
    f.consume()
    assert until(lambda: ran == [1], 3)


@pytest.mark.parametrize("kind", [BrokerEnum.LOCAL_PYTHON_QUEUE, BrokerEnum.PERSISTQUEUE], ids=lambda k: k.name)
def test_messages_wait_in_the_queue_until_the_window_ends(kind: BrokerEnum, queue_name: str) -> None:
    now = datetime.datetime.now().replace(microsecond=0)
    end = now + datetime.timedelta(seconds=3)
    ran: list[float] = []

    @task_deco(queue_name, broker_kind=kind, is_do_not_run_by_specify_time_effect=True,
               do_not_run_by_specify_time=(hms(now - datetime.timedelta(minutes=1)), hms(end)))
    def f(x: int) -> None:
        ran.append(time.time())

    f.push(1)
    f.push(2)
    f.consume()
    time.sleep(1.0)
    assert ran == []
    assert f.get_message_count() == 2  # nothing fetched, nothing prefetched
    assert until(lambda: len(ran) == 2, 6)
    assert min(ran) >= end.timestamp() - 0.05


def test_outside_the_window_runs_at_once(queue_name: str) -> None:
    now = datetime.datetime.now()
    ran: list[int] = []

    window = (hms(now + datetime.timedelta(hours=1)), hms(now + datetime.timedelta(hours=2)))

    @task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, is_do_not_run_by_specify_time_effect=True,
               do_not_run_by_specify_time=window)
    def f(x: int) -> None:
        ran.append(x)

    f.push(1)
    f.consume()
    assert until(lambda: ran == [1], 3)


def test_the_window_is_read_in_the_timezone_setting(queue_name: str) -> None:
    zone = "Pacific/Kiritimati"  # UTC+14: the window below is outside local time on most machines
    patch_frame_config(TIMEZONE=zone)
    there = datetime.datetime.now(zoneinfo.ZoneInfo(zone))
    ran: list[int] = []

    @task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, is_do_not_run_by_specify_time_effect=True,
               do_not_run_by_specify_time=(hms(there - datetime.timedelta(minutes=1)),
                                           hms(there + datetime.timedelta(minutes=30))))
    def f(x: int) -> None:
        ran.append(x)

    [window] = [m for m in f.consumer.middlewares if isinstance(m, TimeWindow)]
    assert window.zone == zoneinfo.ZoneInfo(zone)
    assert 29 * 60 < window.pause_for() <= 30 * 60
    f.push(1)
    f.consume()
    time.sleep(1.0)
    assert ran == [] and f.get_message_count() == 1
