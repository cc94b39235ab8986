"""Publish and consume throughput of funboost_like's brokers (DESIGN.md section 9 targets).

Usage::

    python benchmarks/throughput.py [--brokers memory,sqlite] [--n N] [--repeat R] [--json]
    python benchmarks/throughput.py --brokers redis_list,redis_ack_able,redis_brpoplpush,redis_stream

For every broker and every repetition a fresh Python subprocess (with its own temporary SQLite
folder and ``FUNBOOST_LIKE_NO_USER_CONFIG=1``) measures, in one process, with the trivial function
``def f(x, y): return x + y``, ``concurrent_num=50`` and log level WARNING:

* ``publish one-by-one``: ``f.push(i, y=i)`` N times; rate = N / elapsed. (Before either publish
  clock starts, ``f.get_message_count()`` opens the queue, so file creation is not timed.)
* ``publish bulk``: ``f.publish_many(chunk)`` over N messages in chunks of 10,000 dicts (the dicts
  are built before the clock starts); rate = N / elapsed.
* ``consume (acked)``: N messages are published in bulk first (not timed); the clock runs from
  ``f.consume()`` until the function has run N times *and* the broker holds no unacknowledged
  message of this process (every message acked); rate = N / elapsed. The consumer is then stopped,
  and the run is checked: exactly N calls, nothing left in the queue.

The Redis brokers (``redis_list`` = REDIS, ``redis_ack_able``, ``redis_brpoplpush``,
``redis_stream``) use ``FUNBOOST_LIKE_BENCH_REDIS_URL`` (default ``redis://127.0.0.1:6379/14``);
every key of each benchmark queue is deleted before and after each path.

The parent prints the median and the best rate of the repetitions against the targets. This is a
measurement, not a test: the exit code is always 0.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

BROKERS = {"memory": "LOCAL_PYTHON_QUEUE", "sqlite": "PERSISTQUEUE", "redis_list": "REDIS",
           "redis_ack_able": "REDIS_ACK_ABLE", "redis_brpoplpush": "RedisBrpopLpush", "redis_stream": "REDIS_STREAM"}
REDIS_BROKERS = {"redis_list", "redis_ack_able", "redis_brpoplpush", "redis_stream"}
BENCH_REDIS_URL = os.environ.get("FUNBOOST_LIKE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
PATHS = ("publish one-by-one", "publish bulk", "consume (acked)")

# Default N per broker and path (``--n`` overrides all of them).
DEFAULT_N = {
    "memory": {"publish one-by-one": 200_000, "publish bulk": 200_000, "consume (acked)": 200_000},
    "sqlite": {"publish one-by-one": 20_000, "publish bulk": 200_000, "consume (acked)": 50_000},
    **{b: {"publish one-by-one": 50_000, "publish bulk": 200_000, "consume (acked)": 200_000} for b in REDIS_BROKERS},
}
# DESIGN.md section 9 (single process, trivial function, 2-core machine).
TARGETS = {
    "memory": {"publish one-by-one": 200_000, "publish bulk": 200_000, "consume (acked)": 100_000},
    "sqlite": {"publish one-by-one": 5_000, "publish bulk": 50_000, "consume (acked)": 10_000},
    # Stated for REDIS_STREAM and REDIS_ACK_ABLE; the other two Redis kinds are held to the same figures.
    **{b: {"publish one-by-one": 9_000, "publish bulk": 150_000, "consume (acked)": 50_000} for b in REDIS_BROKERS},
}
BULK_CHUNK = 10_000
CONSUME_TIMEOUT_SECONDS = 120.0
CHILD_TIMEOUT_SECONDS = 600.0


# ---------------------------------------------------------------------------------------------
# child: one broker, one repetition, in a fresh process
# ---------------------------------------------------------------------------------------------

def _chunks(n: int, size: int = BULK_CHUNK) -> list[list[dict[str, int]]]:
    return [[{"x": i, "y": i} for i in range(start, min(n, start + size))] for start in range(0, n, size)]


def _measure_publish_one(fn, n: int) -> dict:
    push = fn.push
    fn.get_message_count()  # warm-up: opens this thread's connection / creates the queue (not timed)
    gc.collect()
    t0 = time.perf_counter()
    for i in range(n):
        push(i, y=i)
    elapsed = time.perf_counter() - t0
    count = fn.get_message_count()
    return {"n": n, "elapsed": elapsed, "rate": n / elapsed, "check": f"queue holds {count}", "ok_check": count == n}


def _measure_publish_bulk(fn, n: int) -> dict:
    chunks = _chunks(n)
    fn.get_message_count()  # warm-up: opens this thread's connection / creates the queue (not timed)
    gc.collect()
    t0 = time.perf_counter()
    for chunk in chunks:
        fn.publish_many(chunk)
    elapsed = time.perf_counter() - t0
    count = fn.get_message_count()
    return {"n": n, "elapsed": elapsed, "rate": n / elapsed, "chunk": BULK_CHUNK,
            "check": f"queue holds {count}", "ok_check": count == n}


def _measure_consume(fn, n: int, counter_box: dict) -> dict:
    import itertools
    import threading

    for chunk in _chunks(n):  # not timed
        fn.publish_many(chunk)
    queued = fn.get_message_count()
    done = threading.Event()
    counter_box["counter"] = itertools.count(1)
    counter_box["target"] = n
    counter_box["done"] = done
    broker = fn.broker
    in_flight = getattr(broker, "in_flight", None)
    gc.collect()

    t0 = time.perf_counter()
    fn.consume()
    pool = getattr(fn.consumer, "_pool", None)  # informative only: how many worker threads the pool grew to
    max_threads = 0
    while not (finished := done.wait(0.05)) and time.perf_counter() - t0 < CONSUME_TIMEOUT_SECONDS:
        max_threads = max(max_threads, getattr(pool, "worker_count", 0))
    t_ran = time.perf_counter()
    max_threads = max(max_threads, getattr(pool, "worker_count", 0))
    # Every call has run; now wait until the fetcher has acked the last batch.
    if finished and in_flight is not None:
        while in_flight(fn.queue_name) and time.perf_counter() - t0 < CONSUME_TIMEOUT_SECONDS:
            time.sleep(0.0005)
    elapsed = time.perf_counter() - t0

    fn.stop()
    fn.consumer.join(60)
    calls = next(counter_box["counter"]) - 1
    left = fn.get_message_count()
    result = {
        "n": n, "elapsed": elapsed, "rate": (n if finished else calls) / elapsed,
        "ran_all_after": t_ran - t0, "queued_before": queued, "pool_threads_max": max_threads,
        "check": f"{calls} calls, {left} left in queue", "ok_check": finished and calls == n and left == 0,
    }
    if not finished:
        result["error"] = f"timed out after {CONSUME_TIMEOUT_SECONDS:.0f}s with {calls} of {n} calls run"
    return result


def child_main(broker: str, ns: dict[str, int], tmpdir: str) -> None:
    import logging

    import funboost_like
    from funboost_like import BrokerEnum, patch_frame_config, task_deco
    from funboost_like.core import codec

    patch_frame_config(SQLITE_QUEUES_PATH=tmpdir)
    if broker in REDIS_BROKERS:
        patch_frame_config(REDIS_URL=BENCH_REDIS_URL)
    kind = BrokerEnum[BROKERS[broker]]
    counter_box: dict = {}

    def make(queue: str, counting: bool):
        if counting:
            def f(x, y):
                if next(counter_box["counter"]) == counter_box["target"]:
                    counter_box["done"].set()
                return x + y
        else:
            def f(x, y):
                return x + y
        return task_deco(queue, broker_kind=kind, concurrent_num=50, log_level=logging.WARNING)(f)

    results: dict[str, dict] = {}
    for path, queue, counting, measure in (
        ("publish one-by-one", "bench_publish_one", False, _measure_publish_one),
        ("publish bulk", "bench_publish_bulk", False, _measure_publish_bulk),
        ("consume (acked)", "bench_consume", True, None),
    ):
        fn = make(f"{queue}_{broker}", counting)
        _delete_redis_keys(broker, fn.queue_name)
        try:
            if measure is None:
                results[path] = _measure_consume(fn, ns[path], counter_box)
            else:
                results[path] = measure(fn, ns[path])
        except Exception as exc:  # report and carry on with the next path
            results[path] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            try:
                fn.clear()
                _delete_redis_keys(broker, fn.queue_name)
            except Exception:
                pass

    import sqlite3

    out = {
        "broker": broker,
        "results": results,
        "orjson": codec._orjson is not None,
        "funboost_like": getattr(funboost_like, "__version__", "?"),
        "sqlite": sqlite3.sqlite_version,
    }
    sys.stdout.write("BENCH-RESULT " + json.dumps(out) + "\n")
    sys.stdout.flush()


def _delete_redis_keys(broker: str, queue: str) -> None:
    """Every key of ``queue`` on the benchmark's Redis database (the queue's own and ``fl:{queue}:*``)."""
    if broker not in REDIS_BROKERS:
        return
    from funboost_like.brokers.redis_common import redis_client

    client = redis_client()
    keys = [queue, *client.scan_iter(match=f"fl:{{{queue}}}:*", count=1000)]
    client.delete(*keys)


# ---------------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------------

def run_child(broker: str, ns: dict[str, int]) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"funboost_like_bench_{broker}_") as tmpdir:
        env = dict(os.environ)
        env["FUNBOOST_LIKE_NO_USER_CONFIG"] = "1"
        env["FUNBOOST_LIKE_SQLITE_QUEUES_PATH"] = tmpdir
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", broker, "--child-dir", tmpdir,
               "--child-ns", json.dumps(ns)]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            return {"broker": broker, "error": f"subprocess timed out after {CHILD_TIMEOUT_SECONDS:.0f}s"}
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH-RESULT "):
            data = json.loads(line[len("BENCH-RESULT "):])
            if proc.stderr.strip():
                data["stderr"] = proc.stderr.strip()[-2000:]
            return data
    return {"broker": broker, "error": f"subprocess exited with {proc.returncode}: {proc.stderr.strip()[-2000:]}"}


def _fmt(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:,.0f}"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--brokers", default="memory,sqlite", help=f"comma-separated: {','.join(BROKERS)}")
    parser.add_argument("--n", type=int, default=None, help="messages per path (default: per broker and path)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions; the median and best are reported")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-dir", help=argparse.SUPPRESS)
    parser.add_argument("--child-ns", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _collect(brokers: list[str], ns_by_broker: dict[str, dict[str, int]], repeat: int) -> dict[str, list[dict]]:
    """Run every repetition of every broker, each in a fresh subprocess (brokers interleaved)."""
    runs: dict[str, list[dict]] = {b: [] for b in brokers}
    for rep in range(repeat):
        for broker in brokers:
            t = time.monotonic()
            print(f"[{rep + 1}/{repeat}] {broker} ...", end=" ", file=sys.stderr, flush=True)
            data = run_child(broker, ns_by_broker[broker])
            runs[broker].append(data)
            print(f"{time.monotonic() - t:.1f}s" + (f" ERROR {data['error']}" if "error" in data else ""),
                  file=sys.stderr, flush=True)
    return runs


def _row(broker: str, path: str, n: int, runs: list[dict], problems: list[str]) -> dict:
    rates = []
    for rep, data in enumerate(runs, 1):
        res = data.get("results", {}).get(path)
        if res is None:
            continue
        if "error" in res:
            problems.append(f"{broker} {path} run {rep}: {res['error']}")
        elif "rate" in res:
            rates.append(res["rate"])
        if res.get("ok_check") is False:
            problems.append(f"{broker} {path} run {rep}: check failed: {res.get('check')}")
    target = TARGETS[broker][path]
    median = statistics.median(rates) if rates else None
    return {
        "broker": broker, "path": path, "n": n, "runs": len(rates), "rates": rates, "median": median,
        "best": max(rates) if rates else None, "target": target, "ok": median is not None and median >= target,
    }


def _summarize(brokers: list[str], ns_by_broker: dict[str, dict[str, int]],
               runs: dict[str, list[dict]]) -> tuple[list[dict], list[str]]:
    rows: list[dict] = []
    problems: list[str] = []
    for broker in brokers:
        for path in PATHS:
            rows.append(_row(broker, path, ns_by_broker[broker][path], runs[broker], problems))
        for rep, data in enumerate(runs[broker], 1):
            if "error" in data:
                problems.append(f"{broker} run {rep}: {data['error']}")
            elif data.get("stderr"):
                problems.append(f"{broker} run {rep} wrote to stderr: {data['stderr'][:500]}")
    return rows, problems


def _environment(runs: dict[str, list[dict]], repeat: int, started: float) -> dict:
    from funboost_like.core import codec

    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    child = next((d for datas in runs.values() for d in datas if "sqlite" in d), {})
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "orjson": child.get("orjson", codec._orjson is not None),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "sqlite": child.get("sqlite", "?"),
        "loadavg_at_end": load,
        "repeat": repeat,
        "bulk_chunk": BULK_CHUNK,
        "total_seconds": round(time.monotonic() - started, 1),
        "consume_pool_threads": {
            b: [d.get("results", {}).get("consume (acked)", {}).get("pool_threads_max") for d in datas]
            for b, datas in runs.items()
        },
    }


def _print_report(info: dict, rows: list[dict], problems: list[str]) -> None:
    print(f"funboost_like throughput  date {info['date']}  Python {info['python']} ({info['implementation']})"
          f"  orjson {'yes' if info['orjson'] else 'no'}  CPUs {info['cpu_count']} (usable {info['cpus_usable']})"
          f"  SQLite {info['sqlite']}")
    print(f"platform {info['platform']}  load average at end {info['loadavg_at_end']}  repeat {info['repeat']}"
          f"  total {info['total_seconds']}s")
    print()
    header = f"{'broker':<16} {'path':<20} {'N':>9} {'rate/s (median)':>16} {'best':>10} {'target':>9}  ok"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['broker']:<16} {row['path']:<20} {row['n']:>9,} {_fmt(row['median']):>16} {_fmt(row['best']):>10}"
              f" {row['target']:>9,}  {'yes' if row['ok'] else 'NO'}")
    print()
    print(f"publish bulk = publish_many in chunks of {BULK_CHUNK:,} dicts; consume = from consume() until all N "
          f"calls ran and were acked; 'ok' compares the median with the target.")
    threads = info.get("consume_pool_threads", {})
    if threads:
        print("consume: most worker threads seen per run (trivial calls need 1; more means the pool grew and "
              "the threads contend for the GIL): " + "; ".join(f"{b} {t}" for b, t in threads.items()))
    if problems:
        print()
        print("problems:")
        for p in problems:
            print(f"  - {p}")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.child:
        child_main(args.child, json.loads(args.child_ns), args.child_dir)
        return 0

    brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    unknown = [b for b in brokers if b not in BROKERS]
    if unknown:
        print(f"unknown broker(s) {', '.join(unknown)}; known: {', '.join(BROKERS)}", file=sys.stderr)
        return 0
    repeat = max(1, args.repeat)
    ns_by_broker = {b: {p: (args.n if args.n else DEFAULT_N[b][p]) for p in PATHS} for b in brokers}

    started = time.monotonic()
    runs = _collect(brokers, ns_by_broker, repeat)
    rows, problems = _summarize(brokers, ns_by_broker, runs)
    info = _environment(runs, repeat, started)
    _print_report(info, rows, problems)
    if args.json:
        print()
        print(json.dumps({"info": info, "rows": rows, "problems": problems, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
    except Exception:  # a measurement, not a test: report and exit 0
        import traceback

        traceback.print_exc()
    sys.exit(0)
