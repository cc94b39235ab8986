"""Does a consumer's memory grow with the backlog? (DESIGN.md section 9: 1M queued within 10% of 100k.)

Usage::

    python benchmarks/memory_backlog.py [--sizes 100000,1000000] [--seconds 3] [--json]
    python benchmarks/memory_backlog.py --broker RABBITMQ_PIKA     # any kind; a server's queue is emptied first

For each backlog size, in its own temporary SQLite folder (``FUNBOOST_LIKE_NO_USER_CONFIG=1``):

1. a fresh subprocess publishes N messages to the SQLite broker with ``publish_many`` in chunks of
   10,000 (and counts them);
2. another fresh subprocess, the consumer, decorates ``def f(x, y): time.sleep(0.01)`` with
   ``concurrent_num=50``, notes its RSS, calls ``f.consume()``, and after ``--seconds`` (3) of
   consuming reads ``VmRSS`` (and the peak, ``VmHWM``) from ``/proc/self/status``; then it stops.

The publisher runs in a separate process so the consumer's RSS reflects consuming only. The
consumer prefetches at most ``concurrent_num`` messages, so its RSS should not depend on N. The
ratio RSS(largest) / RSS(smallest) is printed; the target is <= 1.10. Exit code is always 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

QUEUE = "bench_memory_backlog"
CHUNK = 10_000
TARGET_RATIO = 1.10


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _make_function():
    import logging

    from funboost_like import BrokerEnum, task_deco

    calls = {"n": 0}

    kind = BrokerEnum[os.environ.get("FUNBOOST_LIKE_BENCH_BROKER", "PERSISTQUEUE")]

    @task_deco(QUEUE, broker_kind=kind, concurrent_num=50, log_level=logging.WARNING)
    def f(x, y):
        time.sleep(0.01)
        calls["n"] += 1  # approximate under threads; only informative
        return x + y

    return f, calls


def child_publish(n: int, tmpdir: str) -> dict:
    from funboost_like import patch_frame_config

    patch_frame_config(SQLITE_QUEUES_PATH=tmpdir)
    f, _ = _make_function()
    f.clear()  # a server's queue may hold an earlier run's messages
    t0 = time.perf_counter()
    for start in range(0, n, CHUNK):
        f.publish_many([{"x": i, "y": i} for i in range(start, min(n, start + CHUNK))])
    elapsed = time.perf_counter() - t0
    return {"n": n, "publish_seconds": elapsed, "publish_rate": n / elapsed, "queued": f.get_message_count(),
            "db_bytes": sum(p.stat().st_size for p in Path(tmpdir).iterdir() if p.is_file())}


def child_consume(seconds: float, tmpdir: str) -> dict:
    import gc

    from funboost_like import patch_frame_config

    patch_frame_config(SQLITE_QUEUES_PATH=tmpdir)
    f, calls = _make_function()
    gc.collect()
    rss_before = _status_kib("VmRSS")
    samples = []
    t0 = time.monotonic()
    f.consume()
    while True:
        elapsed = time.monotonic() - t0
        if elapsed >= seconds:
            break
        time.sleep(min(0.5, seconds - elapsed))
        samples.append((round(time.monotonic() - t0, 2), _status_kib("VmRSS")))
    rss = _status_kib("VmRSS")
    hwm = _status_kib("VmHWM")
    threads = _status_kib("Threads")
    done = calls["n"]
    f.stop()
    f.consumer.join(60)
    left = f.get_message_count()
    f.clear()
    return {"rss_before_consume_kib": rss_before, "rss_kib": rss, "hwm_kib": hwm, "threads": threads,
            "calls_in_window": done, "samples_kib": samples, "left_after_stop": left}


def run_child(args: list[str], tmpdir: str, timeout: float = 900.0) -> dict:
    env = dict(os.environ)
    env["FUNBOOST_LIKE_NO_USER_CONFIG"] = "1"
    env["FUNBOOST_LIKE_SQLITE_QUEUES_PATH"] = tmpdir
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-dir", tmpdir, *args]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"subprocess timed out after {timeout:.0f}s"}
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH-RESULT "):
            data = json.loads(line[len("BENCH-RESULT "):])
            if proc.stderr.strip():
                data["stderr"] = proc.stderr.strip()[-2000:]
            return data
    return {"error": f"subprocess exited with {proc.returncode}: {proc.stderr.strip()[-2000:]}"}


def _mib(kib: int | None) -> str:
    return "-" if kib is None or kib < 0 else f"{kib / 1024:.1f} MiB"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated backlog sizes")
    parser.add_argument("--seconds", type=float, default=3.0, help="how long to consume before sampling RSS")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    parser.add_argument("--broker", default="PERSISTQUEUE", help="broker kind (BrokerEnum name)")
    parser.add_argument("--child-dir", help=argparse.SUPPRESS)
    parser.add_argument("--child-publish", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-consume", type=float, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _measure(n: int, seconds: float) -> dict:
    """Publish ``n`` messages in one fresh subprocess, then consume for ``seconds`` in another."""
    with tempfile.TemporaryDirectory(prefix="funboost_like_backlog_") as tmpdir:
        print(f"{n:,}: publishing ...", end=" ", file=sys.stderr, flush=True)
        pub = run_child(["--child-publish", str(n)], tmpdir)
        if "error" in pub:
            print(f"ERROR {pub['error']}", file=sys.stderr, flush=True)
            return {"n": n, "publish": pub, "consume": {"error": "not run"}}
        print(f"{pub['publish_seconds']:.1f}s; consuming {seconds:g}s ...", end=" ", file=sys.stderr, flush=True)
        con = run_child(["--child-consume", str(seconds)], tmpdir)
        print("ERROR " + con["error"] if "error" in con else "done", file=sys.stderr, flush=True)
        return {"n": n, "publish": pub, "consume": con}


def _print_table(results: list[dict], seconds: float, started: float) -> None:
    print(f"funboost_like consumer RSS vs backlog ({os.environ['FUNBOOST_LIKE_BENCH_BROKER']})  date "
          f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}  Python {platform.python_version()}"
          f"  CPUs {os.cpu_count()}  load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
          f"  total {time.monotonic() - started:.0f}s")
    print(f"function sleeps 10 ms, concurrent_num=50, RSS read after {seconds:g}s of consuming")
    print()
    header = (f"{'queued':>10} {'publish/s':>10} {'db file':>10} {'RSS before':>11} {'RSS at sample':>14}"
              f" {'peak RSS':>10} {'threads':>8} {'calls':>7}")
    print(header)
    print("-" * len(header))
    for r in results:
        pub, con = r["publish"], r["consume"]
        if "error" in pub or "error" in con:
            print(f"{r['n']:>10,}  ERROR {pub.get('error') or con.get('error')}")
            continue
        print(f"{pub['queued']:>10,} {pub['publish_rate']:>10,.0f} {pub['db_bytes'] / 2**20:>7.1f} MiB"
              f" {_mib(con['rss_before_consume_kib']):>11} {_mib(con['rss_kib']):>14} {_mib(con['hwm_kib']):>10}"
              f" {con['threads']:>8} {con['calls_in_window']:>7,}")


def _summarize(results: list[dict], seconds: float) -> dict:
    good = [r for r in results if "error" not in r["publish"] and "error" not in r["consume"]]
    summary: dict = {}
    if len(good) >= 2:
        small, large = min(good, key=lambda r: r["n"]), max(good, key=lambda r: r["n"])
        ratio = large["consume"]["rss_kib"] / small["consume"]["rss_kib"]
        peak_ratio = large["consume"]["hwm_kib"] / small["consume"]["hwm_kib"]
        summary = {"small": small["n"], "large": large["n"], "rss_ratio": ratio, "peak_ratio": peak_ratio,
                   "target_ratio": TARGET_RATIO, "ok": ratio <= TARGET_RATIO}
        print()
        print(f"RSS ratio {large['n']:,} / {small['n']:,} queued: {ratio:.3f} (peak {peak_ratio:.3f});"
              f" target <= {TARGET_RATIO:.2f}: {'yes' if ratio <= TARGET_RATIO else 'NO'}")
        threads = {r["n"]: r["consume"]["threads"] for r in good}
        if len(set(threads.values())) > 1:
            print(f"note: the consumers ran with different thread counts {threads}; the RSS ratio then also"
                  " compares thread stacks, not only the backlog")
    ideal = 50 * seconds / 0.01
    for r in good:
        if r["consume"]["calls_in_window"] < 0.5 * ideal:
            print(f"note: {r['n']:,}: only {r['consume']['calls_in_window']:,} calls in {seconds:g}s"
                  f" (50 threads sleeping 10 ms could make about {ideal:,.0f}); the process had"
                  f" {r['consume']['threads']} threads (main, fetcher, lease renewer, pool workers)")
    for r in results:
        for part in ("publish", "consume"):
            if r[part].get("stderr"):
                print(f"note: {r['n']:,} {part} subprocess wrote to stderr: {r[part]['stderr'][:500]}")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.child_publish is not None:
        print("BENCH-RESULT " + json.dumps(child_publish(args.child_publish, args.child_dir)), flush=True)
        return 0
    if args.child_consume is not None:
        print("BENCH-RESULT " + json.dumps(child_consume(args.child_consume, args.child_dir)), flush=True)
        return 0

    os.environ["FUNBOOST_LIKE_BENCH_BROKER"] = args.broker
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    started = time.monotonic()
    results = [_measure(n, args.seconds) for n in sizes]
    _print_table(results, args.seconds, started)
    summary = _summarize(results, args.seconds)
    if args.json:
        print()
        print(json.dumps({"results": results, "summary": summary}, indent=2))
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
