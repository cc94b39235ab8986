"""SQL databases (kind SQLACHEMY): push calls, a delayed one, a high-priority one and an RPC result.

    python test_frame/sql_example.py
    FUNBOOST_LIKE_SQLALCHEMY_URL=postgresql+psycopg://postgres@127.0.0.1:5432/test python test_frame/sql_example.py
    FUNBOOST_LIKE_SQLALCHEMY_URL=mysql+pymysql://root@127.0.0.1:3306/test python test_frame/sql_example.py

Without a URL the queue lives in a SQLite file in the embedded broker's folder, so the first line
runs anywhere. The queue's tables are created on first use and dropped at the end. docs/sql.md
describes the tables and the guarantees.
"""

from __future__ import annotations

import logging
import threading
import time

from funboost_like import BrokerEnum, PriorityConsumingControlConfig, task_deco

QUEUE = "sql_example_add"
done = threading.Event()
seen: list[int] = []


@task_deco(QUEUE, broker_kind=BrokerEnum.SQLACHEMY, concurrent_num=10, is_using_rpc_mode=True,
           log_level=logging.WARNING)
def add(a: int, b: int) -> int:
    seen.append(a + b)
    if len(seen) == 5:
        done.set()
    return a + b


def main() -> None:
    add.clear()
    first = add.push(1, 2)
    add.publish_many([{"a": 10, "b": 20}, {"a": 100, "b": 200}])
    add.publish({"a": 5, "b": 5}, PriorityConsumingControlConfig(countdown=1.0))
    add.publish({"a": 0, "b": 1}, PriorityConsumingControlConfig(priority=5))
    started = time.monotonic()
    add.consume()
    print("1 + 2 =", first.get(timeout=30))
    if not done.wait(30):
        raise SystemExit(f"only {len(seen)} of 5 calls ran")
    print(f"all five calls ran in {time.monotonic() - started:.2f} s: {sorted(seen)}")
    add.stop()
    add.consumer.join(30)  # the last calls write their RPC results before the tables go
    add.broker.drop_tables(QUEUE)  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
