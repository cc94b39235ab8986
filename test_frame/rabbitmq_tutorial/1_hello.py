"""RabbitMQ tutorial 1, "Hello World!": one producer sends a message to queue "hello", one consumer prints it.

    python test_frame/rabbitmq_tutorial/1_hello.py

With pika this is ``queue_declare``, ``basic_publish`` and ``basic_consume``; here the queue belongs
to the function, ``push`` publishes a call of it and ``consume`` runs the calls in background threads.
"""

from __future__ import annotations

import logging
import sys

from common import BROKER, Inbox, queue, say, stop

from funboost_like import task_deco

inbox = Inbox()


@task_deco(queue("hello"), broker_kind=BROKER, log_level=logging.WARNING)
def hello(body: str) -> None:
    inbox.add("consumer", body)


def main() -> int:
    hello.clear()  # start from an empty queue
    hello.push("Hello World!")  # the producer
    say(f" [x] Sent 'Hello World!' to queue {hello.queue_name!r} on {BROKER.name}")
    hello.consume()  # the consumer: returns at once, the calls run in background threads
    arrived = inbox.wait({"consumer": 1})
    stop(hello)
    say("done" if arrived else "timed out waiting for the message")
    return 0 if arrived else 1


if __name__ == "__main__":
    sys.exit(main())
