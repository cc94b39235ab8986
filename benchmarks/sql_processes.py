"""SQLACHEMY: several consumer processes on one queue, counted for lost and duplicated calls.

Usage::

    python benchmarks/sql_processes.py [--url postgresql+psycopg://postgres@127.0.0.1:5432/test]
                                       [--n 20000] [--processes 8] [--threads 20]

N messages are published with ``publish_many`` to a fresh queue (``bench_procs_<hex>``) on the database of
``--url``, then a child runs ``run_consumer_with_multi_process(f, processes)`` on it, with no fault. Each
call appends its number to a log file (one ``O_APPEND`` write, atomic between processes). The script
waits until N lines are there (or nothing new came for 30 s), stops the child with SIGTERM, then reports:
calls run, distinct calls, lost (published, never run), duplicates (run more than once), the consume rate
from the first call to the last, and the messages still in the queue. The queue's tables are dropped at
the end. A measurement, not a test: the exit code is always 0.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

APP = '''
import os
from funboost_like import BrokerEnum, run_consumer_with_multi_process, task_deco

LOG = os.environ["BENCH_LOG"]


@task_deco(os.environ["BENCH_QUEUE"], broker_kind=BrokerEnum.SQLACHEMY,
           concurrent_num=int(os.environ["BENCH_THREADS"]), log_level=30)
def f(x):
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, b"%d %.6f\\n" % (x, __import__("time").time()))
    os.close(fd)


if __name__ == "__main__":
    run_consumer_with_multi_process(f, int(os.environ["BENCH_PROCESSES"]))
'''


def read_log(path: Path) -> list[tuple[int, float]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        x, at = line.split()
        rows.append((int(x), float(at)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--threads", type=int, default=20)
    args = parser.parse_args()

    os.environ["FUNBOOST_LIKE_NO_USER_CONFIG"] = "1"
    os.environ["FUNBOOST_LIKE_SQLALCHEMY_URL"] = args.url
    os.environ["FUNBOOST_LIKE_OPS_REGISTRY"] = "0"
    from funboost_like import BrokerEnum, task_deco
    from funboost_like.core.config import redact_url

    queue = f"bench_procs_{uuid.uuid4().hex[:8]}"
    folder = Path(tempfile.mkdtemp(prefix="fl_sql_procs_"))
    log = folder / "calls.log"

    @task_deco(queue, broker_kind=BrokerEnum.SQLACHEMY, log_level=30)
    def f(x: int) -> None: ...

    for start in range(0, args.n, 5_000):
        f.publish_many([{"x": i} for i in range(start, min(args.n, start + 5_000))])
    env = {**os.environ, "BENCH_LOG": str(log), "BENCH_QUEUE": queue, "BENCH_THREADS": str(args.threads),
           "BENCH_PROCESSES": str(args.processes), "PYTHONPATH": str(REPO),
           "FUNBOOST_LIKE_SQLITE_QUEUES_PATH": str(folder / "sqlite")}
    (folder / "app.py").write_text(APP)
    child = subprocess.Popen([sys.executable, str(folder / "app.py")], env=env, start_new_session=True)
    last, seen, idle_since = 0, 0, time.monotonic()
    try:
        while seen < args.n and time.monotonic() - idle_since < 30:
            time.sleep(0.2)
            seen = len(log.read_bytes().splitlines()) if log.exists() else 0
            if seen != last:
                last, idle_since = seen, time.monotonic()
        time.sleep(2.0)  # late duplicates, if any, would land now
    finally:
        os.killpg(child.pid, signal.SIGTERM)
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    rows = read_log(log)
    runs = collections.Counter(x for x, _ in rows)
    times = sorted(at for _, at in rows)
    left = f.get_message_count()
    f.broker.drop_tables(queue)
    result = {
        "url": redact_url(args.url), "processes": args.processes, "threads_per_process": args.threads,
        "published": args.n, "calls_run": len(rows), "distinct": len(runs),
        "lost": len(set(range(args.n)) - set(runs)), "duplicates": sum(c - 1 for c in runs.values() if c > 1),
        "consume_per_second": round((len(rows) - 1) / (times[-1] - times[0])) if len(times) > 1 else None,
        "left_in_queue": left, "loadavg": os.getloadavg()[0],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
