"""The cost of the SQLACHEMY broker's bound on a silent PostgreSQL server (``read_timeout``, see
``funboost_like/brokers/sql_psycopg.py``): ``SELECT 1`` round trips on two psycopg connections to the same
server, one bounded (60 s, the default) and one not (0), in alternating rounds.

Usage::

    python benchmarks/pg_read_bound.py [--url postgresql://postgres@127.0.0.1:5432/test] [--n 5000] [--rounds 8]

Prints, for each, the median microseconds per statement of this process's CPU time (what the bound adds
to; the round trip's wall time on a shared machine varies far more) and of wall time. A measurement, not
a test.
"""

from __future__ import annotations

import argparse
import statistics
import time

from funboost_like.brokers import sql_psycopg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    connections = {name: sql_psycopg.connect(args.url, read_timeout=bound, autocommit=True)
                   for name, bound in (("bounded", 60), ("unbounded", 0))}
    micros: dict[str, list[float]] = {name: [] for name in connections}
    walls: dict[str, list[float]] = {name: [] for name in connections}
    for number in range(args.rounds):
        for name in ("bounded", "unbounded") if number % 2 == 0 else ("unbounded", "bounded"):
            connection = connections[name]
            started, cpu = time.perf_counter(), time.process_time()
            for _ in range(args.n):
                connection.execute("SELECT 1")
            micros[name].append((time.process_time() - cpu) / args.n * 1e6)
            walls[name].append((time.perf_counter() - started) / args.n * 1e6)
    for name, values in micros.items():
        print(f"{name}: median {statistics.median(values):.1f} us of CPU per SELECT 1 (rounds:",
              " ".join(f"{value:.1f}" for value in values) + f"), {statistics.median(walls[name]):.1f} us of wall time")
    for connection in connections.values():
        connection.close()


if __name__ == "__main__":
    main()
