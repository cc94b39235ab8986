"""Quick start demo on the default broker (embedded SQLite, no server needed).

Publishes a few thousand calls, consumes them with a live progress line, then prints a summary.
Run it with ``bash scripts/demo.sh`` (or ``python test_frame/quick_start/demo.py`` inside the venv).
"""

from __future__ import annotations

import logging
import sys
import time

from funboost_like import task_deco

TOTAL = 5000
results: list[int] = []


@task_deco("quick_start_demo", concurrent_num=50, log_level=logging.WARNING)
def multiply(x: int, y: int) -> int:
    """A stand-in for real work: a 20 ms wait, as for a network call."""
    time.sleep(0.02)
    product = x * y
    results.append(product)
    return product


def main() -> int:
    multiply.clear()
    started = time.perf_counter()
    multiply.publish_many([{"x": i, "y": 2} for i in range(TOTAL // 2)])  # in bulk ...
    for i in range(TOTAL // 2, TOTAL):
        multiply.push(i, y=2)  # ... and one by one
    published = time.perf_counter() - started
    print(f"published {TOTAL} calls in {published:.2f}s ({TOTAL / published:,.0f}/s) "
          f"to queue 'quick_start_demo' on the embedded SQLite broker")

    consume_started = time.perf_counter()
    multiply.consume()
    while len(results) < TOTAL and time.perf_counter() - consume_started < 120:
        done = len(results)
        elapsed = time.perf_counter() - consume_started
        sys.stdout.write(f"\rconsumed {done:5d}/{TOTAL}  {done / elapsed if elapsed else 0:8,.0f} calls/s  "
                         f"waiting in queue: {multiply.get_message_count():5d}  "
                         f"worker threads: {multiply.consumer.worker_count:3d}")
        sys.stdout.flush()
        time.sleep(0.2)
    elapsed = time.perf_counter() - consume_started
    multiply.stop()
    multiply.consumer.join(30)
    ok = sorted(results) == [i * 2 for i in range(TOTAL)]
    stats = multiply.consumer.stats.as_dict()
    print(f"\rconsumed {len(results)}/{TOTAL} in {elapsed:.2f}s ({len(results) / elapsed:,.0f} calls/s); "
          f"succeeded {stats['succeeded']}, failed {stats['failed']}, dead-lettered {stats['dead_lettered']}; "
          f"every result correct: {ok}" + " " * 30)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
