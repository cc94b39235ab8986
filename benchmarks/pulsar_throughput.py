"""Publish and consume throughput of the PULSAR broker (issue 14), on pulsar-lite or the server at
``FUNBOOST_LIKE_BENCH_PULSAR_URL`` (default ``pulsar://127.0.0.1:6650``; when nothing listens there a
pulsar-lite is started for the run, with its files in a temporary folder, and stopped at the end).

Usage::

    python benchmarks/pulsar_throughput.py [--n N] [--repeat R] [--paths publish,bulk,consume]

Same paths and rules as ``benchmarks/throughput.py``, in one process, with ``def f(x, y): return x + y``,
``concurrent_num=50`` and log level WARNING, a new queue per path and repetition:

* ``publish one-by-one``: ``f.push(i, y=i)`` N times (each waits for the server's receipt);
* ``publish bulk``: ``f.publish_many`` over N messages in chunks of 10,000;
* ``consume (acked)``: N messages published first (not timed); from ``f.consume()`` until the function
  ran N times and this process holds no unacknowledged message. Then the run is checked: exactly N
  calls, nothing left in the queue (``count``, which on Pulsar receives what is left; see docs/pulsar.md).

The median and best rate of the repetitions are printed. The package measured is this checkout's,
unless ``PYTHONPATH`` names another one (``benchmarks/pair_pulsar_consume.sh`` compares two). A
measurement, not a test: exit code 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

# After the PYTHONPATH entries, so PYTHONPATH=/another/checkout measures that checkout's package.
sys.path.insert(1 + len([p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
                str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("FUNBOOST_LIKE_NO_USER_CONFIG", "1")

from funboost_like import BrokerEnum, task_deco  # noqa: E402
from funboost_like.brokers.registry import get_broker  # noqa: E402
from funboost_like.core import runtime  # noqa: E402
from funboost_like.core.config import patch_frame_config  # noqa: E402
from tests.pulsar_server import PulsarLiteServer, _listening  # noqa: E402

URL = os.environ.get("FUNBOOST_LIKE_BENCH_PULSAR_URL", "pulsar://127.0.0.1:6650")


def _function(queue: str, counter: list[int], done: threading.Event, n: int):  # type: ignore[no-untyped-def]
    lock = threading.Lock()

    @task_deco(queue, broker_kind=BrokerEnum.PULSAR, concurrent_num=50, log_level=logging.WARNING)
    def f(x: int, y: int) -> int:
        with lock:
            counter[0] += 1
            if counter[0] >= n:
                done.set()
        return x + y

    return f


def one_run(path: str, n: int) -> float:
    queue = f"bench_pulsar_{uuid.uuid4().hex[:10]}"
    counter, done = [0], threading.Event()
    f = _function(queue, counter, done, n)
    broker = get_broker(BrokerEnum.PULSAR)
    f.get_message_count()  # makes the topics and the producer before the clock starts
    try:
        if path == "publish one-by-one":
            started = time.perf_counter()
            for i in range(n):
                f.push(i, y=i)
            return n / (time.perf_counter() - started)
        messages = [{"x": i, "y": i} for i in range(n)]
        if path == "publish bulk":
            started = time.perf_counter()
            for at in range(0, n, 10_000):
                f.publisher.publish_many(messages[at:at + 10_000])
            return n / (time.perf_counter() - started)
        for at in range(0, n, 10_000):
            f.publisher.publish_many(messages[at:at + 10_000])
        started = time.perf_counter()
        f.consume()
        while not done.wait(0.01) or broker.in_flight(queue):
            pass
        rate = n / (time.perf_counter() - started)
        runtime.stop_all(timeout=10)
        assert counter[0] == n, f"{counter[0]} calls for {n} messages"
        assert f.get_message_count() == 0
        return rate
    finally:
        runtime.stop_all(timeout=10)
        broker.purge(queue)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--paths", default="publish,bulk,consume", help="comma-separated: publish, bulk, consume")
    args = parser.parse_args(argv)
    parts = urlsplit(URL)
    server = None
    if not _listening(parts.port or 6650):
        server = PulsarLiteServer(Path(tempfile.mkdtemp(prefix="pulsar-bench-")), parts.port or 6650)
        server.start()
    patch_frame_config(PULSAR_URL=URL)
    try:
        names = {"publish": "publish one-by-one", "bulk": "publish bulk", "consume": "consume (acked)"}
        for path in (names[name] for name in args.paths.split(",")):
            rates = [one_run(path, args.n) for _ in range(args.repeat)]
            print(f"pulsar  {path:<20} n={args.n:<7} median {statistics.median(rates):>9,.0f}/s   "
                  f"best {max(rates):>9,.0f}/s", flush=True)
    finally:
        if server is not None:
            server.stop()
            shutil.rmtree(server.folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
