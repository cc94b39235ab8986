"""How long the messages of a consumer killed with SIGKILL take to run again, with default settings.

Usage::

    python benchmarks/recovery.py [--brokers PERSISTQUEUE,REDIS_ACK_ABLE,RedisBrpopLpush,REDIS_STREAM] [--json]

For each broker a consumer process (``concurrent_num=5``) starts five calls that would each take a
minute, and is killed with SIGKILL as soon as all five have started. A second consumer process is
started at once; its calls return immediately. Printed per broker: the seconds from the kill until
the first and the last of the five killed calls ran again, and whether every call of the queue ran.
DESIGN §3.3 asks for at most 20 s with the default settings (``SQLITE_LEASE_SECONDS``,
``REDIS_HEARTBEAT_SECONDS``, ``REDIS_DEAD_AFTER_SECONDS``).

Redis kinds use ``FUNBOOST_LIKE_BENCH_REDIS_URL`` (default ``redis://127.0.0.1:6379/14``). This is a
measurement, not a test: the exit code is always 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("FUNBOOST_LIKE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
DEFAULT_BROKERS = "PERSISTQUEUE,REDIS_ACK_ABLE,RedisBrpopLpush,REDIS_STREAM"
HELD = 5  # calls the killed consumer holds
TOTAL = 10


def child(queue: str, kind: str, record: str, hold: bool) -> None:
    """A consumer process: records ``s <i>`` when a call starts; a holding one sleeps a minute per call."""
    from funboost_like import BrokerEnum, task_deco

    @task_deco(queue, broker_kind=BrokerEnum[kind], concurrent_num=HELD, log_level="WARNING")
    def work(i: int) -> None:
        fd = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, f"s {i} {time.time()!r}\n".encode())
        os.close(fd)
        if hold:
            time.sleep(60)

    if hold:
        work.publish_many([{"i": i} for i in range(TOTAL)])
    work.consume()


def starts(record: Path) -> list[tuple[int, float]]:
    if not record.exists():
        return []
    return [(int(i), float(t)) for _, i, t in (line.split() for line in record.read_text().splitlines())]


def measure(kind: str, folder: Path) -> dict[str, object]:
    queue = f"recovery_{uuid.uuid4().hex[:8]}"
    record = folder / f"{queue}.txt"
    env = dict(os.environ, FUNBOOST_LIKE_NO_USER_CONFIG="1", FUNBOOST_LIKE_REDIS_URL=REDIS_URL,
               FUNBOOST_LIKE_SQLITE_QUEUES_PATH=str(folder / "queues"),
               PYTHONPATH=os.pathsep.join(p for p in (os.environ.get("PYTHONPATH", ""), str(REPO_ROOT)) if p))
    command = [sys.executable, __file__, "--child", queue, kind, str(record)]
    first = subprocess.Popen([*command, "hold"], env=env)
    deadline = time.monotonic() + 30
    while len(starts(record)) < HELD and time.monotonic() < deadline:
        time.sleep(0.01)
    held = {i for i, _ in starts(record)}
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = time.time()
    second = subprocess.Popen([*command, "free"], env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            again = [t for i, t in starts(record) if i in held and t > killed_at]
            if len(again) >= len(held) and len({i for i, _ in starts(record)}) == TOTAL:
                break
            time.sleep(0.05)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(30)
    again = sorted(t for i, t in starts(record) if i in held and t > killed_at)
    return {"broker": kind, "held": len(held), "ran_again": len(again),
            "first_s": round(again[0] - killed_at, 2) if again else None,
            "last_s": round(again[-1] - killed_at, 2) if again else None,
            "all_ran": len({i for i, _ in starts(record)}) == TOTAL}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--brokers", default=DEFAULT_BROKERS)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        queue, kind, record, mode = args.child
        child(queue, kind, record, mode == "hold")
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.brokers.split(","):
            rows.append(measure(kind, Path(tmp)))
            print(f"{kind}: done", file=sys.stderr, flush=True)
    print(f"{'broker':<18}{'held':>6}{'ran again':>11}{'first (s)':>11}{'last (s)':>10}  all ran")
    for row in rows:
        print(f"{row['broker']:<18}{row['held']:>6}{row['ran_again']:>11}{row['first_s']!s:>11}{row['last_s']!s:>10}"
              f"  {row['all_ran']}")
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
