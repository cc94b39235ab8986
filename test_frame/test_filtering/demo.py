"""Task filtering (seed 1.0.1), runnable: ``python test_frame/test_filtering/demo.py``.

The seed's example: querying tomorrow's weather in Shenzhen is cached for 30 minutes, so identical
queries within that time are skipped. Time is scaled down here: the filter lasts 2 seconds. Runs on
the default broker (embedded SQLite, no server needed); the filter is kept in a SQLite file beside
the queue's.
"""

from __future__ import annotations

import logging
import sys
import time

from funboost_like import task_deco

queried: list[str] = []


@task_deco("demo_filtering_weather", do_task_filtering=True, task_filtering_expire_seconds=2, concurrent_num=1,
           log_level=logging.WARNING)
def query_weather(city: str, day: str = "tomorrow") -> str:
    """A stand-in for a paid weather API call."""
    queried.append(f"{city} {day}")
    print(f"querying the weather of {city} {day}")
    return "sunny"


def wait_until_settled(total: int) -> None:
    stats = query_weather.consumer.stats
    deadline = time.monotonic() + 30
    while sum(stats.counts) < total and time.monotonic() < deadline:
        time.sleep(0.05)


def main() -> int:
    query_weather.clear()
    query_weather.consume()
    query_weather.push("shenzhen")
    wait_until_settled(1)
    # The same call written three other ways: all filtered (keyword order, positional or keyword,
    # and the default value given explicitly do not matter).
    query_weather.push(city="shenzhen")
    query_weather.push("shenzhen", "tomorrow")
    query_weather.push(day="tomorrow", city="shenzhen")
    query_weather.push("beijing")  # a different call: runs
    wait_until_settled(5)
    print("waiting 2.5 s for the filter to expire ...")
    time.sleep(2.5)
    query_weather.push("shenzhen")  # runs again
    wait_until_settled(6)
    query_weather.stop()
    query_weather.consumer.join(30)
    stats = query_weather.consumer.stats.as_dict()
    print(f"ran {stats['succeeded']} queries, filtered {stats['skipped']}: {queried}")
    return 0 if queried == ["shenzhen tomorrow", "beijing tomorrow", "shenzhen tomorrow"] else 1


if __name__ == "__main__":
    sys.exit(main())
