"""Idle latency (publish to the start of the call) and idle CPU of a consumer, per broker.

Usage::

    python benchmarks/latency.py [--brokers PERSISTQUEUE,REDIS,...] [--count 200] [--interval 0.05]
                                 [--warmup 10] [--idle-seconds 10] [--json]

For every broker (names as in ``funboost_like.BrokerEnum``; default: all of LOCAL_PYTHON_QUEUE,
PERSISTQUEUE, REDIS, REDIS_ACK_ABLE, RedisBrpopLpush, REDIS_STREAM), in order:

1. A **consumer process** (``multiprocessing``, spawn) decorates
   ``def f(seq, published_at)`` with ``@task_deco(queue, broker_kind=..., log_level=WARNING)``
   (otherwise the default parameters: threading, ``concurrent_num=50``), clears the queue and
   calls ``f.consume()``. The first thing the function does is ``time.time() - published_at``; it
   sends that number to the parent through a ``multiprocessing.Queue`` (never through the broker
   under test).
2. Half a second after ``consume()`` returned, a **publisher process** decorates the same function on
   the same queue and calls ``f.push(seq, time.time())`` ``--count`` times, one call every
   ``--interval`` seconds (on a fixed schedule, so a slow push does not shift the ones after it).
   Every call therefore finds the consumer idle, waiting for the next message.
3. When every call has run (or 5 s after the last push), the parent waits 1 s, then reads the
   consumer's CPU time (``utime + stime`` of ``/proc/<pid>/stat``, every thread of the process)
   before and after ``--idle-seconds`` in which nothing is published: **idle CPU** is that CPU time
   as a percentage of one core over the window (resolution: one clock tick, 10 ms, over the window).
4. The consumer is stopped (``f.stop()``) and every key of the queue is deleted.

The first ``--warmup`` calls (connections being opened, code paths being warmed) are discarded; the
table gives, over the others, the median, p95, p99 and maximum latency and the idle CPU.

LOCAL_PYTHON_QUEUE lives in one process's memory, so it cannot be measured across processes: it is
measured in the consumer process, with the publisher as a thread there (label ``(in-process)``; the
two share the GIL). Its idle CPU is that of the process after the publisher thread has ended.

SQLACHEMY (only when named) uses ``FUNBOOST_LIKE_BENCH_POSTGRESQL_URL`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``), whose LISTEN/NOTIFY wakes an idle consumer; its
tables are dropped afterwards. PULSAR (only when named) uses ``FUNBOOST_LIKE_BENCH_PULSAR_URL`` (default
``pulsar://127.0.0.1:6650``: start a pulsar-lite there first, ``tests/pulsar_server.py``); ``clear()``
empties its topics afterwards. PERSISTQUEUE uses a temporary ``SQLITE_QUEUES_PATH`` (deleted
afterwards). The Redis kinds use
``FUNBOOST_LIKE_BENCH_REDIS_URL`` (default ``redis://127.0.0.1:6379/14``); a Redis kind is skipped,
with a message, when that Redis does not answer a PING. Every process runs with
``FUNBOOST_LIKE_NO_USER_CONFIG=1``. About 25 s per broker with the defaults. The package measured is
this checkout's, unless ``PYTHONPATH`` names another one (the header prints which).

A measurement, not a test: the exit code is always 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import queue as queue_module
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    # After the PYTHONPATH entries, so PYTHONPATH=/another/checkout measures that checkout's package.
    sys.path.insert(1 + len([p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]), str(REPO_ROOT))

BROKERS = ("LOCAL_PYTHON_QUEUE", "PERSISTQUEUE", "REDIS", "REDIS_ACK_ABLE", "RedisBrpopLpush", "REDIS_STREAM")
OTHER_BROKERS = ("SQLACHEMY", "PULSAR")  # measured when named (PostgreSQL: LISTEN/NOTIFY wakes the consumer)
BENCH_PULSAR_URL = os.environ.get("FUNBOOST_LIKE_BENCH_PULSAR_URL", "pulsar://127.0.0.1:6650")
BENCH_POSTGRESQL_URL = os.environ.get("FUNBOOST_LIKE_BENCH_POSTGRESQL_URL",
                                      "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_BROKERS = {"REDIS", "REDIS_ACK_ABLE", "RedisBrpopLpush", "REDIS_STREAM"}
IN_PROCESS = {"LOCAL_PYTHON_QUEUE"}  # no cross-process delivery: publisher thread in the consumer process
BENCH_REDIS_URL = os.environ.get("FUNBOOST_LIKE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")

START_TIMEOUT_SECONDS = 60.0  # consumer start (spawn + import + consume())
SETTLE_BEFORE_PUBLISH_SECONDS = 0.5  # the consumer's fetcher is waiting before the first push
DRAIN_SECONDS = 5.0  # how long after the last push the parent waits for the remaining calls
SETTLE_BEFORE_IDLE_SECONDS = 1.0  # after the last call, before the idle CPU window opens
STOP_TIMEOUT_SECONDS = 20.0


# ---------------------------------------------------------------------------------------------
# the roles, each in its own spawned process
# ---------------------------------------------------------------------------------------------

def _setup(cfg: dict[str, Any]):
    """Settings for this process, and the decorated function on the benchmark's queue."""
    import logging

    from funboost_like import BrokerEnum, patch_frame_config, task_deco

    patch_frame_config(SQLITE_QUEUES_PATH=cfg["sqlite_dir"])
    if cfg["broker"] in REDIS_BROKERS:
        patch_frame_config(REDIS_URL=BENCH_REDIS_URL)
    if cfg["broker"] == "SQLACHEMY":
        patch_frame_config(SQLALCHEMY_URL=BENCH_POSTGRESQL_URL)
    if cfg["broker"] == "PULSAR":
        patch_frame_config(PULSAR_URL=BENCH_PULSAR_URL)
    results = cfg["results"]

    def f(seq, published_at):
        latency = time.time() - published_at
        results.put(("lat", seq, latency))

    fn = task_deco(cfg["queue"], broker_kind=BrokerEnum[cfg["broker"]], log_level=logging.WARNING)(f)
    return fn


def _publish(fn, cfg: dict[str, Any]) -> None:
    """``--count`` pushes, one every ``--interval`` seconds on a fixed schedule; then ``("published", n)``."""
    interval, count = cfg["interval"], cfg["count"]
    t0 = time.perf_counter()
    for seq in range(count):
        delay = t0 + seq * interval - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        fn.push(seq, time.time())
    cfg["results"].put(("published", count, time.perf_counter() - t0))


def consumer_role(cfg: dict[str, Any], stop) -> None:
    results = cfg["results"]
    fn = None
    try:
        fn = _setup(cfg)
        fn.clear()
        fn.consume()
        if cfg["broker"] in IN_PROCESS:
            time.sleep(SETTLE_BEFORE_PUBLISH_SECONDS)
            publisher = threading.Thread(target=_publish, args=(fn, cfg), name="bench-publisher", daemon=True)
            results.put(("ready", os.getpid()))
            publisher.start()
        else:
            results.put(("ready", os.getpid()))
        stop.wait()
        fn.stop()
        fn.consumer.join(STOP_TIMEOUT_SECONDS / 2)
        fn.clear()
    except BaseException:
        results.put(("error", "consumer", traceback.format_exc()))


def publisher_role(cfg: dict[str, Any]) -> None:
    try:
        fn = _setup(cfg)
        fn.get_message_count()  # opens this process's connection / the queue file before the first push
        _publish(fn, cfg)
    except BaseException:
        cfg["results"].put(("error", "publisher", traceback.format_exc()))


# ---------------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` (``/proc/<pid>/stat``), in seconds."""
    with open(f"/proc/{pid}/stat") as fh:
        text = fh.read()
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": field 3 (state) is fields[0]
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_problem() -> str | None:
    """Why the Redis kinds cannot run here, or None."""
    try:
        import redis
    except ImportError:
        return "the redis package is not installed"
    try:
        redis.Redis.from_url(BENCH_REDIS_URL, socket_connect_timeout=1, socket_timeout=2).ping()
    except Exception as exc:
        return f"Redis at {BENCH_REDIS_URL} is unreachable ({type(exc).__name__}: {exc})"
    return None


def delete_redis_keys(queue: str) -> None:
    """Every key naming the benchmark queue (the queue's own and the framework's ``fl:{queue}:*``)."""
    import redis

    client = redis.Redis.from_url(BENCH_REDIS_URL, socket_connect_timeout=1, socket_timeout=5)
    keys = list(client.scan_iter(match=f"*{queue}*", count=1000))
    if keys:
        client.delete(*keys)


def _percentile(sorted_values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * p / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def measure(broker: str, args: argparse.Namespace, ctx) -> dict[str, Any]:
    label = f"{broker} (in-process)" if broker in IN_PROCESS else broker
    row: dict[str, Any] = {"broker": broker, "label": label, "problems": []}
    problems = row["problems"]
    tmpdir = tempfile.mkdtemp(prefix="funboost_like_bench_latency_")
    results = ctx.Queue()
    stop = ctx.Event()
    cfg = {"broker": broker, "queue": f"bench_latency_{broker.lower()}_{os.getpid()}", "sqlite_dir": tmpdir,
           "interval": args.interval, "count": args.count, "results": results}
    consumer = ctx.Process(target=consumer_role, args=(cfg, stop), name=f"latency-consumer-{broker}")
    publisher = None
    latencies: dict[int, float] = {}  # seq -> seconds from publish to the start of the call
    try:
        if broker in REDIS_BROKERS:
            delete_redis_keys(cfg["queue"])
        consumer.start()
        msg, started_by = None, time.monotonic() + START_TIMEOUT_SECONDS
        while msg is None and consumer.is_alive() and time.monotonic() < started_by:
            msg = _next(results, 0.5)
        msg = msg or _next(results, 0.5)  # it may have reported just before exiting
        if msg is None or msg[0] != "ready":
            problems.append(_describe(msg, f"the consumer did not start within {START_TIMEOUT_SECONDS:.0f}s"))
            return row
        pid = msg[1]
        if broker not in IN_PROCESS:
            time.sleep(SETTLE_BEFORE_PUBLISH_SECONDS)
            publisher = ctx.Process(target=publisher_role, args=(cfg,), name=f"latency-publisher-{broker}")
            publisher.start()
        _collect(results, args, latencies, row)
        if publisher is not None:
            publisher.join(10)
        time.sleep(SETTLE_BEFORE_IDLE_SECONDS)
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(args.idle_seconds)
        cpu1, t1 = cpu_seconds(pid), time.monotonic()
        row["idle_cpu_percent"] = 100 * (cpu1 - cpu0) / (t1 - t0)
        while (msg := _next(results, 0)) is not None:  # a late call, or an error, during the idle window
            if msg[0] == "lat":
                latencies[msg[1]] = msg[2]
                problems.append(f"call {msg[1]} ran late, during the idle window")
            elif msg[0] == "published":  # sent after the last push, so it may follow the last call
                row["publish_seconds"] = round(msg[2], 3)
            else:
                problems.append(_describe(msg, ""))
    except Exception:
        problems.append(traceback.format_exc())
    finally:
        _finish(cfg, stop, consumer, publisher, problems)
        shutil.rmtree(tmpdir, ignore_errors=True)

    kept = sorted(lat * 1000 for seq, lat in latencies.items() if seq >= args.warmup)
    row["n"] = len(kept)
    if kept:
        row.update(median_ms=statistics.median(kept), p95_ms=_percentile(kept, 95), p99_ms=_percentile(kept, 99),
                   max_ms=kept[-1], min_ms=kept[0])
    row["latencies_ms"] = [round(latencies[s] * 1000, 3) for s in sorted(latencies) if s >= args.warmup]
    return row


def _collect(results, args: argparse.Namespace, latencies: dict[int, float], row: dict[str, Any]) -> None:
    """Take the calls' latencies until all ``count`` ran, or ``DRAIN_SECONDS`` after the last push."""
    published_by: float | None = None
    deadline = time.monotonic() + START_TIMEOUT_SECONDS + args.count * args.interval + DRAIN_SECONDS
    while len(latencies) < args.count:
        if published_by is not None:
            deadline = min(deadline, published_by + DRAIN_SECONDS)
        msg = _next(results, deadline - time.monotonic())
        if msg is None:
            break
        if msg[0] == "lat":
            latencies[msg[1]] = msg[2]
        elif msg[0] == "published":
            published_by = time.monotonic()
            row["publish_seconds"] = round(msg[2], 3)
        else:
            row["problems"].append(_describe(msg, ""))
            break
    if len(latencies) < args.count:
        row["problems"].append(f"{len(latencies)} of {args.count} calls ran"
                               + ("" if published_by is not None else " (the publisher did not finish)"))


def _finish(cfg: dict[str, Any], stop, consumer, publisher, problems: list[str]) -> None:
    """Stop the consumer (it clears the queue), kill what does not exit, delete the queue's Redis keys."""
    stop.set()
    consumer.join(STOP_TIMEOUT_SECONDS)
    for proc in (consumer, publisher):
        if proc is not None and proc.is_alive():
            problems.append(f"{proc.name} did not exit; killed")
            proc.kill()
            proc.join(5)
    while (msg := _next(cfg["results"], 0)) is not None:
        if msg[0] == "error":
            problems.append(_describe(msg, ""))
    if cfg["broker"] in REDIS_BROKERS:
        try:
            delete_redis_keys(cfg["queue"])
        except Exception as exc:
            problems.append(f"cleaning Redis: {exc}")
    if cfg["broker"] == "SQLACHEMY":
        try:
            _setup({**cfg, "results": None}).broker.drop_tables(cfg["queue"])
        except Exception as exc:
            problems.append(f"dropping the queue's tables: {exc}")


def _next(results, timeout: float):
    try:
        return results.get(timeout=max(0.0, timeout)) if timeout > 0 else results.get_nowait()
    except queue_module.Empty:
        return None


def _describe(msg, default: str) -> str:
    if msg is None:
        return default
    if msg[0] == "error":
        return f"{msg[1]} failed:\n{msg[2].rstrip()}"
    return f"unexpected message {msg!r}"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _info(args: argparse.Namespace, started: float) -> dict[str, Any]:
    import funboost_like

    try:
        usable: int | None = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "package": str(Path(funboost_like.__file__).resolve().parent),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "loadavg_at_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "count": args.count, "interval": args.interval, "warmup": args.warmup, "idle_seconds": args.idle_seconds,
        "redis_url": BENCH_REDIS_URL,
        "total_seconds": round(time.monotonic() - started, 1),
    }


def print_report(info: dict[str, Any], rows: list[dict[str, Any]], skipped: list[str]) -> None:
    print(f"latency  {info['date']}  Python {info['python']}  CPUs {info['cpu_count']} (usable "
          f"{info['cpus_usable']})  load average at end {info['loadavg_at_end']}  total {info['total_seconds']}s")
    print(f"package {info['package']}  {info['count']} calls, one every {info['interval'] * 1000:g} ms, first "
          f"{info['warmup']} discarded  idle window {info['idle_seconds']:g}s  Redis {info['redis_url']}")
    print()
    header = (f"{'broker':<32}{'n':>5}{'median ms':>11}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}"
              f"{'idle CPU %':>12}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['label']:<32}{row.get('n', 0):>5}{_fmt(row.get('median_ms')):>11}{_fmt(row.get('p95_ms')):>9}"
              f"{_fmt(row.get('p99_ms')):>9}{_fmt(row.get('max_ms')):>9}{_fmt(row.get('idle_cpu_percent')):>12}")
    print()
    print("latency = time.time() at the start of the call - time.time() just before push(), in another process "
          "(in-process: a thread); idle CPU = consumer process utime+stime over the idle window, % of one core.")
    notes = [*skipped, *(f"{row['label']}: {p}" for row in rows for p in row["problems"])]
    if notes:
        print()
        print("problems:")
        for note in notes:
            print(f"  - {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--brokers", default=",".join(BROKERS), help=f"comma-separated: {','.join(BROKERS)}")
    parser.add_argument("--count", type=int, default=200, help="calls published per broker")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between two publishes")
    parser.add_argument("--warmup", type=int, default=10, help="first calls discarded")
    parser.add_argument("--idle-seconds", type=float, default=10.0, help="idle CPU window")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args(argv)
    by_lower = {b.lower(): b for b in BROKERS}
    brokers = [by_lower.get(b.strip().lower(), b.strip()) for b in args.brokers.split(",") if b.strip()]
    unknown = [b for b in brokers if b not in BROKERS + OTHER_BROKERS]
    if unknown:
        print(f"unknown broker(s) {', '.join(unknown)}; known: {', '.join(BROKERS + OTHER_BROKERS)}", file=sys.stderr)
        return 0
    args.warmup = max(0, min(args.warmup, args.count - 1))

    os.environ["FUNBOOST_LIKE_NO_USER_CONFIG"] = "1"  # inherited by the spawned processes
    os.environ["FUNBOOST_LIKE_REDIS_URL"] = BENCH_REDIS_URL
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    started = time.monotonic()
    skipped: list[str] = []
    redis_why = redis_problem() if REDIS_BROKERS.intersection(brokers) else None
    rows = []
    for broker in brokers:
        if broker in REDIS_BROKERS and redis_why:
            skipped.append(f"{broker} skipped: {redis_why}")
            print(f"{broker} skipped: {redis_why}", file=sys.stderr, flush=True)
            continue
        t = time.monotonic()
        print(f"{broker} ...", end=" ", file=sys.stderr, flush=True)
        row = measure(broker, args, ctx)
        rows.append(row)
        print(f"{time.monotonic() - t:.1f}s" + (" (problems)" if row["problems"] else ""), file=sys.stderr,
              flush=True)
    info = _info(args, started)
    print_report(info, rows, skipped)
    if args.json:
        print()
        print(json.dumps({"info": info, "rows": rows, "skipped": skipped}, indent=2))
    return 0


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
    except Exception:  # a measurement, not a test: report and exit 0
        traceback.print_exc()
    sys.exit(0)
