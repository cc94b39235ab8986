#!/usr/bin/env bash
# PULSAR consume throughput of two checkouts, in pairs: A then B, N times, then the medians and B's
# change against A. Both run this checkout's benchmark script, so only the package differs;
# the server is the one at FUNBOOST_LIKE_BENCH_PULSAR_URL (else a pulsar-lite started per run).
# Usage: bash benchmarks/pair_pulsar_consume.sh /path/to/checkout_a /path/to/checkout_b [N=3] [MESSAGES=10000]
# (make the other checkout with: git worktree add -f /tmp/old <commit>)
set -euo pipefail
a_root=$1 b_root=$2 n=${3:-3} messages=${4:-10000}
python=${PYTHON:-"$(dirname "$0")/../.venv/bin/python"}
script="$(dirname "$0")/pulsar_throughput.py"
rate() {
    PYTHONPATH=$1 "$python" "$script" --paths consume --n "$messages" --repeat 1 2>&1 |
        awk '/consume \(acked\)/ {gsub(",", "", $6); sub("/s", "", $6); print $6}'
}
source "$(dirname "$0")/pairs.sh"
run_pairs "$a_root" "$b_root" "$n"
