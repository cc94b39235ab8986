"""How late delayed routed messages reach their queues on RabbitMQ (the hop through fl.routed.<exchange>).

``python benchmarks/rabbitmq_routed_delay.py [--n 2000] [--delay 1.0] [--kind RABBITMQ_PIKA] [--repeat 3]``

Each repetition binds a fresh queue to a fresh fanout exchange, publishes N messages through the
exchange in batches of 500 (``publish_routed`` with ``not_before`` = the same instant, ``--delay``
seconds ahead) and fetches them as fast as the broker gives them. It prints the lateness of each
message (fetch time minus due time: p50, p99, max) and the time from the due instant until the last
one arrived. Needs RabbitMQ at ``FUNBOOST_LIKE_RABBITMQ_URL`` (default 127.0.0.1:5672, guest/guest);
the queues and exchanges it made are deleted afterwards. Always exits 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from funboost_like import BrokerEnum, patch_frame_config  # noqa: E402
from funboost_like.brokers.registry import broker_class  # noqa: E402


def run(kind: BrokerEnum, n: int, delay: float) -> dict[str, float]:
    broker = broker_class(kind)()
    tag = uuid.uuid4().hex[:10]
    queue, exchange = f"bench_routed_{tag}", f"bench_routed_x_{tag}"
    try:
        broker.bind(queue, exchange, "fanout", [""])
        assert broker.fetch(queue, 1, 0.05) == []  # subscribed before the messages are due
        due = time.time() + delay
        for start in range(0, n, 500):
            broker.publish_routed(exchange, "", [b'{"i":%d}' % i for i in range(start, min(n, start + 500))],
                                  not_before=due)
        lateness: list[float] = []
        deadline = due + 60
        while len(lateness) < n and time.time() < deadline:
            got = broker.fetch(queue, 500, 1.0)
            now = time.time()
            lateness += [now - due] * len(got)
            if got:
                broker.ack(got)
        lateness.sort()
        return {"arrived": len(lateness), "p50_ms": 1000 * statistics.median(lateness) if lateness else -1,
                "p99_ms": 1000 * lateness[int(0.99 * (len(lateness) - 1))] if lateness else -1,
                "last_ms": 1000 * lateness[-1] if lateness else -1}
    finally:
        broker.close()
        _delete(queue, exchange)


def _delete(queue: str, exchange: str) -> None:
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(os.environ.get(
        "FUNBOOST_LIKE_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")))
    channel = connection.channel()
    for name in (queue, f"fl.routed.{exchange}"):
        channel.queue_delete(name)
    channel.exchange_delete(exchange)
    connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--delay", type=float, default=1.0)
    parser.add_argument("--kind", default="RABBITMQ_PIKA")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    patch_frame_config(RABBITMQ_URL=os.environ.get("FUNBOOST_LIKE_RABBITMQ_URL",
                                                   "amqp://guest:guest@127.0.0.1:5672/%2F"))
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, load average {os.getloadavg()[0]:.2f}, "
          f"{args.kind}, N={args.n}, delay {args.delay}s")
    for i in range(args.repeat):
        result = run(BrokerEnum[args.kind], args.n, args.delay)
        print(f"run {i + 1}: arrived {result['arrived']}/{args.n}, lateness p50 {result['p50_ms']:.0f} ms, "
              f"p99 {result['p99_ms']:.0f} ms, last {result['last_ms']:.0f} ms")
    print(f"# load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
