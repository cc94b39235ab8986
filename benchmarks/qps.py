"""Exact QPS: the start rate a consumer achieves for a target ``qps`` when call durations vary.

Usage::

    python benchmarks/qps.py [--brokers memory,sqlite] [--qps 1,10,100,1000] [--seconds 20] [--warmup 1] [--json]

For every broker and target rate a fresh Python subprocess (own temporary SQLite folder,
``FUNBOOST_LIKE_NO_USER_CONFIG=1``) publishes enough messages for the whole run (in bulk, not
timed), then consumes them with ``qps=<target>`` and ``concurrent_num=200`` (a ceiling: the pool
grows only to what the rate needs). The function records ``time.monotonic()`` when it starts, then
sleeps a duration drawn at random in [0, 50 ms] (``random.uniform(0, 0.05)``).

Measured: the first ``--warmup`` seconds after the first start are a warm-up and not counted; then
the starts during ``--seconds`` seconds are taken. The achieved rate is ``(starts - 1) / (last start
- first start)`` over those starts (the mean start interval, so a window that happens to hold one
start more or less at qps=1 does not count as a 5% error); the raw number of starts is shown too.
"error" is the achieved rate against the target; "ok" means within 2%. The pool size is sampled
every 100 ms during the measured window (median and maximum worker threads).

A measurement, not a test: the exit code is always 0.
"""

from __future__ import annotations

import argparse
import datetime
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

BROKERS = {"memory": "LOCAL_PYTHON_QUEUE", "sqlite": "PERSISTQUEUE"}
CONCURRENT_NUM = 200
MAX_CALL_SECONDS = 0.05
TOLERANCE = 0.02


# ---------------------------------------------------------------------------------------------
# child: one broker, one target rate, in a fresh process
# ---------------------------------------------------------------------------------------------

def child_main(broker: str, qps: float, seconds: float, warmup: float, tmpdir: str) -> None:
    import logging
    import random

    from funboost_like import BrokerEnum, patch_frame_config, task_deco

    patch_frame_config(SQLITE_QUEUES_PATH=tmpdir)
    starts: list[float] = []
    record = starts.append
    uniform = random.uniform
    monotonic = time.monotonic

    @task_deco(f"bench_qps_{broker}", broker_kind=BrokerEnum[BROKERS[broker]], qps=qps,
               concurrent_num=CONCURRENT_NUM, log_level=logging.WARNING)
    def f(i: int) -> None:
        record(monotonic())
        time.sleep(uniform(0, MAX_CALL_SECONDS))

    total = int(qps * (warmup + seconds + 3)) + 10  # more than the run can take: the queue never runs dry
    f.clear()
    for start in range(0, total, 10_000):
        f.publish_many([{"i": i} for i in range(start, min(total, start + 10_000))])

    f.consume()
    consumer = f.consumer
    deadline = monotonic() + 30
    while not starts and monotonic() < deadline:
        time.sleep(0.001)
    if not starts:
        sys.stdout.write("BENCH-RESULT " + json.dumps({"error": "no call started within 30 s"}) + "\n")
        return
    window_start = starts[0] + warmup
    window_end = window_start + seconds
    pool_sizes: list[int] = []
    while monotonic() < window_end + MAX_CALL_SECONDS:
        time.sleep(0.1)
        if window_start <= monotonic() <= window_end:
            pool_sizes.append(consumer.worker_count)
    f.stop()
    consumer.join(30)

    inside = [t for t in starts if window_start <= t < window_end]
    n = len(inside)
    rate = (n - 1) / (inside[-1] - inside[0]) if n >= 2 and inside[-1] > inside[0] else 0.0
    out = {
        "broker": broker, "qps": qps, "seconds": seconds, "warmup": warmup, "starts": n, "rate": rate,
        "error": (rate - qps) / qps, "rate_by_count": n / seconds,
        "pool_median": statistics.median(pool_sizes) if pool_sizes else 0,
        "pool_max": max(pool_sizes) if pool_sizes else 0,
    }
    sys.stdout.write("BENCH-RESULT " + json.dumps(out) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------------

def run_child(broker: str, qps: float, seconds: float, warmup: float) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"funboost_like_bench_qps_{broker}_") as tmpdir:
        env = dict(os.environ)
        env["FUNBOOST_LIKE_NO_USER_CONFIG"] = "1"
        env["FUNBOOST_LIKE_SQLITE_QUEUES_PATH"] = tmpdir
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", broker, "--child-dir", tmpdir,
               "--qps", str(qps), "--seconds", str(seconds), "--warmup", str(warmup)]
        timeout = seconds + warmup + 120
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"broker": broker, "qps": qps, "failure": f"subprocess timed out after {timeout:.0f}s"}
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH-RESULT "):
            data = dict(json.loads(line[len("BENCH-RESULT "):]))
            if "error" in data and isinstance(data["error"], str):
                return {"broker": broker, "qps": qps, "failure": data["error"]}
            return data
    return {"broker": broker, "qps": qps, "failure": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--brokers", default="memory,sqlite", help="comma-separated: memory,sqlite")
    parser.add_argument("--qps", default="1,10,100,1000", help="comma-separated target rates")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured window per rate (default 20)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds after the first start not counted")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-dir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.child:
        child_main(args.child, float(args.qps), args.seconds, args.warmup, args.child_dir)
        return 0
    brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    unknown = [b for b in brokers if b not in BROKERS]
    if unknown:
        print(f"unknown broker(s) {', '.join(unknown)}; known: {', '.join(BROKERS)}", file=sys.stderr)
        return 0
    rates = [float(q) for q in args.qps.split(",") if q.strip()]
    load_before = _load()
    rows = []
    for broker in brokers:
        for qps in rates:
            print(f"{broker} qps={qps:g} ...", end=" ", file=sys.stderr, flush=True)
            t = time.monotonic()
            rows.append(run_child(broker, qps, args.seconds, args.warmup))
            print(f"{time.monotonic() - t:.1f}s", file=sys.stderr, flush=True)

    print(f"funboost_like exact QPS  date {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}"
          f"  Python {platform.python_version()}  CPUs {os.cpu_count()}  load average before {load_before},"
          f" after {_load()}")
    print(f"call durations random in [0, {MAX_CALL_SECONDS * 1000:.0f} ms]; concurrent_num={CONCURRENT_NUM} "
          f"(a ceiling); {args.warmup:g} s warm-up after the first start, then {args.seconds:g} s measured")
    print()
    header = (f"{'broker':<7} {'target qps':>10} {'starts':>7} {'achieved/s':>11} {'error':>8} "
              f"{'pool threads (median/max)':>26}  within 2%")
    print(header)
    print("-" * len(header))
    for row in rows:
        if "failure" in row:
            print(f"{row['broker']:<7} {row['qps']:>10g}  FAILED: {row['failure']}")
            continue
        pool = f"{row['pool_median']:g} / {row['pool_max']}"
        print(f"{row['broker']:<7} {row['qps']:>10g} {row['starts']:>7} {row['rate']:>11.3f} "
              f"{row['error'] * 100:>+7.2f}% {pool:>26}  {'yes' if abs(row['error']) <= TOLERANCE else 'NO'}")
    print()
    print("achieved = (starts - 1) / (last start - first start) over the starts in the measured window")
    if args.json:
        print(json.dumps(rows, indent=2))
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
