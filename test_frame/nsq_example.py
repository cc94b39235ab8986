"""NSQ (kind NSQ): push calls, a delayed one, and a message from a program that only speaks nsqd's protocol.

    python test_frame/nsq_example.py

Needs an nsqd at NSQD_TCP_ADDRESSES / NSQD_HTTP_ADDRESSES (defaults ``127.0.0.1:4150`` and
``127.0.0.1:4151``, environment variables ``FUNBOOST_LIKE_NSQD_TCP_ADDRESSES`` and
``FUNBOOST_LIKE_NSQD_HTTP_ADDRESSES``). Where none is installed, the protocol fixture the tests use
stands in (standard library, memory only)::

    python tests/nsqd_server.py &

docs/nsq.md describes the layout, the guarantees and what was (not) tested against a real nsqd.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time

from funboost_like import BrokerEnum, PriorityConsumingControlConfig, task_deco
from funboost_like.brokers.nsq_wire import Publisher, parse_addresses
from funboost_like.core.config import settings

QUEUE = "nsq_example_add"
done = threading.Event()
seen: list[int] = []


@task_deco(QUEUE, broker_kind=BrokerEnum.NSQ, concurrent_num=10, log_level=logging.WARNING)
def add(a: int, b: int) -> int:
    seen.append(a + b)
    if len(seen) == 4:
        done.set()
    return a + b


def publish_from_another_program() -> None:
    """What another program does (pynsq, go-nsq, ``curl -d ... :4151/pub?topic=``): a JSON object on the topic."""
    address = parse_addresses(settings.get("NSQD_TCP_ADDRESSES"))[0]
    publisher = Publisher(address, 5.0)
    try:
        publisher.publish(QUEUE, [json.dumps({"a": 100, "b": 1}).encode()])
    finally:
        publisher.close()


def main() -> int:
    add.clear()
    add.push(1, 2)
    add.push(3, 4)
    add.publish({"a": 10, "b": 20}, priority_control_config=PriorityConsumingControlConfig(countdown=1))
    publish_from_another_program()
    started = time.monotonic()
    add.consume()
    if not done.wait(30):
        print(f"only {len(seen)} of 4 calls ran within 30 s", file=sys.stderr)
        return 1
    print(f"4 calls ran in {time.monotonic() - started:.1f} s (the delayed one last): {sorted(seen)}")
    add.stop()
    add.consumer.join(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
