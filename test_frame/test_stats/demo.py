"""Stats demo: a consumer's rate over the last minute, the backlog, and the estimated time left."""

from __future__ import annotations

import time

from funboost_like import BrokerEnum, task_deco


@task_deco("stats_demo", broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, qps=50)
def work(x: int) -> None:
    time.sleep(0.01)


if __name__ == "__main__":
    work.publish_many([{"x": i} for i in range(300)])
    work.consume()
    for _ in range(3):
        time.sleep(1)
        figures = work.consumer.estimate()
        print(f"{figures['rate_per_second_last_minute']:.1f} calls/s, {figures['waiting']} waiting, "
              f"about {figures['seconds_left']:.0f}s left")
    print(work.consumer.stats.as_dict())
    work.stop()
