"""A process that pushes 20,200 calls to the memory broker: run it under callgrind to count the instructions
of the publish path without the machine's noise (start-up included, the same for two checkouts).

    PYTHONPATH=<checkout> valgrind --tool=callgrind python benchmarks/push_instructions.py
"""

from __future__ import annotations

import sys
import time

from funboost_like import BrokerEnum, task_deco


@task_deco("push_instructions", broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, log_level=30)
def f(x: int, y: int) -> int:
    return x + y


if __name__ == "__main__":
    for i in range(200):  # warm up
        f.push(i, i)
    started = time.perf_counter()
    for i in range(20_000):
        f.push(i, i)
    print(f"{20_000 / (time.perf_counter() - started):,.0f} pushes/s", file=sys.stderr)
