"""RabbitMQ tutorial 3, "Publish/Subscribe": a fanout exchange "logs" copies every message to every queue bound to it.

    python test_frame/rabbitmq_tutorial/3_publish_subscribe.py

Two functions, each with its own queue bound to the exchange: one "saves logs to disk", the other
"prints them on screen". A fanout exchange ignores routing keys, so a plain ``push`` of either
function goes through the exchange and reaches both queues: each log line runs in both functions.
"""

from __future__ import annotations

import logging
import sys

from common import BROKER, Inbox, bind_now, exchange, queue, say, stop

from funboost_like import task_deco

LOGS = {"exchange_name": exchange("logs"), "exchange_type": "fanout"}
LINES = ["info: Hello World!", "warning: disk almost full", "error: disk full"]
inbox = Inbox()


@task_deco(queue("logs_to_disk"), broker_kind=BROKER, broker_exclusive_config=LOGS, log_level=logging.WARNING)
def save_to_disk(line: str) -> None:
    inbox.add("disk", line)


@task_deco(queue("logs_to_screen"), broker_kind=BROKER, broker_exclusive_config=LOGS, log_level=logging.WARNING)
def print_on_screen(line: str) -> None:
    inbox.add("screen", line)


def main() -> int:
    for subscriber in (save_to_disk, print_on_screen):
        subscriber.clear()
        subscriber.consume()
    bind_now(save_to_disk, print_on_screen)  # a queue gets only what is published after it was bound
    for line in LINES:
        save_to_disk.push(line)  # through the exchange: to every bound queue, print_on_screen's too
        say(f" [x] Sent {line!r} to exchange {LOGS['exchange_name']!r}")
    arrived = inbox.wait({"disk": len(LINES), "screen": len(LINES)})
    stop(save_to_disk, print_on_screen)
    for who in ("disk", "screen"):
        say(f"{who} got: {', '.join(sorted(inbox.got.get(who, []), key=LINES.index))}")
    return 0 if arrived else 1


if __name__ == "__main__":
    sys.exit(main())
