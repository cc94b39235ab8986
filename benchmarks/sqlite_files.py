"""SQLite broker: 4 publisher and 4 consumer processes on one queue, spread over 1, 2 and 4 files.

Usage::

    python benchmarks/sqlite_files.py [--files 1,2,4] [--publishers 4] [--consumers 4] [--per-publisher 5000]
                                      [--batch 50]

For each ``SQLITE_FILES_PER_QUEUE`` value, in a fresh temporary SQLite folder
(``FUNBOOST_LIKE_NO_USER_CONFIG=1``), the publishers and the consumers are started at once as
separate processes, wait until all are ready, and start together. With the broker API directly (no
consumer loop, so only the broker is measured):

* a publisher calls ``publish(queue, body)`` ``--per-publisher`` times, one by one (one commit each);
* a consumer loops ``fetch(queue, batch, 0.2)`` then ``ack`` of the batch, and stops once every
  publisher is done and a fetch comes back empty.

Publish rate = all messages / (end of the last publisher - start); consume rate = all messages /
(last ack - start): both run side by side, so the consume rate is bounded by the publish rate. The
script checks that every message was consumed exactly once and the queue is empty. A measurement,
not a test: the exit code is always 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

QUEUE = "bench_files"


def wait_for(path: Path) -> None:
    while not path.exists():
        time.sleep(0.002)


def child_main(role: str, index: int, sync: Path, count: int, batch: int) -> None:
    """One publisher or consumer process; prints one JSON line."""
    from funboost_like.brokers.sqlite import SqliteBroker

    broker = SqliteBroker()
    broker.count(QUEUE)  # open the files before the clock starts
    (sync / f"ready-{role}-{index}").touch()
    wait_for(sync / "go")
    if role == "publish":
        for i in range(count):
            broker.publish(QUEUE, b'{"p":%d,"i":%d}' % (index, i))
        print(json.dumps({"end": time.time(), "n": count}))
        (sync / f"done-{index}").touch()
        return
    seen: list[str] = []
    last = time.time()
    while True:
        got = broker.fetch(QUEUE, batch, 0.2)
        if got:
            broker.ack(got)
            last = time.time()
            seen += [d.body.decode() for d in got]
        elif (sync / "published").exists():
            break
    print(json.dumps({"end": last, "n": len(seen), "seen": seen}))


def run(files: int, publishers: int, consumers: int, per_publisher: int, batch: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        folder, sync = Path(tmp) / "queues", Path(tmp) / "sync"
        sync.mkdir()
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), FUNBOOST_LIKE_NO_USER_CONFIG="1",
                   FUNBOOST_LIKE_SQLITE_QUEUES_PATH=str(folder), FUNBOOST_LIKE_SQLITE_FILES_PER_QUEUE=str(files))
        roles = [("publish", i) for i in range(publishers)] + [("consume", i) for i in range(consumers)]
        children = [subprocess.Popen([sys.executable, __file__, "--child", role, str(i), str(sync),
                                      str(per_publisher), str(batch)], env=env, stdout=subprocess.PIPE, text=True)
                    for role, i in roles]
        try:
            while len(list(sync.glob("ready-*"))) < len(roles):
                time.sleep(0.01)
            start = time.time()
            (sync / "go").touch()
            while len(list(sync.glob("done-*"))) < publishers:
                time.sleep(0.01)
            (sync / "published").touch()
            results = [json.loads(child.communicate(timeout=600)[0].strip().splitlines()[-1]) for child in children]
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
                    child.wait(10)
        total = publishers * per_publisher
        seen = [body for result in results[publishers:] for body in result["seen"]]
        left = sum(int(sqlite3.connect(path).execute("SELECT count(*) FROM messages").fetchone()[0])
                   for path in folder.glob(f"{QUEUE}*.sqlite3"))
        return {
            "files": files, "messages": total,
            "publish_rate": total / (max(r["end"] for r in results[:publishers]) - start),
            "consume_rate": len(seen) / (max(r["end"] for r in results[publishers:]) - start),
            "per_consumer": [r["n"] for r in results[publishers:]],
            "exactly_once": len(seen) == len(set(seen)) == total and left == 0,
            "file_names": sorted(p.name for p in folder.glob(f"{QUEUE}*.sqlite3")),
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", default="1,2,4")
    parser.add_argument("--publishers", type=int, default=4)
    parser.add_argument("--consumers", type=int, default=4)
    parser.add_argument("--per-publisher", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        role, index, sync, count, batch = args.child
        child_main(role, int(index), Path(sync), int(count), int(batch))
        return 0
    print(f"SQLITE_FILES_PER_QUEUE: {args.publishers} publisher + {args.consumers} consumer processes on one "
          f"queue, {args.per_publisher} one-by-one publishes each, fetch batch {args.batch}; SQLite "
          f"{sqlite3.sqlite_version}, CPUs {os.cpu_count()}, {time.strftime('%Y-%m-%dT%H:%M:%S%z')}")
    print(f"{'files':>5} {'publish/s':>10} {'consume/s':>10}  exactly once  messages per consumer")
    for files in (int(value) for value in args.files.split(",")):
        r = run(files, args.publishers, args.consumers, args.per_publisher, args.batch)
        print(f"{files:>5} {r['publish_rate']:>10,.0f} {r['consume_rate']:>10,.0f}  {str(r['exactly_once']):<12}  "
              f"{r['per_consumer']}")
    print(f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
