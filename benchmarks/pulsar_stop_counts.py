"""What a graceful stop of a PULSAR consumer leaves counted as crashes, with a backlog.

Usage::

    python benchmarks/pulsar_stop_counts.py [--n 600] [--stop-after 150] [--repeat 3]

On the server at ``FUNBOOST_LIKE_BENCH_PULSAR_URL`` (default ``pulsar://127.0.0.1:6650``; start a
pulsar-lite there first, ``tests/pulsar_server.py``). Each run publishes ``--n`` messages to a new
queue, consumes them with ``concurrent_num=50`` and a 10 ms function, stops the consumer gracefully
(``runtime.stop_all``) once ``--stop-after`` calls ran, closes the broker, then takes everything left
with a new broker and prints how many of those deliveries count a crash, how many messages are
missing (neither run nor left) and how many ran twice. A measurement, not a test: exit code 0.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import sys
import threading
import time
import uuid
from pathlib import Path

# After the PYTHONPATH entries, so PYTHONPATH=/another/checkout measures that checkout's package.
sys.path.insert(1 + len([p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
                str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("FUNBOOST_LIKE_NO_USER_CONFIG", "1")

from funboost_like import BrokerEnum, task_deco  # noqa: E402
from funboost_like.brokers.pulsar_broker import PulsarBroker  # noqa: E402
from funboost_like.brokers.registry import get_broker  # noqa: E402
from funboost_like.core import runtime  # noqa: E402
from funboost_like.core.config import patch_frame_config  # noqa: E402

URL = os.environ.get("FUNBOOST_LIKE_BENCH_PULSAR_URL", "pulsar://127.0.0.1:6650")


def one_run(n: int, stop_after: int) -> str:
    queue = f"bench_pulsar_stop_{uuid.uuid4().hex[:10]}"
    ran: collections.Counter[int] = collections.Counter()
    lock = threading.Lock()

    @task_deco(queue, broker_kind=BrokerEnum.PULSAR, concurrent_num=50, log_level=logging.WARNING)
    def f(i: int) -> None:
        time.sleep(0.01)
        with lock:
            ran[i] += 1

    f.publisher.publish_many([{"i": i} for i in range(n)])
    f.consume()
    while sum(ran.values()) < stop_after:
        time.sleep(0.005)
    runtime.stop_all(timeout=10)
    get_broker(BrokerEnum.PULSAR).close()
    before = sum(ran.values())
    taker = PulsarBroker()
    try:
        left = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            got = taker.fetch(queue, 100, 0.5)
            taker.ack(got)
            left += got
            if not got and before + len(left) >= n:
                break
        seen = set(ran) | {json.loads(d.body)["i"] for d in left}
        counted = sum(1 for d in left if d.crashes)
        taker.purge(queue)
    finally:
        taker.close()
    return (f"ran before the stop {before}, left {len(left)}, of those counting a crash {counted}, "
            f"missing {n - len(seen)}, ran twice {sum(1 for v in ran.values() if v > 1)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--stop-after", type=int, default=150)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    patch_frame_config(PULSAR_URL=URL)
    for _ in range(args.repeat):
        print(one_run(args.n, args.stop_after), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
