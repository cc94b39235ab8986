"""funboost workload of the peer benchmark. Runs ONLY inside the scratch virtualenv (see README.md).

Started by ``benchmarks/peers/run.py`` with ``PYTHONPATH=benchmarks/peers/funboost_home`` (funboost and
nb_log settings: Redis db, temporary folders, quiet start-up) and a temporary working directory.
One broker kind per process::

    python funboost_bench.py --broker REDIS --n 50000 [--paths publish,consume] [--exclusive '{"k": 1}']

The workload is the one of ``benchmarks/throughput.py``: ``def f(x, y): return x + y`` decorated with
``@boost(BoosterParams(queue_name=..., broker_kind=..., concurrent_num=50,
concurrent_mode=THREADING, log_level=WARNING, create_logger_file=False))``.

* ``publish``: ``f.push(i, y=i)`` N times. The clock stops when ``f.get_message_count()`` reports
  all N messages in the broker (funboost's ``REDIS`` publisher buffers pushes and sends them 1,000 per
  RPUSH, plus a flush every 0.1 s; the wait makes the figure count messages that really arrived).
  ``f.get_message_count()`` is called once before the clock starts (connection, queue creation).
* ``consume``: the N messages published above are consumed. The clock runs from ``f.consume()`` until
  the function has run N times (counted inside it with ``itertools.count``) and, for the kinds whose
  pending state can be read (``REDIS_ACK_ABLE``: the consumer's unack zset; ``RedisBrpopLpush``: its
  unack list; ``REDIS_STREAM``: ``XPENDING`` of the group), nothing is left unacknowledged.

funboost has no bulk-publish call, so there is no bulk figure. Prints one line
``PEER-RESULT {json}`` and ends with ``os._exit`` (funboost's consumer threads do not stop).
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


def _pending_probe(fn, kind: str):
    """A callable returning how many fetched messages are not acked yet, or None if not readable."""
    from funboost import BrokerEnum

    consumer = fn.consumer
    if kind == BrokerEnum.REDIS_ACK_ABLE:
        return lambda: consumer.redis_db_frame.zcard(consumer._unack_zset_name)
    if kind == BrokerEnum.REDIS_BRPOP_LPUSH:
        return lambda: consumer.redis_db_frame.llen(consumer._unack_list_name)
    if kind == BrokerEnum.REDIS_STREAM:
        group = consumer.consumer_params.broker_exclusive_config["group"]
        return lambda: consumer.redis_db_frame.xpending(consumer.queue_name, group)["pending"]
    return None


def _measure_publish(fn, n: int) -> dict:
    push = fn.push
    fn.get_message_count()  # warm-up, not timed
    gc.collect()
    t0 = time.perf_counter()
    for i in range(n):
        push(i, y=i)
    t_loop = time.perf_counter() - t0
    count = fn.get_message_count()
    while count < n and time.perf_counter() - t0 < TIMEOUT_SECONDS:  # buffered publishers
        time.sleep(0.0005)
        count = fn.get_message_count()
    elapsed = time.perf_counter() - t0
    return {"n": n, "elapsed": elapsed, "rate": n / elapsed, "push_loop_seconds": t_loop,
            "check": f"queue holds {count}", "ok_check": count == n}


def _measure_consume(fn, kind: str, n: int, box: dict) -> dict:
    queued = fn.get_message_count()
    done = threading.Event()
    box.update(counter=itertools.count(1), target=n, done=done, first=None)
    gc.collect()
    t0 = time.perf_counter()
    fn.consume()
    finished = done.wait(TIMEOUT_SECONDS)
    t_ran = time.perf_counter()
    probe = _pending_probe(fn, kind)
    pending = None
    if finished and probe is not None:
        while (pending := probe()) and time.perf_counter() - t0 < TIMEOUT_SECONDS:
            time.sleep(0.0005)
    elapsed = time.perf_counter() - t0
    calls = next(box["counter"]) - 1
    left = fn.get_message_count()
    first = box["first"]
    result = {
        "n": n, "elapsed": elapsed, "rate": (n if finished else calls) / elapsed,
        "ran_all_after": t_ran - t0, "rate_calls_only": (n if finished else calls) / (t_ran - t0),
        "first_call_after": None if first is None else first - t0, "queued_before": queued,
        "acks_waited": probe is not None, "pending_at_end": pending,
        "check": f"{calls} calls, {left} left in queue", "ok_check": finished and calls == n and left == 0,
    }
    if not finished:
        result["error"] = f"timed out after {TIMEOUT_SECONDS:.0f}s with {calls} of {n} calls run"
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--broker", required=True, help="BrokerEnum attribute name, e.g. REDIS_ACK_ABLE")
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--paths", default="publish,consume")
    parser.add_argument("--queue", default=None)
    parser.add_argument("--exclusive", default="{}", help="broker_exclusive_config as JSON")
    args = parser.parse_args()

    import funboost
    from funboost import BoosterParams, BrokerEnum, ConcurrentModeEnum, boost

    kind = getattr(BrokerEnum, args.broker)
    queue = args.queue or f"peerbench_funboost_{args.broker.lower()}"
    box: dict = {}

    def f(x, y):
        if box["first"] is None:
            box["first"] = time.perf_counter()
        if next(box["counter"]) == box["target"]:
            box["done"].set()
        return x + y

    fn = boost(BoosterParams(
        queue_name=queue, broker_kind=kind, concurrent_num=50, concurrent_mode=ConcurrentModeEnum.THREADING,
        log_level=logging.WARNING, create_logger_file=False, broker_exclusive_config=json.loads(args.exclusive),
    ))(f)
    fn.clear()

    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    results: dict[str, dict] = {}
    if "publish" in paths:
        try:
            results["publish"] = _measure_publish(fn, args.n)
        except Exception as exc:
            results["publish"] = {"error": f"{type(exc).__name__}: {exc}"}
    if "consume" in paths and "error" not in results.get("publish", {}):
        try:
            results["consume"] = _measure_consume(fn, kind, args.n, box)
        except Exception as exc:
            results["consume"] = {"error": f"{type(exc).__name__}: {exc}"}
    if "consume" not in paths:
        fn.clear()

    out = {"framework": "funboost", "version": funboost.__version__, "broker": args.broker, "kind": kind,
           "queue": queue, "exclusive": json.loads(args.exclusive), "results": results}
    sys.__stdout__.write("PEER-RESULT " + json.dumps(out) + "\n")
    sys.__stdout__.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
