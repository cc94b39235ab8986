"""Priority demo: messages published with a higher priority run first (embedded SQLite broker)."""

from __future__ import annotations

import time

from funboost_like import PriorityConsumingControlConfig, task_deco

order: list[str] = []


@task_deco("priority_demo", concurrent_num=1)  # one at a time, so the order is visible
def handle(name: str) -> None:
    order.append(name)
    print("ran", name)


if __name__ == "__main__":
    handle.clear()
    handle.publish({"name": "routine report"})
    handle.publish({"name": "customer order"}, PriorityConsumingControlConfig(priority=5))
    handle.publish({"name": "fraud alert"}, PriorityConsumingControlConfig(priority=9))
    handle.consume()
    while len(order) < 3:
        time.sleep(0.05)
    handle.stop()
