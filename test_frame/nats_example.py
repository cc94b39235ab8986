"""NATS JetStream (kind NATS): push calls, a delayed one, an RPC result, and a message from a plain nats-py program.

    python test_frame/nats_example.py

Needs a NATS server with JetStream at NATS_URL (default ``nats://127.0.0.1:4222``, environment
variable ``FUNBOOST_LIKE_NATS_URL``), for example ``nats-server -js``. The queue's streams are
deleted at the end. docs/nats.md describes the layout and the guarantees.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time

from funboost_like import BrokerEnum, PriorityConsumingControlConfig, task_deco
from funboost_like.core.config import settings

QUEUE = "nats_example_add"
done = threading.Event()
seen: list[int] = []


@task_deco(QUEUE, broker_kind=BrokerEnum.NATS, concurrent_num=10, log_level=logging.WARNING)
def add(a: int, b: int) -> int:
    seen.append(a + b)
    if len(seen) == 5:
        done.set()
    return a + b


async def publish_from_plain_nats_py() -> None:
    """What another program does: a JSON object on the queue's subject, no funboost_like involved."""
    import nats

    nc = await nats.connect(str(settings.get("NATS_URL")))
    try:
        await nc.jetstream().publish(QUEUE, json.dumps({"a": 100, "b": 1}).encode())
    finally:
        await nc.close()


def main() -> int:
    add.clear()
    add.push(1, 2)
    add.push(3, 4)
    add.publish({"a": 10, "b": 20}, priority_control_config=PriorityConsumingControlConfig(countdown=1))
    asyncio.run(publish_from_plain_nats_py())
    started = time.monotonic()
    add.consume()
    result = add.publish({"a": 5, "b": 5}, priority_control_config=PriorityConsumingControlConfig(
        is_using_rpc_mode=True)).result
    print(f"RPC result of add(5, 5): {result}")
    if not done.wait(30):
        print(f"only {len(seen)} of 5 calls ran within 30 s", file=sys.stderr)
        return 1
    print(f"5 calls ran in {time.monotonic() - started:.1f} s (the delayed one last): {sorted(seen)}")
    add.stop()
    add.consumer.join(10)
    add.broker.delete_queue(QUEUE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
