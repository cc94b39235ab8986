"""ZEROMQ is at-most-once: how many calls one SIGKILL of a consumer process loses (docs/guarantees.md).

Usage::

    python benchmarks/zeromq_loss.py [--n 6000] [--kills 5] [--concurrent 50] [--seconds 0.1] [--json]

The queue is a free port; its hub is started by this script's first publish and stopped at the end.
N calls ``work(i)`` (each sleeps ``--seconds``) are published, then two consumer processes (this
file with ``--worker``, ``concurrent_num=--concurrent``) run them. Every ``--every`` seconds one of
them is killed with SIGKILL and a new one started, ``--kills`` times; then the last two finish the
queue and are stopped with SIGTERM (a graceful stop hands back what was fetched and not started).
Each call appends ``s <i> <pid>`` when it starts and ``d <i> <pid>`` when it ends to a record file.

Reported: calls lost in all (never finished; of them, never started: fetched by a killed process
before it started them), lost per kill (lost / kills), the calls each killed process was running at
its death, calls run twice (at-most-once: must be 0) and the bound (``concurrent_num``: a consumer
never holds more than its free room, fetched and running together). A measurement, not a test: the
exit code is always 0.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def worker(queue: str, record: str, concurrent: int) -> None:
    from funboost_like import BrokerEnum, task_deco

    def note(line: str) -> None:
        fd = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    @task_deco(queue, broker_kind=BrokerEnum.ZEROMQ, concurrent_num=concurrent, max_retry_times=0, log_level=30)
    def work(i: int, seconds: float) -> None:
        note(f"s {i} {os.getpid()}\n")
        time.sleep(seconds)
        note(f"d {i} {os.getpid()}\n")

    work.consume()  # SIGTERM: a graceful stop


def read(record: Path) -> tuple[collections.Counter[int], dict[int, set[int]], set[int]]:
    started: collections.Counter[int] = collections.Counter()
    by_pid: dict[int, set[int]] = collections.defaultdict(set)
    done: set[int] = set()
    if record.exists():
        for line in record.read_text().splitlines():
            kind, ident, pid = line.split()
            if kind == "s":
                started[int(ident)] += 1
                by_pid[int(pid)].add(int(ident))
            else:
                done.add(int(ident))
    return started, by_pid, done


def measure(args: argparse.Namespace) -> dict:
    from funboost_like import BrokerEnum
    from funboost_like.brokers.registry import get_broker

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        queue = str(probe.getsockname()[1])
    broker = get_broker(BrokerEnum.ZEROMQ)
    tmp = Path(tempfile.mkdtemp(prefix="funboost_like_zeromq_loss_"))
    record = tmp / "record"
    broker.publish_many(queue, [json.dumps({"i": i, "seconds": args.seconds}).encode() for i in range(args.n)])
    env = {**os.environ, "FUNBOOST_LIKE_NO_USER_CONFIG": "1", "FUNBOOST_LIKE_OPS_REGISTRY": "0",
           "FUNBOOST_LIKE_SQLITE_QUEUES_PATH": str(tmp / "sqlite")}

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, __file__, "--worker", queue, str(record), str(args.concurrent)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    workers, kills = [start(), start()], []
    started_at = time.monotonic()
    try:
        for _ in range(args.kills):
            time.sleep(args.every)
            victim = workers.pop(0)
            victim.kill()
            victim.wait(10)
            _, by_pid, done = read(record)
            kills.append({"pid": victim.pid, "held": len(by_pid[victim.pid] - done), "ran": len(by_pid[victim.pid])})
            workers.append(start())
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the queue drained and the live workers finished what they started
            _, by_pid, done = read(record)
            if broker.count(queue) == 0 and all(by_pid[w.pid] <= done for w in workers):
                break
            time.sleep(0.1)
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            w.wait(30)
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
        elapsed = time.monotonic() - started_at
        left = broker.count(queue)
        broker.stop_hub(queue)
    started, by_pid, done = read(record)
    lost = set(range(args.n)) - done
    return {
        "n": args.n, "kills": args.kills, "concurrent_num": args.concurrent, "call_seconds": args.seconds,
        "elapsed": round(elapsed, 1), "left_in_queue": left, "lost": len(lost),
        "lost_not_started": len(lost - set(started)), "run_twice": sum(1 for c in started.values() if c > 1),
        "lost_per_kill_mean": len(lost) / args.kills if args.kills else 0.0,
        "running_at_kill": [len(by_pid[k["pid"]] - done) for k in kills],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--n", type=int, default=6000)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--every", type=float, default=0.8, help="seconds between kills")
    parser.add_argument("--concurrent", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=0.1, help="how long each call sleeps")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], int(args.worker[2]))
        return
    result = measure(args)
    print(f"ZEROMQ loss per SIGKILL: {result['n']} calls of {result['call_seconds']} s, 2 consumer processes of "
          f"concurrent_num={result['concurrent_num']}, {result['kills']} kills, {result['elapsed']} s")
    print(f"lost in all: {result['lost']} ({result['lost_not_started']} never started); run twice: "
          f"{result['run_twice']}; left in the queue: {result['left_in_queue']}")
    print(f"lost per kill: {result['lost_per_kill_mean']:.1f} (bound: concurrent_num = {result['concurrent_num']}); "
          f"calls running in the killed process at its death: {result['running_at_kill']} (the other lost calls "
          "were fetched by it and not started)")
    if args.json:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
