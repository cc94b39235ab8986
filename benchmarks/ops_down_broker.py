"""How long the operations commands take on a host that once used a broker which is down now.

Usage::

    python benchmarks/ops_down_broker.py [--timeout-ms 30000] [--repeat 1]

In a fresh temporary data folder (``XDG_DATA_HOME``, ``FUNBOOST_LIKE_NO_USER_CONFIG=1``), one queue on the
embedded SQLite broker holds a message, and the host's registry says it also used ``MONGOMQ``, whose
``MONGO_URL`` points at a closed port (``127.0.0.1:1``) with ``serverSelectionTimeoutMS`` set to
``--timeout-ms`` (30,000 is pymongo's default: a MongoDB that went away). Then each of
``funboost_like status Q``, ``workers``, ``queues`` and ``metrics --once`` runs as a new process, and the
script prints its wall time and exit status. Run it with ``PYTHONPATH`` naming the tree to measure.
A measurement, not a test: exit code 0.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

SETUP = """
from funboost_like import BrokerEnum, task_deco
from funboost_like.ops import registry

@task_deco("ops_down_q", broker_kind=BrokerEnum.PERSISTQUEUE)
def f(x):
    return x

f.push(1)
registry.note_kind(int(BrokerEnum.MONGOMQ))
"""

COMMANDS = [["status", "ops_down_q"], ["workers"], ["queues"], ["metrics", "--once"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout-ms", type=int, default=30_000, help="MongoDB's serverSelectionTimeoutMS")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ops-down-") as folder:
        env = {**os.environ, "XDG_DATA_HOME": folder, "FUNBOOST_LIKE_NO_USER_CONFIG": "1",
               "FUNBOOST_LIKE_MONGO_URL": f"mongodb://127.0.0.1:1/x?serverSelectionTimeoutMS={args.timeout_ms}"}
        subprocess.run([sys.executable, "-c", SETUP], env=env, check=True, capture_output=True, cwd=folder)
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        for command in COMMANDS:
            for _ in range(args.repeat):
                started = time.perf_counter()
                done = subprocess.run([sys.executable, "-m", "funboost_like", *command], env=env, cwd=folder,
                                      capture_output=True, text=True, timeout=600)
                print(f"funboost_like {' '.join(command):<16} {time.perf_counter() - started:6.1f} s  "
                      f"exit {done.returncode}")
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
