"""One-by-one ``push``: waiting for each reply by polling the socket first, blocking at once, or as measured.

Usage::

    python benchmarks/push_wait.py [--brokers redis_list,redis_ack_able,redis_brpoplpush,redis_stream]
                                   [--n 20000] [--rounds 9] [--threads 1]
    python benchmarks/push_wait.py --brokers nats,mqtt,zeromq --n 5000

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

The NATS, MQTT and ZeroMQ publishers wait for their PubAck, PUBACK or hub reply the same way (their
modules' ``SPIN_SECONDS`` and the ``poll_choice`` of their publishers): ``nats`` on
``FUNBOOST_LIKE_BENCH_NATS_URL`` (default ``nats://127.0.0.1:4222``, the queue's streams deleted at the end),
``mqtt`` on the benchmark Mosquitto of ``FUNBOOST_LIKE_BENCH_MQTT_URL`` (default ``mqtt://127.0.0.1:18830``,
started for the run when nothing listens there: ``benchmarks/mqtt_server.py``), ``zeromq`` in the hub of
``FUNBOOST_LIKE_BENCH_ZEROMQ_PORT`` (default 29518, stopped at the end). Their "bare PING/s" column is the
Redis one (a measure of the host's speed at that moment).

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
from typing import Any
from urllib.parse import urlparse

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

KINDS = {"redis_list": "REDIS", "redis_ack_able": "REDIS_ACK_ABLE", "redis_brpoplpush": "RedisBrpopLpush",
         "redis_stream": "REDIS_STREAM", "nats": "NATS", "mqtt": "MQTT", "zeromq": "ZEROMQ"}
DEFAULT_KINDS = "redis_list,redis_ack_able,redis_brpoplpush,redis_stream"
BENCH_REDIS_URL = os.environ.get("FUNBOOST_LIKE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
BENCH_NATS_URL = os.environ.get("FUNBOOST_LIKE_BENCH_NATS_URL", "nats://127.0.0.1:4222")
BENCH_MQTT_URL = os.environ.get("FUNBOOST_LIKE_BENCH_MQTT_URL", "mqtt://127.0.0.1:18830")
BENCH_ZEROMQ_PORT = int(os.environ.get("FUNBOOST_LIKE_BENCH_ZEROMQ_PORT", "29518"))


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


def knobs(kind: str, f: Any) -> tuple[Any, Any]:
    """The module whose ``SPIN_SECONDS`` bounds the polling of ``kind``'s push, and the object whose
    ``poll_choice`` decides it (after one push has opened the publisher)."""
    from funboost_like.brokers import mqtt_wire, nats_wire, redis_common, zeromq_broker

    if kind == "nats":
        return nats_wire, f.broker._wires
    if kind == "mqtt":
        return mqtt_wire, f.broker._wires
    if kind == "zeromq":
        [link] = f.broker._links.values()
        return zeromq_broker, link
    return redis_common, redis_common.direct_connections()


def measure(kind: str, n: int, rounds: int, threads: int) -> dict[str, list[float]]:
    import threading

    from funboost_like import BrokerEnum, task_deco

    @task_deco(f"bench_push_wait_{kind}", broker_kind=getattr(BrokerEnum, KINDS[kind]), log_level=30)
    def f(x: int, y: int) -> int:
        return x + y

    f.clear()
    f.push(-1, y=-1)  # opens the queue and the publisher (not timed)
    module, holder = knobs(kind, f)
    default_budget = module.SPIN_SECONDS
    measured = holder.poll_choice

    def push_range(start: int, stop: int) -> None:
        for i in range(start, stop):
            f.push(i, y=i)

    n -= n % threads
    share = n // threads
    rates: dict[str, list[float]] = {way: [] for way in WAYS}
    try:
        for round_ in range(rounds):
            way = WAYS[round_ % len(WAYS)]
            module.SPIN_SECONDS = 0.0 if way == "block" else default_budget
            holder.poll_choice = measured if way == "choice" else _AlwaysPoll()
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
        module.SPIN_SECONDS = default_budget
        holder.poll_choice = measured
        count = f.get_message_count()
        f.clear()
        if kind == "nats":
            f.broker.delete_queue(f.queue_name)
        elif kind == "zeromq":
            f.broker.stop_hub(f.queue_name)
    if count != n * rounds + 1:
        print(f"  check failed: the queue held {count} messages, expected {n * rounds + 1}")
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--brokers", default=DEFAULT_KINDS, help=f"comma-separated: {','.join(KINDS)}")
    parser.add_argument("--n", type=int, default=20_000, help="pushes per round")
    parser.add_argument("--rounds", type=int, default=9, help="rounds per kind, rotating block / poll / choice")
    parser.add_argument("--threads", type=int, default=1, help="threads sharing each round's pushes")
    args = parser.parse_args()
    os.environ["FUNBOOST_LIKE_NO_USER_CONFIG"] = "1"
    os.environ["FUNBOOST_LIKE_REDIS_URL"] = BENCH_REDIS_URL
    from funboost_like import patch_frame_config

    patch_frame_config(NATS_URL=BENCH_NATS_URL, MQTT_URL=BENCH_MQTT_URL, ZEROMQ_PORT=BENCH_ZEROMQ_PORT)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import mqtt_server  # benchmarks/mqtt_server.py: the benchmark Mosquitto, started here when absent

    mosquitto = mqtt_server.ensure(BENCH_MQTT_URL) if "mqtt" in args.brokers.split(",") else None
    try:
        run(args)
    finally:
        mqtt_server.stop(mosquitto)


def run(args: argparse.Namespace) -> None:
    print(f"push_wait  {time.strftime('%Y-%m-%dT%H:%M:%S')}  load {os.getloadavg()[0]:.2f}  N {args.n}  "
          f"rounds {args.rounds}  threads {args.threads}  Redis {BENCH_REDIS_URL}")
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
