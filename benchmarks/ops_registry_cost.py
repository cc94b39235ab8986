"""What the operations registry costs the consume loop: consume throughput with ``OPS_REGISTRY`` on and off.

Usage::

    python benchmarks/ops_registry_cost.py [--brokers memory,sqlite] [--n N] [--repeat R] [--with-metrics]
    python benchmarks/ops_registry_cost.py --interleaved [--brokers memory,sqlite] [--n N] [--segment S]

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
second of the process's CPU time (all its threads, the registry's included). ``--control`` runs "off"
in both places: the ratio it prints is the method's own noise, which on this machine (a VM whose
speed drifts by ±25% between runs) can itself be 15-20% away from 100%.

``--interleaved`` alternates inside one process instead, because this machine's speed drifts by
±25% from one run to the next: one consumer, built with the registry and the metrics on, consumes
N messages published beforehand, and every S messages the function switches the registry's and the
metrics' hooks off or back on (the consumer's gate and after-call lists without or with them), so
"on" and "off" stretches of a fraction of a second follow each other under the same conditions.
At the end of an "on" stretch the pending metrics are drained on the spot, so their bucketing is
charged to it. The registry's heartbeat thread beats in both (its cost is per second, not per
message), so it is measured apart: the share of a core an idle consumer's process uses for 10 s,
all on and all off. Prints the messages per CPU second of each kind of stretch (median), the median
of the on/off ratios of neighbouring stretches, and the two idle shares.
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
if sys.argv[3:] == ["publish-only"]:  # benchmarks/ops_metrics_cost.py: the publish's share, subtracted
    sys.exit(0)
started, cpu_started = time.perf_counter(), time.process_time()
f.consume()
while done[0] < n or broker.in_flight("ops_bench"):
    time.sleep(0.001)
elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
f.consumer.stop()
f.consumer.join(30)
print(n / elapsed, n / cpu)
"""

_INTERLEAVED_CHILD = """
import logging, os, statistics, sys, time
from funboost_like import task_deco
from funboost_like.observability import metrics

kind, n, segment = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
TOGGLED = ("funboost_like.ops.agent", "funboost_like.observability.metrics")
done = [0]
marks = []  # (cpu time, whether the stretch that ended here was "on")
state = {"on": True}

@task_deco("ops_bench", broker_kind=kind, concurrent_num=50, log_level=logging.WARNING)
def f(x, y):
    done[0] += 1
    if done[0] % segment == 0:
        switch()
    return x + y

def switch():
    consumer = f.consumer
    if state["on"]:
        metrics.numbers_for("ops_bench").drain()
    marks.append((time.process_time(), state["on"]))
    state["on"] = not state["on"]
    consumer._gates, consumer._after = hooks[state["on"]]

f.get_message_count()
for start in range(0, n, 10_000):
    f.publish_many([{"x": i, "y": i} for i in range(start, min(n, start + 10_000))])
consumer = f.consumer
def kept(hook):
    owner = type(getattr(hook, "__self__", hook)).__module__
    return owner not in TOGGLED and "_recorder" not in getattr(hook, "__qualname__", "")

hooks = {True: (list(consumer._gates), list(consumer._after)),
         False: ([gate for gate in consumer._gates if kept(gate)], [hook for hook in consumer._after if kept(hook)])}
assert len(hooks[True][0]) > len(hooks[False][0]) and len(hooks[True][1]) > len(hooks[False][1]), hooks
marks.append((time.process_time(), None))
f.consume()
while done[0] < n:
    time.sleep(0.01)
rates = {True: [], False: []}
for (c0, _), (c1, on) in zip(marks, marks[1:]):
    rates[on].append(segment / (c1 - c0))
pairs = [on / off for on, off in zip(rates[True], rates[False])]
print(statistics.median(rates[True]), statistics.median(rates[False]), statistics.median(pairs), len(pairs))
os._exit(0)
"""
_IDLE_CHILD = """
import logging, os, sys, time
from funboost_like import task_deco

@task_deco("ops_bench", broker_kind=sys.argv[1], concurrent_num=50, log_level=logging.WARNING)
def f(x, y):
    return x + y

f.get_message_count()
f.consume()
time.sleep(1.0)
cpu_started, started = time.process_time(), time.perf_counter()
time.sleep(float(sys.argv[2]))
print((time.process_time() - cpu_started) / (time.perf_counter() - started))
os._exit(0)
"""
IDLE_SECONDS = 10.0
INTERLEAVED_N = {"memory": 2_000_000, "sqlite": 400_000}
SEGMENT = {"memory": 20_000, "sqlite": 5_000}


def _child_env(folder: str, on: bool) -> dict[str, str]:
    flag = "1" if on else "0"
    return dict(os.environ, FUNBOOST_LIKE_NO_USER_CONFIG="1", FUNBOOST_LIKE_SQLITE_QUEUES_PATH=folder,
                FUNBOOST_LIKE_STATUS_DB_PATH=folder, FUNBOOST_LIKE_OPS_REGISTRY=flag,
                FUNBOOST_LIKE_OPS_HEARTBEAT_SECONDS="0.5", FUNBOOST_LIKE_METRICS=flag,
                FUNBOOST_LIKE_OPENTELEMETRY_TRACING=flag, FUNBOOST_LIKE_METRICS_DIR=os.path.join(folder, "metrics"),
                PYTHONPATH=str(REPO_ROOT))


def run_interleaved(broker: str, n: int, segment: int) -> tuple[float, float, float, int]:
    with tempfile.TemporaryDirectory() as folder:
        done = subprocess.run([sys.executable, "-c", _INTERLEAVED_CHILD, BROKERS[broker], str(n), str(segment)],
                              env=_child_env(folder, True), capture_output=True, text=True, timeout=1800, check=True)
        on, off, ratio, pairs = done.stdout.strip().splitlines()[-1].split()
        return float(on), float(off), float(ratio), int(pairs)


def idle_cpu(broker: str, on: bool) -> float:
    """The share of a core an idle consumer's process uses: the registry's and metrics' threads, per second."""
    with tempfile.TemporaryDirectory() as folder:
        done = subprocess.run([sys.executable, "-c", _IDLE_CHILD, BROKERS[broker], str(IDLE_SECONDS)],
                              env=_child_env(folder, on), capture_output=True, text=True, timeout=120, check=True)
        return float(done.stdout.strip().splitlines()[-1])


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
    parser.add_argument("--repeat", type=int, default=0, help="runs (default 5; 1 with --interleaved)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--with-metrics", action="store_true", help="on/off also switch METRICS and tracing")
    parser.add_argument("--control", action="store_true",
                        help="'on' runs are 'off' runs too: shows what the alternating runs report for no change")
    parser.add_argument("--interleaved", action="store_true", help="alternate on/off stretches in one process")
    parser.add_argument("--segment", type=int, default=0, help="messages per stretch of --interleaved")
    args = parser.parse_args()
    if args.interleaved:
        for broker in args.brokers.split(","):
            n, segment = args.n or INTERLEAVED_N[broker], args.segment or SEGMENT[broker]
            for _ in range(args.repeat or 1):
                on, off, ratio, pairs = run_interleaved(broker, n, segment)
                print(f"{broker:8} N={n:<8} stretches of {segment:,}: per CPU second, median on {on:10,.0f}  "
                      f"off {off:10,.0f}  on/off {on / off:6.1%}; median of {pairs} neighbouring on/off ratios "
                      f"{ratio:6.1%}", flush=True)
            busy_off, busy_on = idle_cpu(broker, False), idle_cpu(broker, True)
            print(f"{broker:8} idle consumer process, share of a core over {IDLE_SECONDS:.0f} s: off {busy_off:.3%}  "
                  f"on {busy_on:.3%} (the per-second part of the cost, beside the per-message part above)",
                  flush=True)
        return
    results = {}
    for broker in args.brokers.split(","):
        n = args.n or DEFAULT_N[broker]
        rates: dict[str, list[float]] = {"off": [], "on": []}
        cpu_rates: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(args.repeat or 5):
            for setting in ("off", "on"):
                wall, cpu = run_once(broker, n, setting == "on" and not args.control, args.with_metrics)
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
