"""The registry's and the metrics' cost in instructions: steadier than rates on a machine shared with other work.

Usage::

    python benchmarks/ops_metrics_cost.py [--brokers memory,sqlite] [--small N] [--large N]

Runs the child of ``benchmarks/ops_registry_cost.py`` (publish N messages in bulk, then consume them)
under ``valgrind --tool=callgrind`` (which must be installed), once with N = ``--small`` and once with
N = ``--large``, with everything off (``OPS_REGISTRY``, ``METRICS``, ``OPENTELEMETRY_TRACING`` = 0)
and with everything on (heartbeats every 0.5 s; whatever of opentelemetry is installed, no SDK).
The difference between the two runs of a setting, divided by ``large - small``, is the instructions
one message costs, start-up and imports cancelled out. The same child stopped before it consumes
gives the publish's share, so the consume's own instructions per message are printed too: the
figure the registry and metrics target is about (consume throughput within 10%). Valgrind slows
the programs down about 50 times, so the threads that work per second of wall time (heartbeats, the
metrics snapshot) weigh more here than in a normal run: the ratio is an upper bound of the cost. A
measurement, not a test: exit code 0.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

from ops_registry_cost import _CHILD, BROKERS, REPO_ROOT


def instructions(broker: str, n: int, on: bool, publish_only: bool = False) -> int:
    with tempfile.TemporaryDirectory() as folder:
        flag = "1" if on else "0"
        env = dict(os.environ, FUNBOOST_LIKE_NO_USER_CONFIG="1", FUNBOOST_LIKE_SQLITE_QUEUES_PATH=folder,
                   FUNBOOST_LIKE_STATUS_DB_PATH=folder, FUNBOOST_LIKE_OPS_REGISTRY=flag,
                   FUNBOOST_LIKE_OPS_HEARTBEAT_SECONDS="0.5", FUNBOOST_LIKE_METRICS=flag,
                   FUNBOOST_LIKE_OPENTELEMETRY_TRACING=flag, FUNBOOST_LIKE_METRICS_DIR=os.path.join(folder, "metrics"),
                   PYTHONPATH=str(REPO_ROOT))
        done = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={folder}/callgrind.out",
                               sys.executable, "-c", _CHILD, BROKERS[broker], str(n),
                               *(["publish-only"] if publish_only else [])],
                              env=env, capture_output=True, text=True, timeout=3600, check=True)
        found = re.search(r"Collected : (\d+)", done.stderr)
        if found is None:
            raise RuntimeError(f"no instruction count in valgrind's output: {done.stderr[-2000:]}")
        return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--brokers", default="memory,sqlite")
    parser.add_argument("--small", type=int, default=5_000)
    parser.add_argument("--large", type=int, default=25_000)
    args = parser.parse_args()
    for broker in args.brokers.split(","):
        whole, consume = {}, {}
        for setting in ("off", "on"):
            on = setting == "on"
            small, large = instructions(broker, args.small, on), instructions(broker, args.large, on)
            whole[setting] = (large - small) / (args.large - args.small)
            published = (instructions(broker, args.large, on, publish_only=True)
                         - instructions(broker, args.small, on, publish_only=True)) / (args.large - args.small)
            consume[setting] = whole[setting] - published
        print(f"{broker:8} instructions per message, publish in bulk + consume: off {whole['off']:8,.0f}  "
              f"on {whole['on']:8,.0f}  on/off {whole['on'] / whole['off']:6.1%}")
        print(f"{broker:8} instructions per message, consume only:             off {consume['off']:8,.0f}  "
              f"on {consume['on']:8,.0f}  on/off {consume['on'] / consume['off']:6.1%}", flush=True)

if __name__ == "__main__":
    main()
