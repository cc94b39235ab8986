"""Celery workload of the peer benchmark. Runs ONLY inside the scratch virtualenv (see README.md).

Started by ``benchmarks/peers/run.py``::

    python celery_bench.py --redis-url redis://127.0.0.1:6379/13 --n 5000 --acks-late 0|1

One process, Redis broker, no result backend (``result_backend`` unset, ``task_ignore_result=True``),
JSON serializer, every Redis key under the prefix ``peerbench_celery:`` (kombu's
``global_keyprefix`` transport option), the task ``f(x, y): return x + y``:

* ``publish``: ``f.delay(i, i)`` N times; rate = N / elapsed. One ``apply_async`` to a warm-up queue
  before the clock starts opens the producer connection.
* ``bulk``: Celery has no bulk-publish call; the closest is ``group(f.s(i, i) for i in range(N))
  .apply_async()``, which sends the N messages through one producer. The signatures are built
  before the clock starts. These messages go to a separate queue that is deleted afterwards.
* ``consume``: the N messages of ``publish`` are consumed by a worker started in this process with
  ``app.worker_main(["-q", "worker", "--pool", "threads", "--concurrency", "50", ...])`` (mingle,
  gossip and heartbeat off, log level WARNING). The clock runs from the ``worker_main`` call (worker
  start-up included) until the task has run N times, counted in the task with ``itertools.count``
  (the worker runs in this process, so no Redis INCR or file append is needed), and, with
  ``acks_late``, until kombu's unacked hash is empty. ``first_call_after`` tells how much of it was
  start-up.

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
PREFIX = "peerbench_celery:"


def main() -> None:  # noqa: C901 - one linear script
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--acks-late", type=int, default=0)
    parser.add_argument("--paths", default="publish,bulk,consume")
    args = parser.parse_args()
    n = args.n
    acks_late = bool(args.acks_late)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]

    import celery
    import kombu
    import redis
    from celery import Celery, group

    queue = f"peerbench_q_acks_late_{int(acks_late)}"
    bulk_queue = f"{queue}_bulk"
    warm_queue = f"{queue}_warm"
    app = Celery("peerbench", broker=args.redis_url)
    app.conf.update(
        task_ignore_result=True,
        task_acks_late=acks_late,
        task_default_queue=queue,
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options={"global_keyprefix": PREFIX},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=True,
        worker_redirect_stdouts=False,
        enable_utc=True,
    )
    box: dict = {"counter": itertools.count(1), "first": None, "done": threading.Event()}

    @app.task(name="peerbench.f")
    def f(x, y):
        if box["first"] is None:
            box["first"] = time.perf_counter()
        if next(box["counter"]) == n:
            box["done"].set()
        return x + y

    rc = redis.Redis.from_url(args.redis_url)
    results: dict[str, dict] = {}

    # publish one by one
    f.apply_async((0, 0), queue=warm_queue)  # warm-up, not timed
    rc.delete(PREFIX + warm_queue)
    gc.collect()
    t0 = time.perf_counter()
    for i in range(n):
        f.delay(i, i)
    elapsed = time.perf_counter() - t0
    count = rc.llen(PREFIX + queue)
    results["publish"] = {"n": n, "elapsed": elapsed, "rate": n / elapsed, "check": f"queue holds {count}",
                          "ok_check": count == n}

    if "bulk" in paths:
        sigs = group(f.s(i, i) for i in range(n))
        gc.collect()
        try:
            t0 = time.perf_counter()
            sigs.apply_async(queue=bulk_queue)
            elapsed = time.perf_counter() - t0
            count = rc.llen(PREFIX + bulk_queue)
            results["bulk"] = {"n": n, "elapsed": elapsed, "rate": n / elapsed, "how": "group(...).apply_async()",
                               "check": f"queue holds {count}", "ok_check": count == n}
        except Exception as exc:
            results["bulk"] = {"error": f"{type(exc).__name__}: {exc}"}
        rc.delete(PREFIX + bulk_queue)

    def report(extra: dict) -> None:
        results["consume"] = extra
        out = {"framework": "celery", "version": celery.__version__, "kombu": kombu.__version__,
               "redis_py": redis.__version__, "acks_late": acks_late, "queue": queue,
               "prefetch_multiplier": app.conf.worker_prefetch_multiplier, "results": results}
        sys.__stdout__.write("PEER-RESULT " + json.dumps(out) + "\n")
        sys.__stdout__.flush()
        os._exit(0)

    if "consume" not in paths:
        rc.delete(PREFIX + queue)
        report({})

    def watch(t0: float) -> None:
        finished = box["done"].wait(TIMEOUT_SECONDS)
        t_ran = time.perf_counter()
        pending = None
        if finished and acks_late:
            while (pending := rc.hlen(PREFIX + "unacked")) and time.perf_counter() - t0 < TIMEOUT_SECONDS:
                time.sleep(0.0005)
        elapsed = time.perf_counter() - t0
        calls = next(box["counter"]) - 1
        left = rc.llen(PREFIX + queue)
        first = box["first"]
        res = {
            "n": n, "elapsed": elapsed, "rate": (n if finished else calls) / elapsed,
            "ran_all_after": t_ran - t0, "rate_calls_only": (n if finished else calls) / (t_ran - t0),
            "first_call_after": None if first is None else first - t0,
            "rate_from_first_call": None if first is None else n / (t_ran - first),
            "acks_waited": acks_late, "pending_at_end": pending,
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
