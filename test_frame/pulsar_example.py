"""Pulsar (kind PULSAR): push calls, a delayed one, a retried one, and a message from a plain pulsar-client program.

    python test_frame/pulsar_example.py

Needs a Pulsar server at PULSAR_URL (default ``pulsar://127.0.0.1:6650``, environment variable
``FUNBOOST_LIKE_PULSAR_URL``), for example pulsar-lite (``pip install pulsar-lite``; then
``python tests/pulsar_server.py --background /tmp/pulsar-lite`` from the repository, which starts it on
127.0.0.1:6650 with its metrics off). docs/pulsar.md describes the layout and the guarantees.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time

import pulsar

from funboost_like import BrokerEnum, PriorityConsumingControlConfig, task_deco
from funboost_like.core.config import settings

QUEUE = "pulsar_example_add"
done = threading.Event()
seen: list[int] = []
tries = {"flaky": 0}


@task_deco(QUEUE, broker_kind=BrokerEnum.PULSAR, concurrent_num=10, log_level=logging.WARNING, max_retry_times=2,
           retry_backoff=0.5)
def add(a: int, b: int) -> int:
    if a == -1 and tries["flaky"] < 1:  # fails once; the retry waits 0.5 s in the delayed topic
        tries["flaky"] += 1
        raise ValueError("first try fails")
    seen.append(a + b)
    if len(seen) == 5:
        done.set()
    return a + b


def publish_from_plain_pulsar_client() -> None:
    """What another program does: a JSON object on the queue's topic, no funboost_like involved."""
    # Its warnings on stdout: a Python logger here may abort the interpreter's exit (pulsar-client-python#256).
    client = pulsar.Client(str(settings.get("PULSAR_URL")), logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Warn))
    try:
        client.create_producer(f"persistent://public/default/{QUEUE}").send(json.dumps({"a": 100, "b": 1}).encode())
    finally:
        client.close()


def main() -> int:
    add.clear()
    add.push(1, 2)
    add.push(3, 4)
    add.push(-1, 1)
    add.publish({"a": 10, "b": 20}, priority_control_config=PriorityConsumingControlConfig(countdown=1))
    publish_from_plain_pulsar_client()
    started = time.monotonic()
    add.consume()
    if not done.wait(30):
        print(f"only {len(seen)} of 5 calls ran", file=sys.stderr)
        return 1
    print(f"results {sorted(seen)} in {time.monotonic() - started:.1f}s; retried once: {tries['flaky'] == 1}")
    add.stop()
    add.consumer.join(10)
    add.broker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
