"""Distributed QPS control: the total start rate of several consumer processes, as they come and go.

Usage::

    python benchmarks/distributed_qps.py [--qps 20] [--processes 3] [--seconds 10] [--warmup 2]

``is_using_distributed_frequency_control=True`` shares one ``qps`` among every consumer of a queue,
through Redis (``FUNBOOST_LIKE_BENCH_REDIS_URL``, default ``redis://127.0.0.1:6379/13``). This
publishes enough messages to an embedded SQLite queue (in a temporary folder), then starts
``--processes`` consumer processes (``concurrent_num=20``; each call records ``time.time()`` and its
pid with an O_APPEND line, then sleeps 50 ms) and measures the total start rate over ``--seconds``
in three phases:

1. all processes running (after ``--warmup`` seconds of start-up);
2. right after one of them is SIGKILLed (it leaves without a word);
3. after a new process joins (``--warmup`` seconds after its start).

The rate of a phase is the number of starts in its window divided by the window; "error" compares
it with ``qps`` (DESIGN and issue 4 ask for 5%). The processes' shares show that each takes part.
A measurement, not a test: the exit code is always 0.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_REDIS_URL = os.environ.get("FUNBOOST_LIKE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")

APP = '''
import os, sys, time
from funboost_like import task_deco

LOG = os.environ["BENCH_LOG"]


@task_deco(os.environ["BENCH_QUEUE"], qps=float(os.environ["BENCH_QPS"]), is_using_distributed_frequency_control=True,
           concurrent_num=20, log_level=30)
def job(x):
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, f"{time.time():.6f} {os.getpid()}\\n".encode())
    os.close(fd)
    time.sleep(0.05)


if __name__ == "__main__":
    if sys.argv[1] == "publish":
        job.clear()
        job.publish_many([{"x": i} for i in range(int(sys.argv[2]))])
    elif sys.argv[1] == "clear":
        job.clear()
    else:
        job.consume()
'''


def starts(log: Path, t0: float, t1: float) -> list[tuple[float, str]]:
    try:
        text = log.read_text()
    except FileNotFoundError:
        return []
    got = []
    for line in text.splitlines():
        stamp, pid = line.split()
        if t0 <= float(stamp) < t1:
            got.append((float(stamp), pid))
    return got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--qps", type=float, default=20.0)
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window of each phase")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds after a start before measuring")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        app = Path(tmp) / "qps_app.py"
        app.write_text(APP)
        log = Path(tmp) / "starts.log"
        queue = f"bench_distributed_qps_{os.getpid()}"
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), FUNBOOST_LIKE_NO_USER_CONFIG="1",
                   FUNBOOST_LIKE_SQLITE_QUEUES_PATH=str(Path(tmp) / "queues"), FUNBOOST_LIKE_REDIS_URL=BENCH_REDIS_URL,
                   BENCH_LOG=str(log), BENCH_QUEUE=queue, BENCH_QPS=str(args.qps))
        total = int(args.qps * (3 * (args.seconds + args.warmup) + 10)) + 100
        subprocess.run([sys.executable, str(app), "publish", str(total)], env=env, check=True, cwd=tmp)

        def start() -> subprocess.Popen[bytes]:
            return subprocess.Popen([sys.executable, str(app), "consume"], env=env, cwd=tmp, stderr=subprocess.DEVNULL)

        print(f"distributed_qps  {time.strftime('%Y-%m-%dT%H:%M:%S')}  qps {args.qps:g}  window {args.seconds:g}s  "
              f"Redis {BENCH_REDIS_URL}  load average {os.getloadavg()[0]:.2f}")
        print(f"{'phase':<34}{'starts':>8}{'rate/s':>9}{'error':>8}  starts per process")
        procs = [start() for _ in range(args.processes)]
        try:
            phases = []
            time.sleep(args.warmup)
            phases.append((f"{args.processes} processes", time.time()))
            time.sleep(args.seconds)
            os.kill(procs[0].pid, signal.SIGKILL)
            procs[0].wait(10)
            phases.append((f"one SIGKILLed: {args.processes - 1} left", time.time()))
            time.sleep(args.seconds)
            procs.append(start())
            time.sleep(args.warmup)
            phases.append((f"one joined: {args.processes} again", time.time()))
            time.sleep(args.seconds)
            for name, t0 in phases:
                window = starts(log, t0, t0 + args.seconds)
                rate = len(window) / args.seconds
                shares = collections.Counter(pid for _, pid in window)
                print(f"{name:<34}{len(window):>8}{rate:>9.2f}{(rate - args.qps) / args.qps:>+8.1%}  "
                      f"{' '.join(str(n) for n in sorted(shares.values(), reverse=True))}")
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
            subprocess.run([sys.executable, str(app), "clear"], env=env, cwd=tmp, check=False)


if __name__ == "__main__":
    main()
