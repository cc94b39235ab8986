"""SQLite broker: fetch + ack rate of ready messages while many delayed messages wait in the same queue.

Usage::

    python benchmarks/sqlite_delayed.py [--delayed 100000] [--ready 50000] [--batch 50] [--json]

In a fresh subprocess (own temporary SQLite folder, ``FUNBOOST_LIKE_NO_USER_CONFIG=1``), with the
broker API directly (no consumer, so only the broker is measured):

1. publish ``--delayed`` messages due in one hour (one transaction per 10,000, not timed);
2. publish ``--ready`` messages ready now with ``publish_many`` (not timed);
3. time a loop of ``fetch(queue, batch, 1.0)`` followed by ``ack`` of the batch until every ready
   message was taken; rate = ready / elapsed;
4. check that the delayed messages are still counted by ``count()`` and none was fetched.

The same is measured with no delayed messages, for comparison, and once more with the ``--delayed``
messages all due (published due a few seconds ahead, then waited for; only ``--ready`` of them are
timed): that row includes moving due messages out of the ``delayed`` table. A measurement, not a
test: the exit code is always 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

QUEUE = "bench_delayed"


def child_main(delayed: int, ready: int, batch: int, all_due: bool) -> None:
    from funboost_like.brokers.sqlite import SqliteBroker

    broker = SqliteBroker()
    due = time.time() + (max(3.0, delayed / 20_000) if all_due else 3600)
    for start in range(0, delayed, 10_000):
        conn = broker._conn(broker._files(QUEUE).files[0])  # one transaction per chunk keeps the setup short
        conn.execute("BEGIN IMMEDIATE")
        for i in range(start, min(delayed, start + 10_000)):
            broker.publish(QUEUE, b'{"d":%d}' % i, not_before=due)
        conn.execute("COMMIT")
    if all_due:
        time.sleep(max(0.0, due - time.time()) + 0.1)
    else:
        for start in range(0, ready, 10_000):
            broker.publish_many(QUEUE, [b'{"r":%d}' % i for i in range(start, min(ready, start + 10_000))])
    waiting = broker.count(QUEUE)
    taken = 0
    wrong = 0
    t0 = time.perf_counter()
    while taken < ready:
        got = broker.fetch(QUEUE, batch, 1.0)
        if not got:
            break
        wrong += sum(1 for d in got if d.body.startswith(b'{"r"' if all_due else b'{"d"'))
        broker.ack(got)
        taken += len(got)
    elapsed = time.perf_counter() - t0
    left = broker.count(QUEUE)
    broker.close()
    total = delayed if all_due else delayed + ready
    out = {"delayed": delayed, "ready": ready, "batch": batch, "all_due": all_due, "elapsed": elapsed,
           "rate": taken / elapsed, "counted_before": waiting, "left_after": left,
           "ok": taken == ready and wrong == 0 and waiting == total and left == total - ready}
    sys.stdout.write("BENCH-RESULT " + json.dumps(out) + "\n")


def run_child(delayed: int, ready: int, batch: int, all_due: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="funboost_like_bench_delayed_") as tmpdir:
        env = dict(os.environ)
        env["FUNBOOST_LIKE_NO_USER_CONFIG"] = "1"
        env["FUNBOOST_LIKE_SQLITE_QUEUES_PATH"] = tmpdir
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--delayed", str(delayed),
               "--ready", str(ready), "--batch", str(batch)] + (["--all-due"] if all_due else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH-RESULT "):
            return dict(json.loads(line[len("BENCH-RESULT "):]))
    return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--delayed", type=int, default=100_000)
    parser.add_argument("--ready", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--all-due", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.delayed, args.ready, args.batch, args.all_due)
        return
    rows = [run_child(n, args.ready, args.batch) for n in (0, args.delayed)]
    rows.append(run_child(args.delayed, min(args.ready, args.delayed), args.batch, all_due=True))
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"SQLite fetch({args.batch}) + ack of {args.ready:,} ready messages; load average at end {load}")
    print(f"{'delayed rows':>13} {'rate/s':>10} {'elapsed s':>10}  check  what is fetched")
    for row in rows:
        if "error" in row:
            print(f"{'?':>13} error: {row['error']}")
            continue
        what = (f"{row['ready']:,} of the delayed ones, all due" if row["all_due"]
                else f"{row['ready']:,} ready ones; the delayed ones are due in an hour")
        check = "ok" if row["ok"] else "FAILED"
        print(f"{row['delayed']:>13,} {row['rate']:>10,.0f} {row['elapsed']:>10.2f}  {check:<6} {what}")
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
    except Exception:  # a measurement, not a test
        import traceback

        traceback.print_exc()
    sys.exit(0)
