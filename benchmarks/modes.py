"""Concurrency modes: time to complete 2,000 calls that each wait 1 s, with concurrent_num=500.

Each mode runs in a fresh subprocess on the memory broker: threading and the greenlet modes wait with
``time.sleep`` (patched into a cooperative sleep for gevent/eventlet), asyncio with ``asyncio.sleep``.
The ideal is 2,000 / 500 x 1 s = 4 s.

    python benchmarks/modes.py [--calls 2000] [--concurrency 500] [--modes threading,gevent,eventlet,asyncio]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = """
{patch}
import asyncio, json, sys, time
from funboost_like import BrokerEnum, ConcurrentModeEnum, task_deco
from funboost_like.brokers.registry import get_broker

done = []
{definition}

wait.publish_many([{{"x": i}} for i in range({calls})])
started = time.perf_counter()
wait.consume()
get_broker(BrokerEnum.LOCAL_PYTHON_QUEUE).join("modes_bench", timeout=600)
elapsed = time.perf_counter() - started
print(json.dumps({{"elapsed": elapsed, "done": len(done), "workers": wait.consumer.worker_count}}))
wait.stop()
"""

SYNC = """
@task_deco("modes_bench", broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, concurrent_mode=ConcurrentModeEnum.{mode},
           concurrent_num={concurrency}, log_level=30)
def wait(x):
    time.sleep(1)
    done.append(x)
"""

ASYNC = """
@task_deco("modes_bench", broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, concurrent_mode=ConcurrentModeEnum.ASYNC,
           concurrent_num={concurrency}, log_level=30)
async def wait(x):
    await asyncio.sleep(1)
    done.append(x)
"""

MODES = {
    "threading": ("", SYNC, "THREADING"),
    "gevent": ("from gevent import monkey; monkey.patch_all()", SYNC, "GEVENT"),
    "eventlet": ("import eventlet; eventlet.monkey_patch()", SYNC, "EVENTLET"),
    "asyncio": ("", ASYNC, "ASYNC"),
}


def run(mode: str, calls: int, concurrency: int) -> dict[str, float] | str:
    patch, definition, enum_name = MODES[mode]
    code = CHILD.format(patch=patch, calls=calls,
                        definition=definition.format(mode=enum_name, concurrency=concurrency))
    env = dict(os.environ, PYTHONPATH=str(REPO), FUNBOOST_LIKE_NO_USER_CONFIG="1")
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env,
                          timeout=900)
    if proc.returncode != 0:
        return f"failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"
    import json

    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=500)
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args()
    ideal = args.calls / args.concurrency
    print(f"{args.calls} calls of a 1 s wait, concurrent_num={args.concurrency}; ideal {ideal:.1f} s")
    print(f"date {time.strftime('%Y-%m-%dT%H:%M:%S')}  Python {sys.version.split()[0]}  CPUs {os.cpu_count()}  "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"{'mode':10s} {'seconds':>8s} {'calls':>6s} {'overhead':>9s}")
    for mode in args.modes.split(","):
        result = run(mode, args.calls, args.concurrency)
        if isinstance(result, str):
            print(f"{mode:10s} {result}")
            continue
        print(f"{mode:10s} {result['elapsed']:8.2f} {int(result['done']):6d} {result['elapsed'] / ideal - 1:9.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
