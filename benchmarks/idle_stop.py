"""How long ``stop()`` and ``join()`` take on an idle consumer, per broker kind and concurrency mode.

Usage::

    python benchmarks/idle_stop.py [--brokers RABBITMQ_PIKA,REDIS_ACK_ABLE,LOCAL_PYTHON_QUEUE] [--modes 1,4,5]
                                   [--rounds 4]

Each round starts a consumer of a new, empty queue, lets its fetcher reach its idle wait (0.3 s), then
times ``stop()`` plus ``join()``. Modes are ``ConcurrentModeEnum`` numbers (GEVENT and EVENTLET need
their monkey patch: run those in a script that patches first). Servers come from the usual settings.
"""

from __future__ import annotations

import argparse
import time
import uuid

from funboost_like import BrokerEnum, task_deco


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--brokers", default="RABBITMQ_PIKA,RABBITMQ_AMQPSTORM,RABBITMQ_RABBITPY,REDIS_ACK_ABLE,"
                                             "LOCAL_PYTHON_QUEUE")
    parser.add_argument("--modes", default="1,4,5")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    for kind in args.brokers.split(","):
        for mode in (int(m) for m in args.modes.split(",")):
            async def coroutine(x: int) -> None:
                return None

            times = []
            for _ in range(args.rounds):
                booster = task_deco(f"idle_stop_{uuid.uuid4().hex[:8]}", broker_kind=BrokerEnum[kind],
                                    concurrent_mode=mode)(coroutine if mode == 4 else (lambda x: None))
                booster.consume()
                time.sleep(0.3)
                began = time.monotonic()
                booster.stop()
                booster.consumer.join(5)
                times.append(time.monotonic() - began)
                booster.clear()
            print(f"{kind:22s} mode {mode}: stop+join " + ", ".join(f"{t:.3f}" for t in times) + " s", flush=True)


if __name__ == "__main__":
    main()
