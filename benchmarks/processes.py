"""CPU-bound calls: consumption rate with 1 process vs 2 processes on this machine.

A CPU-bound function gains nothing from threads (the GIL); processes stacked on the pool do scale.
Each run: N messages are published in bulk to a fresh SQLite queue, then
``run_consumer_with_multi_process(burn, k)`` runs in a subprocess until every call has been recorded.

    python benchmarks/processes.py [--n 4000] [--work 20000] [--processes 1,2]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

APP = '''
import os, sys
from funboost_like import run_consumer_with_multi_process, task_deco

LOG = os.environ["BENCH_LOG"]
WORK = int(os.environ["BENCH_WORK"])


@task_deco("cpu_bench", concurrent_num=4, log_level=30)
def burn(x):
    total = 0
    for i in range(WORK):  # pure-Python CPU work: holds the GIL
        total += i * i
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, b"x\\n")
    os.close(fd)
    return total


if __name__ == "__main__":
    if sys.argv[1] == "publish":
        burn.clear()
        burn.publish_many([{"x": i} for i in range(int(sys.argv[2]))])
    else:
        run_consumer_with_multi_process(burn, int(sys.argv[2]))
'''


def lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def run(n: int, work: int, processes: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        app = Path(tmp) / "cpu_app.py"
        app.write_text(APP)
        log = Path(tmp) / "done.log"
        env = dict(os.environ, PYTHONPATH=str(REPO), FUNBOOST_LIKE_NO_USER_CONFIG="1",
                   FUNBOOST_LIKE_SQLITE_QUEUES_PATH=str(Path(tmp) / "queues"), BENCH_LOG=str(log),
                   BENCH_WORK=str(work))
        subprocess.run([sys.executable, str(app), "publish", str(n)], env=env, check=True, cwd=tmp)
        proc = subprocess.Popen([sys.executable, str(app), "consume", str(processes)], env=env, cwd=tmp,
                                stderr=subprocess.DEVNULL)
        while lines(log) == 0:  # timing starts at the first call, so process start-up is not counted
            time.sleep(0.01)
        started, first = time.perf_counter(), lines(log)
        while lines(log) < n:
            time.sleep(0.02)
        elapsed = time.perf_counter() - started
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        return (n - first) / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--work", type=int, default=20000, help="loop iterations per call")
    parser.add_argument("--processes", default="1,2")
    args = parser.parse_args()
    print(f"CPU-bound calls ({args.work} loop iterations each), {args.n} messages, SQLite queue, "
          f"CPUs {os.cpu_count()}, load {os.getloadavg()[0]:.2f}, {time.strftime('%Y-%m-%dT%H:%M:%S')}")
    rates = {}
    for k in (int(p) for p in args.processes.split(",")):
        rates[k] = run(args.n, args.work, k)
        print(f"{k} process(es): {rates[k]:8,.0f} calls/s" + (f"  ({rates[k] / rates[1]:.2f}x one process)"
                                                           if 1 in rates and k != 1 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
