"""RabbitMQ tutorial 4, "Routing": a direct exchange "direct_logs" routes each message by its severity.

    python test_frame/rabbitmq_tutorial/4_routing.py

One queue is bound with the key "error" (errors are saved to disk), another with "info", "warning"
and "error" (everything is printed on screen). A message published with the routing key "error"
reaches both, "info" and "warning" only the screen. No queue is bound with "debug": where RabbitMQ
would drop such a message in silence, the publish raises ``UnroutableError``.
"""

from __future__ import annotations

import logging
import sys

from common import BROKER, Inbox, bind_now, exchange, queue, say, stop

from funboost_like import task_deco
from funboost_like.core.errors import UnroutableError

DIRECT_LOGS = {"exchange_name": exchange("direct_logs"), "exchange_type": "direct"}
MESSAGES = [("info", "the service started"), ("warning", "disk 90% full"), ("error", "disk full"),
            ("debug", "cache hit")]
inbox = Inbox()


@task_deco(queue("direct_errors"), broker_kind=BROKER, log_level=logging.WARNING,
           broker_exclusive_config={**DIRECT_LOGS, "routing_key_for_bind": "error"})
def save_errors_to_disk(message: str) -> None:
    inbox.add("disk", message)


@task_deco(queue("direct_console"), broker_kind=BROKER, log_level=logging.WARNING,
           broker_exclusive_config={**DIRECT_LOGS, "routing_key_for_bind": ["info", "warning", "error"]})
def print_on_screen(message: str) -> None:
    inbox.add("screen", message)


def main() -> int:
    for subscriber in (save_errors_to_disk, print_on_screen):
        subscriber.clear()
        subscriber.consume()
    bind_now(save_errors_to_disk, print_on_screen)
    for severity, text in MESSAGES:
        try:  # publish through the function's exchange, to every queue bound with this key
            print_on_screen.publish({"message": f"{severity}: {text}"}, routing_key=severity)
            say(f" [x] Sent {severity!r}: {text!r}")
        except UnroutableError:
            say(f" [x] {severity!r}: {text!r} dropped: no queue matches")
    arrived = inbox.wait({"disk": 1, "screen": 3})
    stop(save_errors_to_disk, print_on_screen)
    order = [f"{severity}: {text}" for severity, text in MESSAGES]
    for who in ("disk", "screen"):
        say(f"{who} got: {', '.join(sorted(inbox.got.get(who, []), key=order.index))}")
    return 0 if arrived else 1


if __name__ == "__main__":
    sys.exit(main())
