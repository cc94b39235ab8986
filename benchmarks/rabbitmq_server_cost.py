"""What a confirmed, persistent publish costs RabbitMQ itself: the server's CPU per message beside ours.

Usage::

    python benchmarks/rabbitmq_server_cost.py [--kind RABBITMQ_AMQPSTORM] [--n 3000] [--bulk 100000]

Issue 11 asks for ``push`` one by one at 8,000/s and ``publish_many`` at 40,000/s with confirms on and
persistent messages. This measures where the time goes, on a RabbitMQ running on this machine (its
``beam.smp`` process is found in ``/proc``, and its CPU time read before and after each path):

* ``push`` one by one: N pushes of our kind, then the same with a bare pika client (no framework,
  ``confirm_delivery``, delivery mode 2), then bare pika with transient messages;
* ``publish_many``: ``--bulk`` messages in chunks of 10,000 with our kind.

For each path: the rate, our process's CPU per message, and RabbitMQ's CPU per message. A push waits
for its confirm, so the server's CPU per push bounds the one-by-one rate at 1 / that figure even
with a client that costs nothing; a bulk publish keeps the server busy, so its rate is bounded by
the machine's cores divided by the server's CPU per message. Both ceilings are printed. Queues are
declared as ours are (durable, ``x-queue-version`` 2) and deleted afterwards. The URL is
``RABBITMQ_URL`` from the settings. A measurement, not a test: the exit code is 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def server_pid() -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "beam.smp":
                    return int(entry.name)
            except OSError:
                continue
    raise SystemExit("no beam.smp process on this machine: RabbitMQ must run here for this measurement")


def server_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def measure(name: str, n: int, run: Callable[[], None], pid: int) -> float:
    server, ours, started = server_cpu(pid), time.process_time(), time.perf_counter()
    run()
    elapsed = time.perf_counter() - started
    server_per, ours_per = (server_cpu(pid) - server) / n, (time.process_time() - ours) / n
    print(f"{name:48} {n / elapsed:9,.0f}/s   ours {ours_per * 1e6:6.1f} µs/msg   "
          f"RabbitMQ {server_per * 1e6:6.1f} µs/msg", flush=True)
    return server_per


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="RABBITMQ_AMQPSTORM")
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--bulk", type=int, default=100_000)
    args = parser.parse_args()
    import pika

    from funboost_like import task_deco
    from funboost_like.core.config import settings

    pid = server_pid()
    queue = f"fl_bench_server_cost_{os.getpid()}"

    @task_deco(queue, broker_kind=args.kind)
    def f(x: int) -> None:
        pass

    f.clear()
    f.push(0)  # connect and declare outside the timed part
    push_cost = measure(f"{args.kind} push one by one", args.n, lambda: [f.push(i) for i in range(args.n)], pid)
    messages = [{"x": i} for i in range(args.bulk)]

    def bulk() -> None:
        for start in range(0, args.bulk, 10_000):
            f.publish_many(messages[start:start + 10_000])

    bulk_cost = measure(f"{args.kind} publish_many (chunks of 10,000)", args.bulk, bulk, pid)
    f.clear()

    connection = pika.BlockingConnection(pika.URLParameters(str(settings.get("RABBITMQ_URL"))))
    channel = connection.channel()
    channel.confirm_delivery()
    bare = f"{queue}_pika"
    channel.queue_declare(bare, durable=True, arguments={"x-queue-version": 2})
    body = b'{"x": 1, "extra": {"task_id": "0123456789abcdef0123456789abcdef", "publish_time": 1.0}}'
    for mode, label in ((2, "persistent"), (1, "transient")):
        properties = pika.BasicProperties(delivery_mode=mode, content_type="application/json")
        measure(f"bare pika push one by one, {label}", args.n,
                lambda properties=properties: [channel.basic_publish("", bare, body, properties)
                                               for _ in range(args.n)], pid)
    channel.queue_delete(bare)
    channel.queue_delete(queue)
    connection.close()
    cores = os.cpu_count() or 1
    print(f"\nceilings from RabbitMQ's own CPU alone: push one by one {1 / push_cost:,.0f}/s "
          f"(one confirm at a time), publish_many {cores / bulk_cost:,.0f}/s ({cores} cores, all of them RabbitMQ's)")


if __name__ == "__main__":
    main()
