"""One-by-one ``push`` to Redis: waiting for each reply by polling the socket first, blocking at once, or as measured.

Usage::

    python benchmarks/push_wait.py [--brokers redis_list,redis_ack_able,redis_brpoplpush,redis_stream]
                                   [--n 20000] [--rounds 9] [--threads 1]

``push`` waits for Redis to confirm each message, so its rate is one loopback round trip per
message. ``DirectConnections`` polls the socket for up to ``redis_common.SPIN_SECONDS`` before it
blocks (see ``_spin_until_readable``) when its ``PollChoice`` says polling pays off right now (it
tries both ways in turns). This benchmark measures three ways in the same process, in rotating
rounds so that a change of the host's speed hits all: for each broker kind, ``rounds`` rounds of
``f.push(i, y=i)`` N times: ``block`` (``SPIN_SECONDS`` 0: block at once), ``poll`` (always poll
first: the rule before ``PollChoice``) and ``choice`` (the default). Before each kind, a plain
Python PING loop (blocking reads, no framework) shows how fast a bare round trip is at that
moment. With ``--threads T``, T threads share each round's N pushes: then no push polls (polling is
for a thread alone on the connections), and the columns show that allowing it costs them nothing.

Uses ``FUNBOOST_LIKE_BENCH_REDIS_URL`` (default ``redis://127.0.0.1:6379/14``); the benchmark queue is
cleared before and after. A measurement, not a test: the exit code is always 0.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

KINDS = {"redis_list": "REDIS", "redis_ack_able": "REDIS_ACK_ABLE", "redis_brpoplpush": "RedisBrpopLpush",
         "redis_stream": "REDIS_STREAM"}
BENCH_REDIS_URL = os.environ.get("FUNBOOST_LIKE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")


def bare_ping_rate(url: str, n: int = 5000) -> float:
    """Round trips per second of a blocking PING loop on a raw socket (no password support needed here)."""
    parts = urlparse(url)
    with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.perf_counter()
        for _ in range(n):
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            sock.recv(64)
        return n / (time.perf_counter() - started)


WAYS = ("block", "poll", "choice")


class _AlwaysPoll:
    """A ``PollChoice`` that always polls (the rule before the choice was measured)."""

    def polls(self) -> bool:
        return True

    def took(self, seconds: float) -> None:
        pass


def measure(kind: str, n: int, rounds: int, threads: int) -> dict[str, list[float]]:
    import threading

    from funboost_like import BrokerEnum, task_deco
    from funboost_like.brokers import redis_common

    default_budget = redis_common.SPIN_SECONDS
    connections = redis_common.direct_connections()
    measured = connections.poll_choice

    @task_deco(f"bench_push_wait_{kind}", broker_kind=getattr(BrokerEnum, KINDS[kind]), log_level=30)
    def f(x: int, y: int) -> int:
        return x + y

    def push_range(start: int, stop: int) -> None:
        for i in range(start, stop):
            f.push(i, y=i)

    f.clear()
    f.get_message_count()  # opens the queue (not timed)
    n -= n % threads
    share = n // threads
    rates: dict[str, list[float]] = {way: [] for way in WAYS}
    try:
        for round_ in range(rounds):
            way = WAYS[round_ % len(WAYS)]
            redis_common.SPIN_SECONDS = 0.0 if way == "block" else default_budget
            connections.poll_choice = measured if way == "choice" else _AlwaysPoll()
            workers = [threading.Thread(target=push_range, args=(t * share, (t + 1) * share)) for t in range(threads)]
            started = time.perf_counter()
            if threads == 1:
                push_range(0, n)
            else:
                for worker in workers:
                    worker.start()
                for worker in workers:
                    worker.join()
            rates[way].append(n / (time.perf_counter() - started))
    finally:
        redis_common.SPIN_SECONDS = default_budget
        connections.poll_choice = measured
        count = f.get_message_count()
        f.clear()
    if count != n * rounds:
        print(f"  check failed: the queue held {count} messages, expected {n * rounds}")
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--brokers", default=",".join(KINDS), help=f"comma-separated: {','.join(KINDS)}")
    parser.add_argument("--n", type=int, default=20_000, help="pushes per round")
    parser.add_argument("--rounds", type=int, default=9, help="rounds per kind, rotating block / poll / choice")
    parser.add_argument("--threads", type=int, default=1, help="threads sharing each round's pushes")
    args = parser.parse_args()
    os.environ["FUNBOOST_LIKE_NO_USER_CONFIG"] = "1"
    os.environ["FUNBOOST_LIKE_REDIS_URL"] = BENCH_REDIS_URL

    print(f"push_wait  {time.strftime('%Y-%m-%dT%H:%M:%S')}  N {args.n}  rounds {args.rounds}  "
          f"threads {args.threads}  Redis {BENCH_REDIS_URL}")
    print(f"{'broker':<18}{'bare PING/s':>12}{'block: median':>15}{'poll: median':>14}{'choice: median':>16}"
          f"{'poll/block':>12}{'choice/block':>14}")
    for kind in args.brokers.split(","):
        ping = bare_ping_rate(BENCH_REDIS_URL)
        rates = measure(kind, args.n, args.rounds, args.threads)
        block, poll, choice = (statistics.median(rates[way]) for way in WAYS)
        print(f"{kind:<18}{ping:>12,.0f}{block:>15,.0f}{poll:>14,.0f}{choice:>16,.0f}"
              f"{poll / block:>11.2f}x{choice / block:>13.2f}x")


if __name__ == "__main__":
    main()
