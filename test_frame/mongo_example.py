"""MongoDB (kind MONGOMQ): push calls, a delayed one, a high-priority one, an RPC result, and a message
written by a plain pymongo program.

    python test_frame/mongo_example.py

Needs a MongoDB 4.2+ server at MONGO_URL (default ``mongodb://127.0.0.1:27017/funboost_like``,
environment variable ``FUNBOOST_LIKE_MONGO_URL``), for example SecantusDB, the stand-in the tests use:
``secantusd-py --host 127.0.0.1 --port 27117 --storage-path /tmp/secantus`` with
``FUNBOOST_LIKE_MONGO_URL=mongodb://127.0.0.1:27117/funboost_like?retryWrites=false``. The queue's collections are
dropped at the end. docs/mongo.md describes the layout and the guarantees.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

from pymongo import ReturnDocument

from funboost_like import BrokerEnum, PriorityConsumingControlConfig, task_deco

QUEUE = "mongo_example_add"
done = threading.Event()
seen: list[int] = []


@task_deco(QUEUE, broker_kind=BrokerEnum.MONGOMQ, concurrent_num=10, log_level=logging.WARNING)
def add(a: int, b: int) -> int:
    seen.append(a + b)
    if len(seen) == 5:
        done.set()
    return a + b


def publish_from_plain_pymongo() -> None:
    """What another program does: the next id from the queue's counter, then a document with a JSON body."""
    from funboost_like.brokers.mongo import MongoBroker

    broker = add.broker
    assert isinstance(broker, MongoBroker)
    db = broker.database()
    name = f"fl.q.{QUEUE}"
    counter = db["fl.sequences"].find_one_and_update({"_id": name}, {"$inc": {"n": 1}}, upsert=True,
                                                     return_document=ReturnDocument.AFTER)
    db[name].insert_one({"_id": counter["n"], "priority": 0, "visible_at": time.time(), "owner": None,
                         "claim": 0, "attempts": 0, "crashes": 0, "body": b'{"a": 100, "b": 1}'})


def main() -> int:
    add.clear()
    add.push(1, 2)
    add.publish({"a": 10, "b": 20}, priority_control_config=PriorityConsumingControlConfig(countdown=1))
    add.publish({"a": 3, "b": 4}, priority_control_config=PriorityConsumingControlConfig(priority=5))  # first
    publish_from_plain_pymongo()
    started = time.monotonic()
    add.consume()
    result = add.publish({"a": 5, "b": 5}, priority_control_config=PriorityConsumingControlConfig(
        is_using_rpc_mode=True)).result
    print(f"RPC result of add(5, 5): {result}")
    if not done.wait(30):
        print(f"only {len(seen)} of 5 calls ran within 30 s", file=sys.stderr)
        return 1
    print(f"5 calls ran in {time.monotonic() - started:.1f} s (the delayed one last): {seen}")
    add.stop()
    add.consumer.join(10)
    broker = add.broker
    broker.drop_collections(QUEUE)  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main())
