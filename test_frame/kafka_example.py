"""Kafka (kinds CONFLUENT_KAFKA and KAFKA): push calls, a delayed one, a retried one, and a record from a plain client.

    python test_frame/kafka_example.py [--kind KAFKA]

Needs a Kafka server at KAFKA_BOOTSTRAP_SERVERS (default ``127.0.0.1:9092``, environment variable
``FUNBOOST_LIKE_KAFKA_BOOTSTRAP_SERVERS``), for example Tansu: ``python tests/kafka_server.py tansu``.
docs/kafka.md describes the topics, the consumer groups and the guarantees.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
import uuid

from funboost_like import BrokerEnum, PriorityConsumingControlConfig, task_deco
from funboost_like.core.config import settings

done = threading.Event()
seen: list[int] = []
failed: set[int] = set()


def add(a: int, b: int) -> int:
    if a == 7 and a not in failed:  # fails once: retried after one second, without holding the partition
        failed.add(a)
        raise RuntimeError("a passing failure")
    seen.append(a + b)
    if len(seen) == 4:
        done.set()
    return a + b


def publish_from_plain_confluent_kafka(topic: str) -> None:
    """What another program does: a JSON object on the queue's topic, no funboost_like involved."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": str(settings.get("KAFKA_BOOTSTRAP_SERVERS"))})
    producer.produce(topic, json.dumps({"a": 100, "b": 1}).encode())
    producer.flush(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=["CONFLUENT_KAFKA", "KAFKA"], default="CONFLUENT_KAFKA")
    kind = BrokerEnum[parser.parse_args().kind]
    queue = f"kafka_example_{uuid.uuid4().hex[:8]}"  # the stand-ins keep topics in memory: a fresh one each run
    task = task_deco(queue, broker_kind=kind, concurrent_num=10, max_retry_times=2, retry_backoff=1.0,
                     log_level=logging.WARNING)(add)
    task.push(1, 2)
    task.push(7, 0)
    task.publish({"a": 10, "b": 20}, priority_control_config=PriorityConsumingControlConfig(countdown=2))
    publish_from_plain_confluent_kafka(queue)
    print(f"{task.get_message_count()} calls wait in topic {queue!r}")
    started = time.monotonic()
    task.consume()
    if not done.wait(60):
        print(f"only {len(seen)} of 4 calls ran within 60 s", file=sys.stderr)
        return 1
    print(f"4 calls ran in {time.monotonic() - started:.1f} s (the group join, then the retried and the delayed one "
          f"last): {sorted(seen)}")
    task.stop()
    task.consumer.join(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
