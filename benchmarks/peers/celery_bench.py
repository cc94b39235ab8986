"""Celery workload of the peer benchmark. Runs ONLY inside the scratch virtualenv (see README.md).

Started by ``benchmarks/peers/run.py``::

    python celery_bench.py --broker-url redis://127.0.0.1:6379/13 --n 5000 --acks-late 0|1
    python celery_bench.py --broker-url amqp://guest:guest@127.0.0.1:5672// --n 5000 --acks-late 0|1

One process, no result backend (``result_backend`` unset, ``task_ignore_result=True``), JSON
serializer, the task ``f(x, y): return x + y``, queues named ``<tag>_q_acks_late_{0,1}`` (plus
``_bulk`` and ``_warm``), where the tag is ``$PEERBENCH_RUN_TAG`` (``run.py`` sets ``peerbench_<run id>``, so
that runs side by side keep apart; ``peerbench`` when unset). The broker is Redis or RabbitMQ, chosen by the
URL's scheme:

* Redis: every Redis key under the prefix ``<tag>_celery:`` (kombu's ``global_keyprefix``
  transport option). Queue lengths are ``LLEN``, unacknowledged messages (``acks_late``) the length of
  kombu's ``unacked`` hash.
* RabbitMQ (``amqp://``, kombu's py-amqp transport; Celery's defaults: persistent messages, durable
  queues, one direct exchange per queue named like the queue, no publisher confirms):
  ``worker_enable_remote_control=False``, so that the worker declares no ``celery.pidbox`` exchanges
  and no pidbox queue (the Redis runs keep Celery's default). Queue lengths come from a passive
  ``queue.declare`` on a second connection. AMQP cannot read a queue's unacknowledged count, so
  ``kombu.message.Message.ack`` is wrapped in a counter (the original still runs; Celery acks
  through it) and "nothing unacknowledged" means N acks sent.

* ``publish``: ``f.delay(i, i)`` N times; rate = N / elapsed. One ``apply_async`` to a warm-up queue
  before the clock starts opens the producer connection. On RabbitMQ, whose publishes without
  confirms are not acknowledged by the server, the clock stops when the queue holds all N messages
  (polled with a passive ``queue.declare``), as for funboost; on Redis ``LPUSH`` has already stored
  them when ``delay`` returns.
* ``bulk``: Celery has no bulk-publish call; the closest is ``group(f.s(i, i) for i in range(N))
  .apply_async()``, which sends the N messages through one producer. The signatures are built
  before the clock starts. These messages go to a separate queue that is deleted afterwards.
* ``consume``: the N messages of ``publish`` are consumed by a worker started in this process with
  ``app.worker_main(["-q", "worker", "--pool", "threads", "--concurrency", "50", ...])`` (mingle,
  gossip and heartbeat off, log level WARNING). The clock runs from the ``worker_main`` call (worker
  start-up included) until the task has run N times, counted in the task with ``itertools.count``
  (the worker runs in this process, so no Redis INCR or file append is needed), and, with
  ``acks_late`` on Redis, until kombu's unacked hash is empty, on RabbitMQ (both ``acks_late``
  settings) until N acks were sent. ``first_call_after`` tells how much of it was start-up.

Prints ``PEER-RESULT {json}`` and ends with ``os._exit``.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
import os
import sys
import threading
import time

TIMEOUT_SECONDS = 120.0
TAG = os.environ.get("PEERBENCH_RUN_TAG", "peerbench")  # run.py: peerbench_<run id>, in every name
PREFIX = f"{TAG}_celery:"


class RedisSide:
    """Queue lengths and unacked messages of kombu's Redis transport (keys under ``PREFIX``)."""

    amqp = False

    def __init__(self, url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url)
        self.versions = {"redis_py": redis.__version__}

    def transport_options(self) -> dict:
        return {"global_keyprefix": PREFIX}

    def count(self, queue: str) -> int:
        return self.client.llen(PREFIX + queue)

    def delete(self, queue: str) -> None:
        self.client.delete(PREFIX + queue)

    def pending(self, n: int, acks_late: bool) -> int | None:
        return self.client.hlen(PREFIX + "unacked") if acks_late else None


class AmqpSide:
    """Queue lengths (passive ``queue.declare``) on a second connection, and acks counted on the way out."""

    amqp = True

    def __init__(self, url: str) -> None:
        import amqp
        import kombu
        import kombu.message

        self.connection = kombu.Connection(url)
        self.channel = self.connection.channel()
        self.versions = {"py_amqp": amqp.__version__}
        acks = itertools.count(1)
        self.acks_sent = 0
        original = kombu.message.Message.ack

        def ack(message, *args, **kwargs):
            result = original(message, *args, **kwargs)
            self.acks_sent = next(acks)
            return result

        kombu.message.Message.ack = ack

    def transport_options(self) -> dict:
        return {}

    def count(self, queue: str) -> int:
        return self.channel.queue_declare(queue=queue, passive=True).message_count

    def delete(self, queue: str) -> None:
        self.channel.queue_delete(queue=queue)
        self.channel.exchange_delete(exchange=queue)

    def pending(self, n: int, acks_late: bool) -> int | None:
        return n - self.acks_sent


def main() -> None:  # noqa: C901 - one linear script
    parser = argparse.ArgumentParser()
    parser.add_argument("--broker-url", default="redis://127.0.0.1:6379/13", help="redis://... or amqp://...")
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--acks-late", type=int, default=0)
    parser.add_argument("--paths", default="publish,bulk,consume")
    args = parser.parse_args()
    n = args.n
    acks_late = bool(args.acks_late)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]

    import celery
    import kombu
    from celery import Celery, group

    side = AmqpSide(args.broker_url) if args.broker_url.startswith(("amqp", "pyamqp")) else RedisSide(args.broker_url)
    queue = f"{TAG}_q_acks_late_{int(acks_late)}"
    bulk_queue = f"{queue}_bulk"
    warm_queue = f"{queue}_warm"
    app = Celery("peerbench", broker=args.broker_url)
    app.conf.update(
        task_ignore_result=True,
        task_acks_late=acks_late,
        task_default_queue=queue,
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options=side.transport_options(),
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=True,
        worker_redirect_stdouts=False,
        enable_utc=True,
    )
    if side.amqp:
        app.conf.worker_enable_remote_control = False
    box: dict = {"counter": itertools.count(1), "first": None, "done": threading.Event()}

    @app.task(name="peerbench.f")
    def f(x, y):
        if box["first"] is None:
            box["first"] = time.perf_counter()
        if next(box["counter"]) == n:
            box["done"].set()
        return x + y

    results: dict[str, dict] = {}

    def arrived(name: str, t0: float) -> tuple[int, float]:
        """Queue length once all N are there (RabbitMQ: polled) and the elapsed time at that point."""
        count = side.count(name)
        while side.amqp and count < n and time.perf_counter() - t0 < TIMEOUT_SECONDS:
            time.sleep(0.0005)
            count = side.count(name)
        return count, time.perf_counter() - t0

    # publish one by one
    f.apply_async((0, 0), queue=warm_queue)  # warm-up, not timed
    side.delete(warm_queue)
    gc.collect()
    t0 = time.perf_counter()
    for i in range(n):
        f.delay(i, i)
    t_loop = time.perf_counter() - t0
    count, elapsed = arrived(queue, t0) if side.amqp else (side.count(queue), t_loop)
    results["publish"] = {"n": n, "elapsed": elapsed, "rate": n / elapsed, "delay_loop_seconds": t_loop,
                          "check": f"queue holds {count}", "ok_check": count == n}

    if "bulk" in paths:
        sigs = group(f.s(i, i) for i in range(n))
        gc.collect()
        try:
            t0 = time.perf_counter()
            sigs.apply_async(queue=bulk_queue)
            t_call = time.perf_counter() - t0
            count, elapsed = arrived(bulk_queue, t0) if side.amqp else (side.count(bulk_queue), t_call)
            results["bulk"] = {"n": n, "elapsed": elapsed, "rate": n / elapsed, "how": "group(...).apply_async()",
                               "apply_async_seconds": t_call, "check": f"queue holds {count}", "ok_check": count == n}
        except Exception as exc:
            results["bulk"] = {"error": f"{type(exc).__name__}: {exc}"}
        side.delete(bulk_queue)

    def report(extra: dict) -> None:
        results["consume"] = extra
        out = {"framework": "celery", "version": celery.__version__, "kombu": kombu.__version__, **side.versions,
               "transport": "amqp" if side.amqp else "redis", "acks_late": acks_late, "queue": queue,
               "prefetch_multiplier": app.conf.worker_prefetch_multiplier, "results": results}
        sys.__stdout__.write("PEER-RESULT " + json.dumps(out) + "\n")
        sys.__stdout__.flush()
        os._exit(0)

    if "consume" not in paths:
        side.delete(queue)
        report({})

    def watch(t0: float) -> None:
        finished = box["done"].wait(TIMEOUT_SECONDS)
        t_ran = time.perf_counter()
        pending = None
        if finished:
            while (pending := side.pending(n, acks_late)) and time.perf_counter() - t0 < TIMEOUT_SECONDS:
                time.sleep(0.0005)
        elapsed = time.perf_counter() - t0
        calls = next(box["counter"]) - 1
        left = side.count(queue)
        first = box["first"]
        res = {
            "n": n, "elapsed": elapsed, "rate": (n if finished else calls) / elapsed,
            "ran_all_after": t_ran - t0, "rate_calls_only": (n if finished else calls) / (t_ran - t0),
            "first_call_after": None if first is None else first - t0,
            "rate_from_first_call": None if first is None else n / (t_ran - first),
            "acks_waited": acks_late or side.amqp, "pending_at_end": pending,
            "check": f"{calls} calls, {left} left in queue", "ok_check": finished and calls == n and left == 0,
        }
        if not finished:
            res["error"] = f"timed out after {TIMEOUT_SECONDS:.0f}s with {calls} of {n} calls run"
        report(res)

    logging.getLogger().setLevel(logging.WARNING)
    gc.collect()
    t0 = time.perf_counter()
    threading.Thread(target=watch, args=(t0,), daemon=True).start()
    app.worker_main([
        "-q", "worker", "--pool", "threads", "--concurrency", "50", "--queues", queue, "--loglevel", "WARNING",
        "--without-mingle", "--without-gossip", "--without-heartbeat", "--hostname", f"peerbench-{os.getpid()}@%h",
    ])


if __name__ == "__main__":
    main()
