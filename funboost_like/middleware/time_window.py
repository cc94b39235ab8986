"""Do-not-run time windows (seed 2.1.2: ``is_do_not_run_by_specify_time_effect``, ``do_not_run_by_specify_time``).

With ``is_do_not_run_by_specify_time_effect=True``, the consumer fetches nothing while the wall-clock
time of day is inside ``do_not_run_by_specify_time = (start, end)``: messages wait in the queue (so
other consumers, or this one after the window, take them) and nothing is prefetched. Calls that had
already started, or had been fetched just before the window opened, finish. ``start`` is inside the
window and ``end`` is not; a window whose start is after its end crosses midnight
(``("22:00:00", "06:00:00")``). Times are ``"HH:MM:SS"`` (or ``"HH:MM"``) in the ``TIMEZONE`` setting,
or in the machine's local time when it is empty; they are validated when the function is decorated.
"""

from __future__ import annotations

import datetime
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from funboost_like.core.calls import Middleware
from funboost_like.core.errors import ConfigurationError
from funboost_like.core.timezones import configured_zone

if TYPE_CHECKING:
    from funboost_like.brokers.base import Capabilities
    from funboost_like.core.consumer import Consumer
    from funboost_like.core.params import ConsumerParams

_TIME_OF_DAY = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2}))?")


def parse_window(window: Any) -> tuple[datetime.time, datetime.time]:
    """Check ``do_not_run_by_specify_time`` and return it as two times of day.

    Raises :class:`ConfigurationError` unless it is a pair of ``"HH:MM:SS"`` (or ``"HH:MM"``) strings
    naming two different times.
    """
    if isinstance(window, (str, bytes)) or not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ConfigurationError(
            f"do_not_run_by_specify_time must be a pair of times such as ('22:00:00', '06:00:00'), got {window!r}"
        )
    start, end = (_parse_time(value) for value in window)
    if start == end:
        raise ConfigurationError(f"do_not_run_by_specify_time={tuple(window)!r}: start and end are the same time")
    return start, end


def _parse_time(value: Any) -> datetime.time:
    match = _TIME_OF_DAY.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is not None:
        hour, minute, second = int(match[1]), int(match[2]), int(match[3] or 0)
        if hour < 24 and minute < 60 and second < 60:
            return datetime.time(hour, minute, second)
    raise ConfigurationError(f"do_not_run_by_specify_time: {value!r} is not a time of day 'HH:MM:SS'")


def seconds_inside(moment: datetime.datetime, start: datetime.time, end: datetime.time) -> float:
    """Seconds from ``moment`` until the window ``[start, end)`` ends, or 0 when ``moment`` is outside it.

    ``moment`` carries the zone (aware) or is the machine's local time (naive); the result is real
    elapsed time, so a daylight-saving change inside the window is accounted for.
    """
    now = moment.time().replace(tzinfo=None)
    inside = start <= now < end if start < end else (now >= start or now < end)
    if not inside:
        return 0.0
    ends = moment.replace(hour=end.hour, minute=end.minute, second=end.second, microsecond=0)
    if ends <= moment:
        ends += datetime.timedelta(days=1)
    return max(0.0, ends.timestamp() - moment.timestamp())


class TimeWindow(Middleware):
    """Pauses fetching while the time of day is inside the window."""

    def __init__(self, start: datetime.time, end: datetime.time, zone: datetime.tzinfo | None,
                 logger: logging.Logger, queue_name: str,
                 clock: Callable[[datetime.tzinfo | None], datetime.datetime] = datetime.datetime.now) -> None:
        self.start = start
        self.end = end
        self.zone = zone
        self.logger = logger
        self.queue_name = queue_name
        self._clock = clock
        self._paused = False

    def pause_for(self) -> float:
        left = seconds_inside(self._clock(self.zone), self.start, self.end)
        if left > 0 and not self._paused:
            self._paused = True
            self.logger.info("queue %r: inside the do-not-run window %s-%s%s; consumption pauses for %.0fs",
                             self.queue_name, self.start, self.end, self._zone_name(), left)
        elif left <= 0 and self._paused:
            self._paused = False
            self.logger.info("queue %r: the do-not-run window %s-%s%s is over; consumption resumes",
                             self.queue_name, self.start, self.end, self._zone_name())
        return left

    def _zone_name(self) -> str:
        return f" ({self.zone})" if self.zone is not None else ""


def check_params(params: ConsumerParams, capabilities: Capabilities) -> None:
    parse_window(params.do_not_run_by_specify_time)  # a malformed window fails at decoration time


def build(consumer: Consumer) -> Middleware | None:
    params = consumer.params
    start, end = parse_window(params.do_not_run_by_specify_time)
    if not params.is_do_not_run_by_specify_time_effect:
        return None
    return TimeWindow(start, end, configured_zone(), consumer.logger, consumer.queue_name)
