"""RabbitMQ tutorial 5, "Topics": a topic exchange "topic_logs" routes by patterns of dot-separated words.

    python test_frame/rabbitmq_tutorial/5_topics.py

Routing keys describe animals as "<speed>.<colour>.<species>". In a binding key ``*`` stands for
exactly one word and ``#`` for zero or more words. Q1 is bound with "*.orange.*" (every orange
animal), Q2 with "*.*.rabbit" and "lazy.#" (every rabbit, every lazy animal). A message reaches a
queue once, however many of its bindings match; a key no binding matches raises ``UnroutableError``.
"""

from __future__ import annotations

import logging
import sys

from common import BROKER, Inbox, bind_now, exchange, queue, say, stop

from funboost_like import task_deco
from funboost_like.core.errors import UnroutableError

TOPIC_LOGS = {"exchange_name": exchange("topic_logs"), "exchange_type": "topic"}
KEYS = ["quick.orange.rabbit", "lazy.orange.elephant", "quick.orange.fox", "lazy.brown.fox", "lazy.pink.rabbit",
        "quick.brown.fox", "orange", "quick.orange.male.rabbit", "lazy.orange.male.rabbit"]
inbox = Inbox()


@task_deco(queue("topic_q1"), broker_kind=BROKER, log_level=logging.WARNING,
           broker_exclusive_config={**TOPIC_LOGS, "routing_key_for_bind": "*.orange.*"})
def q1(animal: str) -> None:
    inbox.add("Q1", animal)


@task_deco(queue("topic_q2"), broker_kind=BROKER, log_level=logging.WARNING,
           broker_exclusive_config={**TOPIC_LOGS, "routing_key_for_bind": ["*.*.rabbit", "lazy.#"]})
def q2(animal: str) -> None:
    inbox.add("Q2", animal)


def main() -> int:
    for subscriber in (q1, q2):
        subscriber.clear()
        subscriber.consume()
    bind_now(q1, q2)
    for key in KEYS:
        try:
            q1.publish({"animal": key}, routing_key=key)  # through the exchange, to every matching queue
            say(f" [x] Sent {key}")
        except UnroutableError:
            say(f" [x] {key} dropped: no queue matches")
    arrived = inbox.wait({"Q1": 3, "Q2": 5})
    stop(q1, q2)
    say(f"Q1 (*.orange.*) got: {', '.join(sorted(inbox.got.get('Q1', []), key=KEYS.index))}")
    say(f"Q2 (*.*.rabbit, lazy.#) got: {', '.join(sorted(inbox.got.get('Q2', []), key=KEYS.index))}")
    return 0 if arrived else 1


if __name__ == "__main__":
    sys.exit(main())
