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
source "$(dirname "$0")/pairs.sh"
run_pairs "$a_root" "$b_root" "$n" "$broker $mode $work (0: a run that failed its check)"
if [[ $broker == redis_ack_able ]]; then
    "$python" -c "import redis, sys; c = redis.Redis.from_url(sys.argv[1]); q = sys.argv[2]
c.delete(q, *c.scan_iter(match='fl:{' + q + '}:*'))" "$redis_url" "$queue"
fi
