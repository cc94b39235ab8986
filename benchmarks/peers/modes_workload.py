"""One run of the ``modes`` set of the peer benchmark: one framework, one broker, one mode, one workload.

The same script runs on both sides, so both get the same workload and the same clocks: with the project's
Python for funboost_like, with the scratch virtualenv's for funboost 55 (started by ``modes_set.py`` with
``PYTHONPATH=benchmarks/peers/funboost_home``, as ``funboost_bench.py`` is)::

    python modes_workload.py --framework ours|funboost --broker memory|sqlite|redis_ack_able
                             --mode threading|gevent|eventlet|asyncio|single_thread --work trivial|io
                             --n N --concurrency C --queue NAME [--redis-url URL] [--tmp DIR]

* ``gevent`` and ``eventlet`` monkey-patch first thing (before anything else is imported), as both frameworks
  ask of a start script; ``time.sleep`` is then the cooperative one.
* ``trivial``: ``f(x, y): return x + y`` (``async def`` under ``asyncio``); ``io``: the same after a 10 ms wait,
  ``time.sleep(0.01)`` (``await asyncio.sleep(0.01)`` under ``asyncio``).
* N messages are published first, not timed (ours ``publish_many``, funboost ``push`` one by one: it has no
  bulk call). The clock runs from ``consume()`` until the function ran N times (counted inside it) and nothing
  is left unacknowledged: ours ``broker.in_flight(queue)``; funboost REDIS_ACK_ABLE its unack zset, SQLITE_QUEUE
  persist-queue's ``unack_count()``; MEMORY_QUEUE acks nothing. Rate = N / that time. The wait for the acks
  after the N-th call gives up after 20 s (the run then fails its check).
* Check: exactly N calls, nothing left in the queue. Ours then stops (``stop()`` and ``join``: ``stop_seconds``);
  funboost has no stop, and this script ends with ``os._exit``.

Prints one line ``PEER-RESULT {json}``.
"""

import sys

MODE = sys.argv[sys.argv.index("--mode") + 1] if "--mode" in sys.argv else "threading"
if MODE == "gevent":
    from gevent import monkey

    monkey.patch_all()
elif MODE == "eventlet":
    import eventlet

    eventlet.monkey_patch()

import argparse  # noqa: E402 - after the monkey patch
import asyncio  # noqa: E402
import gc  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

TIMEOUT_SECONDS = 120.0
ACK_WAIT_SECONDS = 20.0  # after the N-th call, for the last acks
IO_SECONDS = 0.01
FUNBOOST_KINDS = {"memory": "MEMORY_QUEUE", "sqlite": "SQLITE_QUEUE", "redis_ack_able": "REDIS_ACK_ABLE"}
OURS_KINDS = {"memory": "LOCAL_PYTHON_QUEUE", "sqlite": "PERSISTQUEUE", "redis_ack_able": "REDIS_ACK_ABLE"}


def make_function(work: str, box: dict):
    """The consuming function: counts its calls, sets ``box["done"]`` at the N-th."""
    def count() -> None:
        if next(box["counter"]) == box["target"]:
            box["done"].set()

    if MODE == "asyncio":
        if work == "io":
            async def f(x, y):
                await asyncio.sleep(IO_SECONDS)
                count()
                return x + y
        else:
            async def f(x, y):
                count()
                return x + y
    elif work == "io":
        def f(x, y):
            time.sleep(IO_SECONDS)
            count()
            return x + y
    else:
        def f(x, y):
            count()
            return x + y
    return f


def ours(args, box: dict) -> tuple:
    """funboost_like: the booster, a publish of N, a reader of the unacked count, and a stop."""
    from funboost_like import BrokerEnum, ConcurrentModeEnum, patch_frame_config, task_deco

    patch_frame_config(SQLITE_QUEUES_PATH=args.tmp, REDIS_URL=args.redis_url)
    fn = task_deco(args.queue, broker_kind=BrokerEnum[OURS_KINDS[args.broker]],
                   concurrent_mode=ConcurrentModeEnum[{"asyncio": "ASYNC"}.get(MODE, MODE.upper())],
                   concurrent_num=args.concurrency, log_level=logging.WARNING)(make_function(args.work, box))
    fn.clear()

    def publish() -> None:
        for start in range(0, args.n, 10_000):
            fn.publish_many([{"x": i, "y": i} for i in range(start, min(args.n, start + 10_000))])

    def stop() -> float:
        t = time.perf_counter()
        fn.stop()
        if not fn.consumer.join(30):
            raise RuntimeError("the consumer did not stop within 30 s")
        return time.perf_counter() - t

    in_flight = fn.broker.in_flight
    return fn, publish, lambda: in_flight(fn.queue_name), stop


def funboost(args, box: dict) -> tuple:
    """funboost 55: the booster, N pushes, a reader of the unacked count (None: none kept), no stop."""
    from funboost import BoosterParams, BrokerEnum, ConcurrentModeEnum, boost

    mode = {"asyncio": "ASYNC"}.get(MODE, MODE.upper())
    fn = boost(BoosterParams(
        queue_name=args.queue, broker_kind=getattr(BrokerEnum, FUNBOOST_KINDS[args.broker]),
        concurrent_num=args.concurrency, concurrent_mode=getattr(ConcurrentModeEnum, mode),
        log_level=logging.WARNING, create_logger_file=False,
    ))(make_function(args.work, box))
    fn.clear()

    def publish() -> None:
        for i in range(args.n):
            fn.push(i, y=i)

    def unacked():
        if args.broker == "redis_ack_able":
            consumer = fn.consumer
            return consumer.redis_db_frame.zcard(consumer._unack_zset_name)
        if args.broker == "sqlite":
            return fn.publisher.queue.unack_count()
        return 0

    return fn, publish, unacked, None


def calls_so_far(box: dict) -> int:
    """The calls counted by ``box["counter"]`` (an ``itertools.count(1)``), read without advancing it."""
    return int(repr(box["counter"])[len("count("):-1]) - 1


def measure(fn, publish, unacked, stop, n: int, box: dict) -> dict:
    publish()  # not timed
    queued = fn.get_message_count()
    done = threading.Event()
    box.update(counter=itertools.count(1), target=n, done=done)
    gc.collect()
    t0 = time.perf_counter()
    fn.consume()
    finished = done.wait(TIMEOUT_SECONDS)
    t_ran = time.perf_counter()
    pending = unacked() if finished else None
    while finished and pending and time.perf_counter() - t_ran < ACK_WAIT_SECONDS:
        time.sleep(0.0005)
        pending = unacked()
    elapsed = time.perf_counter() - t0
    calls = calls_so_far(box)
    result = {"n": n, "queued_before": queued, "elapsed": elapsed, "rate": (n if finished else calls) / elapsed,
              "ran_all_after": t_ran - t0, "pending_at_end": pending}
    result["stop_seconds"] = stop() if stop is not None and finished else None
    calls = calls_so_far(box)  # nothing may run after the N-th call (a double run would show here)
    left = fn.get_message_count()
    result.update(calls=calls, left=left, check=f"{calls} calls, {left} left in queue",
                  ok_check=bool(finished) and calls == n and left == 0 and not pending)
    if not finished:
        result["error"] = f"timed out after {TIMEOUT_SECONDS:.0f}s with {calls} of {n} calls run"
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--framework", choices=("ours", "funboost"), required=True)
    parser.add_argument("--broker", choices=tuple(FUNBOOST_KINDS), required=True)
    parser.add_argument("--mode", choices=("threading", "gevent", "eventlet", "asyncio", "single_thread"),
                        required=True)
    parser.add_argument("--work", choices=("trivial", "io"), required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--tmp", default=os.environ.get("PEERBENCH_TMP", "/tmp"))
    args = parser.parse_args()
    box: dict = {}
    try:
        fn, publish, unacked, stop = (ours if args.framework == "ours" else funboost)(args, box)
        result = measure(fn, publish, unacked, stop, args.n, box)
    except Exception as exc:  # reported in the table's problems
        result = {"error": f"{type(exc).__name__}: {exc}"}
    out = {"framework": args.framework, "broker": args.broker, "mode": MODE, "work": args.work,
           "concurrency": args.concurrency, "queue": args.queue, "results": {"consume": result}}
    sys.__stdout__.write("PEER-RESULT " + json.dumps(out) + "\n")
    sys.__stdout__.flush()
    os._exit(0)  # funboost's consumer threads never end


if __name__ == "__main__":
    main()
