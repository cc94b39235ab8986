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
a=() b=()
for _ in $(seq "$n"); do a+=("$(rate "$a_root")"); b+=("$(rate "$b_root")"); done
"$python" - "${a[*]}" "${b[*]}" <<'PY'
import statistics, sys
a, b = ([int(x) for x in arg.split()] for arg in sys.argv[1:3])
ma, mb = statistics.median(a), statistics.median(b)
print(f"A median {ma:,.0f}/s {a}\nB median {mb:,.0f}/s {b}\nB against A: {100 * (mb - ma) / ma:+.1f}%")
PY
