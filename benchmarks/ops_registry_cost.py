"""What the operations registry costs the consume loop: consume throughput with ``OPS_REGISTRY`` on and off.

Usage::

    python benchmarks/ops_registry_cost.py [--brokers memory,sqlite] [--n N] [--repeat R] [--with-metrics]

With ``--with-metrics``, "on" also turns on the Prometheus recording (``METRICS``, snapshots into the
run's temporary folder every second) and OpenTelemetry tracing (``OPENTELEMETRY_TRACING``, with
whatever of opentelemetry is installed but no SDK configured), and "off" turns all three off: the
cost of the registry and the metrics together (docs/performance.md).

For every broker, runs alternate (off, on, off, on, ...) ``R`` times each, every run in a fresh Python
subprocess with its own temporary SQLite folder and ``FUNBOOST_LIKE_NO_USER_CONFIG=1``: N messages of
``def f(x, y): return x + y`` are published in bulk (not timed), then the clock runs from
``f.consume()`` until the function ran N times and the broker holds nothing unacknowledged. With the
registry on, the consumer registers, beats every ``OPS_HEARTBEAT_SECONDS`` (0.5 s here, four times
the default rate, so the cost shows) and reads its control record four times a second.
Prints the median and the best rate of each setting and their ratios on/off, and the messages per
second of the process's CPU time (all its threads, the registry's included): on a machine shared
with other work, wall-clock rates vary a lot from run to run, CPU cost much less.
A measurement, not a test: exit code 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BROKERS = {"memory": "LOCAL_PYTHON_QUEUE", "sqlite": "PERSISTQUEUE"}
DEFAULT_N = {"memory": 200_000, "sqlite": 50_000}

_CHILD = """
import logging, sys, time
from funboost_like import task_deco
from funboost_like.brokers.registry import get_broker

kind, n = sys.argv[1], int(sys.argv[2])
done = [0]

@task_deco("ops_bench", broker_kind=kind, concurrent_num=50, log_level=logging.WARNING)
def f(x, y):
    done[0] += 1
    return x + y

f.get_message_count()
for start in range(0, n, 10_000):
    f.publish_many([{"x": i, "y": i} for i in range(start, min(n, start + 10_000))])
broker = get_broker(kind)
started, cpu_started = time.perf_counter(), time.process_time()
f.consume()
while done[0] < n or broker.in_flight("ops_bench"):
    time.sleep(0.001)
elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
f.consumer.stop()
f.consumer.join(30)
print(n / elapsed, n / cpu)
"""


def run_once(broker: str, n: int, registry_on: bool, with_metrics: bool = False) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as folder:
        env = dict(os.environ, FUNBOOST_LIKE_NO_USER_CONFIG="1", FUNBOOST_LIKE_SQLITE_QUEUES_PATH=folder,
                   FUNBOOST_LIKE_STATUS_DB_PATH=folder, FUNBOOST_LIKE_OPS_REGISTRY="1" if registry_on else "0",
                   FUNBOOST_LIKE_OPS_HEARTBEAT_SECONDS="0.5", PYTHONPATH=str(REPO_ROOT))
        if with_metrics:
            on = "1" if registry_on else "0"
            env.update(FUNBOOST_LIKE_METRICS=on, FUNBOOST_LIKE_OPENTELEMETRY_TRACING=on,
                       FUNBOOST_LIKE_METRICS_DIR=os.path.join(folder, "metrics"))
        done = subprocess.run([sys.executable, "-c", _CHILD, BROKERS[broker], str(n)], env=env, capture_output=True,
                              text=True, timeout=600, check=True)
        wall, cpu = done.stdout.strip().splitlines()[-1].split()
        return float(wall), float(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--brokers", default="memory,sqlite")
    parser.add_argument("--n", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--with-metrics", action="store_true", help="on/off also switch METRICS and tracing")
    args = parser.parse_args()
    results = {}
    for broker in args.brokers.split(","):
        n = args.n or DEFAULT_N[broker]
        rates: dict[str, list[float]] = {"off": [], "on": []}
        cpu_rates: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(args.repeat):
            for setting in ("off", "on"):
                wall, cpu = run_once(broker, n, setting == "on", args.with_metrics)
                rates[setting].append(wall)
                cpu_rates[setting].append(cpu)
        off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
        best_off, best_on = max(rates["off"]), max(rates["on"])
        results[broker] = {"n": n, "off": rates["off"], "on": rates["on"], "median_off": off, "median_on": on,
                           "ratio_on_off": on / off, "best_off": best_off, "best_on": best_on,
                           "best_ratio_on_off": best_on / best_off, "cpu_off": cpu_rates["off"],
                           "cpu_on": cpu_rates["on"]}
        cpu_off, cpu_on = statistics.median(cpu_rates["off"]), statistics.median(cpu_rates["on"])
        if not args.json:
            print(f"{broker:8} N={n:<7} median: off {off:10,.0f}/s  on {on:10,.0f}/s  on/off {on / off:6.1%}; "
                  f"best: off {best_off:10,.0f}/s  on {best_on:10,.0f}/s  on/off {best_on / best_off:6.1%}")
            print(f"         per CPU second (median): off {cpu_off:10,.0f}  on {cpu_on:10,.0f}  "
                  f"on/off {cpu_on / cpu_off:6.1%}")
            print(f"         runs off: {', '.join(f'{r:,.0f}' for r in rates['off'])}")
            print(f"         runs on:  {', '.join(f'{r:,.0f}' for r in rates['on'])}")
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
