"""What PULSAR ``count`` reads on a large backlog, and how long it takes.

Usage::

    python benchmarks/pulsar_count.py [--n 50000] [--repeat 2] [--busy 0]

On the server at ``FUNBOOST_LIKE_BENCH_PULSAR_URL`` (default ``pulsar://127.0.0.1:6650``; start a
pulsar-lite there first, ``tests/pulsar_server.py``). Each run publishes ``--n`` messages to a new
queue, counts it once and purges it. ``--busy K`` runs K
busy-looping processes meanwhile, the heavy load under which a count once read 48,300 of 50,000.
A measurement, not a test: exit code 0.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
import uuid
from pathlib import Path

# After the PYTHONPATH entries, so PYTHONPATH=/another/checkout measures that checkout's package.
sys.path.insert(1 + len([p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
                str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("FUNBOOST_LIKE_NO_USER_CONFIG", "1")

from funboost_like.brokers.pulsar_broker import PulsarBroker  # noqa: E402
from funboost_like.core.config import patch_frame_config  # noqa: E402

URL = os.environ.get("FUNBOOST_LIKE_BENCH_PULSAR_URL", "pulsar://127.0.0.1:6650")


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--busy", type=int, default=0)
    args = parser.parse_args()
    patch_frame_config(PULSAR_URL=URL)
    for _ in range(args.repeat):
        broker = PulsarBroker()
        queue = f"bench_pulsar_count_{uuid.uuid4().hex[:10]}"
        try:
            for start in range(0, args.n, 10_000):
                broker.publish_many(queue, [b"{}"] * min(10_000, args.n - start))
            spinners = [multiprocessing.Process(target=_spin, args=(120.0,), daemon=True) for _ in range(args.busy)]
            for spinner in spinners:
                spinner.start()
            try:
                started = time.monotonic()
                counted = broker.count(queue)
                took = time.monotonic() - started
            finally:
                for spinner in spinners:
                    spinner.kill()
                    spinner.join()
            print(f"published {args.n}, count {counted} in {took:.1f} s (busy processes: {args.busy})", flush=True)
            broker.purge(queue)
        finally:
            broker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
