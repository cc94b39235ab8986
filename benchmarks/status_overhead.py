"""What status persistence (``function_result_status_persistance_conf``) costs on the memory broker.

Usage::

    python benchmarks/status_overhead.py [--n N] [--repeat R] [--json]

Three modes, each repetition in a fresh subprocess with its own temporary folders and
``FUNBOOST_LIKE_NO_USER_CONFIG=1``; the repetitions alternate between modes:

* ``off``: no call records (the default);
* ``status``: ``FunctionResultStatusPersistanceConfig(is_save_status=True)``;
* ``status+result``: ``is_save_status=True, is_save_result=True``.

The function is ``def f(x, y): return x + y`` with ``concurrent_num=50`` and log level WARNING on
the memory broker (``LOCAL_PYTHON_QUEUE``). Two paths are timed:

* ``publish one-by-one``: ``f.push(i, y=i)`` N times (the publish hook records ``not_started``).
* ``consume (acked)``: N messages are published in bulk and their ``not_started`` records written
  first (not timed); the clock runs from ``f.consume()`` until the function ran N times and the
  broker holds no unacknowledged message. The background writer keeps writing records meanwhile,
  so its cost is in the rate. ``records on disk after`` is how much longer it then took until
  every record of the run was committed (``store.flush()``); the run is checked to have N
  ``finished`` records.

The report gives the median and best rate per mode and the median's change against ``off``. The
target (DESIGN/issue 3): consuming with status on stays above 30,000 calls/s. This is a
measurement, not a test: the exit code is always 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

MODES = ("off", "status", "status+result")
PATHS = ("publish one-by-one", "consume (acked)")
TARGET_CONSUME_WITH_STATUS = 30_000
CHILD_TIMEOUT_SECONDS = 300.0


def child_main(mode: str, n: int, tmpdir: str) -> None:
    import gc
    import itertools
    import logging
    import threading

    from funboost_like import BrokerEnum, FunctionResultStatusPersistanceConfig, patch_frame_config, task_deco
    from funboost_like.core.status_store import FINISHED, open_status_store

    patch_frame_config(SQLITE_QUEUES_PATH=os.path.join(tmpdir, "queues"), STATUS_DB_PATH=os.path.join(tmpdir, "status"))
    conf = FunctionResultStatusPersistanceConfig(is_save_status=mode != "off", is_save_result=mode == "status+result")
    counter = itertools.count(1)
    done = threading.Event()

    def f(x: int, y: int) -> int:
        if next(counter) == n:
            done.set()
        return x + y

    results: dict[str, dict[str, float | str]] = {}

    publisher = task_deco("bench_status_publish", broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, log_level=logging.WARNING,
                          function_result_status_persistance_conf=conf)(lambda x, y: x + y)
    push = publisher.push
    gc.collect()
    t0 = time.perf_counter()
    for i in range(n):
        push(i, y=i)
    elapsed = time.perf_counter() - t0
    results["publish one-by-one"] = {"rate": n / elapsed}
    open_status_store(publisher.queue_name).flush(120)
    publisher.clear()

    fn = task_deco("bench_status_consume", broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, concurrent_num=50,
                   log_level=logging.WARNING, function_result_status_persistance_conf=conf)(f)
    for start in range(0, n, 10_000):
        fn.publish_many([{"x": i, "y": i} for i in range(start, min(n, start + 10_000))])
    store = open_status_store(fn.queue_name)
    store.flush(120)  # the not_started records are on disk before the clock starts
    broker = fn.broker
    gc.collect()
    t0 = time.perf_counter()
    fn.consume()
    finished = done.wait(120)
    while finished and broker.in_flight(fn.queue_name):  # type: ignore[attr-defined]
        time.sleep(0.0005)
    elapsed = time.perf_counter() - t0
    t1 = time.perf_counter()
    flushed = store.flush(120)
    on_disk_after = time.perf_counter() - t1
    fn.stop()
    fn.consumer.join(60)
    records = store.counts_by_status()[FINISHED]
    expected = 0 if mode == "off" else n
    check = "ok" if finished and flushed and records == expected else f"{records} finished records, expected {expected}"
    results["consume (acked)"] = {"rate": n / elapsed, "on_disk_after": on_disk_after, "check": check}
    print(json.dumps(results))


def run_child(mode: str, n: int) -> dict[str, dict[str, float | str]]:
    with tempfile.TemporaryDirectory(prefix="funboost_like_status_bench_") as tmpdir:
        env = dict(os.environ)
        env["FUNBOOST_LIKE_NO_USER_CONFIG"] = "1"
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.run([sys.executable, __file__, "--child", mode, "--n", str(n), "--tmpdir", tmpdir],
                              env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_SECONDS)
    if proc.returncode != 0:
        return {"error": {"check": proc.stderr.strip()[-2000:]}}
    parsed: dict[str, dict[str, float | str]] = json.loads(proc.stdout.strip().splitlines()[-1])
    return parsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", choices=MODES)
    parser.add_argument("--tmpdir")
    args = parser.parse_args()
    if args.child:
        child_main(args.child, args.n, args.tmpdir)
        return

    runs: dict[str, list[dict[str, dict[str, float | str]]]] = {mode: [] for mode in MODES}
    started = time.perf_counter()
    for rep in range(args.repeat):
        for mode in MODES:
            sys.stderr.write(f"[{rep + 1}/{args.repeat}] {mode} ...\n")
            runs[mode].append(run_child(mode, args.n))

    import platform
    import sqlite3

    print(f"funboost_like status overhead  Python {platform.python_version()}  SQLite {sqlite3.sqlite_version}  "
          f"CPUs {os.cpu_count()}  load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}  "
          f"N {args.n:,}  repeat {args.repeat}  total {time.perf_counter() - started:.0f}s")
    print()
    print(f"{'path':<20} {'mode':<14} {'rate/s (median)':>15} {'best':>10} {'vs off':>8}  notes")
    print("-" * 90)
    problems: list[str] = []
    medians: dict[tuple[str, str], float] = {}
    for path in PATHS:
        for mode in MODES:
            rates = [float(r[path]["rate"]) for r in runs[mode] if path in r]
            problems += [f"{mode}: {r['error']['check']}" for r in runs[mode] if "error" in r]
            problems += [f"{mode} {path}: {r[path]['check']}" for r in runs[mode]
                         if path in r and r[path].get("check", "ok") != "ok"]
            if not rates:
                continue
            median = medians[path, mode] = statistics.median(rates)
            base = medians.get((path, "off"))
            change = f"{(median / base - 1) * 100:+.0f}%" if base and mode != "off" else ""
            notes = ""
            if path == "consume (acked)":
                lags = [float(r[path]["on_disk_after"]) for r in runs[mode] if path in r]
                notes = f"records on disk {statistics.median(lags) * 1000:.0f} ms after the last ack"
                if mode != "off":
                    notes += f"; target > {TARGET_CONSUME_WITH_STATUS:,}/s: {'ok' if median > 30_000 else 'MISSED'}"
            print(f"{path:<20} {mode:<14} {median:>15,.0f} {max(rates):>10,.0f} {change:>8}  {notes}")
    if problems:
        print("\nproblems:")
        for problem in problems:
            print(f"  {problem}")
    if args.json:
        print(json.dumps({"n": args.n, "runs": runs}))


if __name__ == "__main__":
    main()
