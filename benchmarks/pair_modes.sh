#!/usr/bin/env bash
# One concurrency mode of two checkouts, in pairs: A then B, N times, then the medians and B's change
# against A. Each run is the benchmarks/peers/modes_workload.py next to this script (ours; the same for
# both, so only the code differs): the consume rate of COUNT messages published first, from consume() until all ran and
# were acked.
# Usage: bash benchmarks/pair_modes.sh CHECKOUT_A CHECKOUT_B BROKER MODE WORK COUNT CONCURRENCY [N=3]
#   BROKER memory|sqlite|redis_ack_able, MODE threading|gevent|eventlet|asyncio|single_thread, WORK trivial|io
# e.g. bash benchmarks/pair_modes.sh /tmp/old . memory gevent trivial 20000 50 3
# (make the other checkout with: git worktree add -f /tmp/old <commit>). redis_ack_able uses
# FUNBOOST_LIKE_BENCH_REDIS_URL (default redis://127.0.0.1:6379/14) and deletes its queue afterwards.
set -euo pipefail
a_root=$1 b_root=$2 broker=$3 mode=$4 work=$5 count=$6 concurrency=$7 n=${8:-3}
python=${PYTHON:-"$(dirname "$0")/../.venv/bin/python"}
script="$(dirname "$0")/peers/modes_workload.py"
redis_url=${FUNBOOST_LIKE_BENCH_REDIS_URL:-redis://127.0.0.1:6379/14}
queue="pair_modes_$$"
rate() {
    local tmp
    tmp=$(mktemp -d)
    FUNBOOST_LIKE_NO_USER_CONFIG=1 PYTHONPATH=$1 "$python" -W ignore "$script" --framework ours --broker "$broker" \
        --mode "$mode" --work "$work" --n "$count" --concurrency "$concurrency" --queue "$queue" \
        --redis-url "$redis_url" --tmp "$tmp" | "$python" -c '
import json, sys
result = json.loads(sys.stdin.read().split("PEER-RESULT ", 1)[1])["results"]["consume"]
print(round(result["rate"]) if result.get("ok_check") else 0)'
    rm -rf "$tmp"
}
a=() b=()
for _ in $(seq "$n"); do a+=("$(rate "$a_root")"); b+=("$(rate "$b_root")"); done
if [[ $broker == redis_ack_able ]]; then
    "$python" -c "import redis, sys; c = redis.Redis.from_url(sys.argv[1]); q = sys.argv[2]
c.delete(q, *c.scan_iter(match='fl:{' + q + '}:*'))" "$redis_url" "$queue"
fi
"$python" - "${a[*]}" "${b[*]}" "$broker $mode $work" <<'PY'
import os, statistics, sys
a, b = ([int(x) for x in arg.split()] for arg in sys.argv[1:3])
ma, mb = statistics.median(a), statistics.median(b)
print(f"{sys.argv[3]}: A median {ma:,.0f}/s {a}; B median {mb:,.0f}/s {b}; B against A: {100 * (mb - ma) / ma:+.1f}%"
      f" (0: a run that failed its check); load {os.getloadavg()[0]:.2f}")
PY
