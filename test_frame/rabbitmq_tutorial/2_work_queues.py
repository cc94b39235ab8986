"""RabbitMQ tutorial 2, "Work queues": one producer, two workers on one queue, fair dispatch.

    python test_frame/rabbitmq_tutorial/2_work_queues.py

Two consumers take tasks from the same queue: a slow one (0.4 s a task) and a fast one (0.05 s).
Each runs one task at a time (``concurrent_num=1``, the tutorial's ``basic_qos(prefetch_count=1)``)
and takes the next task only when it is free, so the fast worker ends up doing most of them, and
every task runs exactly once. Workers in other processes (``run_consumer_with_multi_process(fn, 2)``,
or this script started twice) share a queue the same way.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter

from common import BROKER, Inbox, queue, say, stop

from funboost_like import get_consumer

TASKS = 12
inbox = Inbox(verb="did task")


def slow_worker(task: int) -> None:
    time.sleep(0.4)
    inbox.add("slow worker", task)


def fast_worker(task: int) -> None:
    time.sleep(0.05)
    inbox.add("fast worker", task)


def main() -> int:
    slow = get_consumer(queue("task_queue"), consuming_function=slow_worker, broker_kind=BROKER, concurrent_num=1,
                        log_level=logging.WARNING)
    fast = get_consumer(queue("task_queue"), consuming_function=fast_worker, broker_kind=BROKER, concurrent_num=1,
                        log_level=logging.WARNING)
    producer = slow.publisher_of_same_queue  # any publisher of the queue will do
    producer.clear()
    slow.start_consuming_message()
    fast.start_consuming_message()
    for task in range(TASKS):
        producer.publish({"task": task})
    say(f" [x] Sent tasks 0..{TASKS - 1} to queue {producer.queue_name!r} on {BROKER.name}")

    arrived = inbox.wait(TASKS)
    stop(slow, fast)
    slow_tasks, fast_tasks = inbox.got.get("slow worker", []), inbox.got.get("fast worker", [])
    say(f"slow worker ran {len(slow_tasks)} tasks, fast worker ran {len(fast_tasks)}")
    runs = Counter(slow_tasks + fast_tasks)
    every_task_once = sorted(runs) == list(range(TASKS)) and set(runs.values()) == {1}
    say(f"every task ran exactly once: {every_task_once}")
    return 0 if arrived and every_task_once else 1


if __name__ == "__main__":
    sys.exit(main())
