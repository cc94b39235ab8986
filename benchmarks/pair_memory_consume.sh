#!/usr/bin/env bash
# Memory consume throughput of two checkouts, in pairs: A then B, N times, then the medians and B's
# change against A. Both run the benchmark script of the first checkout, so only the code differs.
# Usage: bash benchmarks/pair_memory_consume.sh /path/to/checkout_a /path/to/checkout_b [N=5]
# (make the other checkout with: git worktree add -f /tmp/old <commit>)
set -euo pipefail
a_root=$1 b_root=$2 n=${3:-5}
python=${PYTHON:-"$(dirname "$0")/../.venv/bin/python"}
script="$a_root/benchmarks/throughput.py"
rate() { PYTHONPATH=$1 "$python" "$script" --brokers memory --repeat 1 2>&1 | awk '/consume \(acked\)/ {gsub(",", "", $5); print $5}'; }
source "$(dirname "$0")/pairs.sh"
run_pairs "$a_root" "$b_root" "$n"
