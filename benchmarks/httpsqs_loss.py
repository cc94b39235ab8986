"""HTTPSQS is at-most-once: how many calls one SIGKILL of a consumer process loses (docs/guarantees.md).

Usage::

    python benchmarks/httpsqs_loss.py [--n 6000] [--kills 5] [--every 0.8] [--concurrent 50] [--seconds 0.1]

Runs against the fixture server (``tests/httpsqs_server.py``: no real httpsqs here), a private one
on a free port started by this script and stopped by its PID at the end. N calls ``work(i)`` (each
sleeps ``--seconds``) are published; two consumer processes (this file with ``--worker``,
``concurrent_num=--concurrent``) run them; every ``--every`` seconds the older one is SIGKILLed and a
new one started, ``--kills`` times; the last two finish the queue and stop with SIGTERM. Each call
appends ``s <i> <pid>`` when it starts and ``d <i> <pid>`` when it ends to a record file.

Reported: calls lost (never finished; of them, never started: fetched by a killed process and not
begun), lost per kill, calls run twice (at-most-once: must be 0), and the bound per kill
(``concurrent_num``: a consumer never fetches more than its free room). A measurement, not a test.
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
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

QUEUE = "httpsqs_loss"


def worker(record: str, concurrent: int) -> None:
    from funboost_like import BrokerEnum, task_deco

    @task_deco(QUEUE, broker_kind=BrokerEnum.HTTPSQS, concurrent_num=concurrent, max_retry_times=0, log_level=30)
    def work(i: int, seconds: float) -> None:
        with open(record, "a") as out:  # one short append per line
            out.write(f"s {i} {os.getpid()}\n")
        time.sleep(seconds)
        with open(record, "a") as out:
            out.write(f"d {i} {os.getpid()}\n")

    work.consume()


def read(record: Path) -> tuple[collections.Counter[int], dict[int, set[int]], set[int]]:
    started: collections.Counter[int] = collections.Counter()
    by_pid: dict[int, set[int]] = collections.defaultdict(set)
    done: set[int] = set()
    for line in record.read_text().splitlines() if record.exists() else ():
        kind, ident, pid = line.split()
        if kind == "s":
            started[int(ident)] += 1
            by_pid[int(pid)].add(int(ident))
        else:
            done.add(int(ident))
    return started, by_pid, done


def measure(args: argparse.Namespace) -> dict:
    from funboost_like import BrokerEnum, patch_frame_config
    from funboost_like.brokers.registry import get_broker
    from tests.httpsqs_server import listening
    from tests.test_httpsqs import free_port

    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="funboost_like_httpsqs_loss_"))
    server = subprocess.Popen([sys.executable, str(REPO_ROOT / "tests" / "httpsqs_server.py"), "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[subprocess.Popen[bytes]] = []
    try:
        while not listening(port=port):
            time.sleep(0.02)
        url = f"http://127.0.0.1:{port}/"
        patch_frame_config(HTTPSQS_URL=url)
        broker = get_broker(BrokerEnum.HTTPSQS)
        record = tmp / "record"
        broker.publish_many(QUEUE, [json.dumps({"i": i, "seconds": args.seconds}).encode() for i in range(args.n)])
        env = {**os.environ, "FUNBOOST_LIKE_NO_USER_CONFIG": "1", "FUNBOOST_LIKE_OPS_REGISTRY": "0",
               "FUNBOOST_LIKE_SQLITE_QUEUES_PATH": str(tmp / "sqlite"), "FUNBOOST_LIKE_HTTPSQS_URL": url}

        def start() -> subprocess.Popen[bytes]:
            return subprocess.Popen([sys.executable, __file__, "--worker", str(record), str(args.concurrent)],
                                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        workers += [start(), start()]
        begun, held = time.monotonic(), []
        for _ in range(args.kills):
            time.sleep(args.every)
            victim = workers.pop(0)
            victim.kill()
            victim.wait(10)
            _, by_pid, done = read(record)
            held.append(len(by_pid[victim.pid] - done))
            workers.append(start())
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # drained, and the live workers finished what they started
            _, by_pid, done = read(record)
            if broker.count(QUEUE) == 0 and all(by_pid[w.pid] <= done for w in workers):
                break
            time.sleep(0.1)
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            w.wait(30)
        elapsed, left = time.monotonic() - begun, broker.count(QUEUE)
        broker.close()
    finally:
        for process in [*workers, server]:
            if process.poll() is None:
                process.kill()
                process.wait(10)
    started, _, done = read(record)
    lost = set(range(args.n)) - done
    return {"n": args.n, "kills": args.kills, "concurrent_num": args.concurrent, "call_seconds": args.seconds,
            "elapsed": round(elapsed, 1), "left_in_queue": left, "lost": len(lost),
            "lost_not_started": len(lost - set(started)), "run_twice": sum(1 for c in started.values() if c > 1),
            "lost_per_kill": len(lost) / args.kills if args.kills else 0.0, "running_at_kill": held}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--n", type=int, default=6000)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--every", type=float, default=0.8, help="seconds between kills")
    parser.add_argument("--concurrent", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=0.1, help="how long each call sleeps")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]))
        return
    result = measure(args)
    print(f"HTTPSQS loss per SIGKILL (fixture server): {result['n']} calls of {result['call_seconds']} s, "
          f"2 consumers of concurrent_num={result['concurrent_num']}, {result['kills']} kills, {result['elapsed']} s")
    print(f"lost: {result['lost']} ({result['lost_not_started']} never started); run twice: {result['run_twice']}; "
          f"left in the queue: {result['left_in_queue']}")
    print(f"lost per kill: {result['lost_per_kill']:.1f} (bound: {result['concurrent_num']}); running in the killed "
          f"process at its death: {result['running_at_kill']}")
    if args.json:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
