# Sourced by the pair_*.sh scripts: run_pairs A_ROOT B_ROOT N [LABEL] calls the caller's `rate ROOT`
# (one run of one checkout, printing its rate as a whole number) for A then B, N times, then prints
# both medians and B's change against A.
run_pairs() {
    local a_root=$1 b_root=$2 n=$3 label=${4:-}
    local a=() b=()
    for _ in $(seq "$n"); do a+=("$(rate "$a_root")"); b+=("$(rate "$b_root")"); done
    "$python" - "${a[*]}" "${b[*]}" "$label" <<'PY'
import os, statistics, sys
a, b = ([int(x) for x in arg.split()] for arg in sys.argv[1:3])
ma, mb = statistics.median(a), statistics.median(b)
label = f"{sys.argv[3]}: " if sys.argv[3] else ""
print(f"{label}A median {ma:,.0f}/s {a}\n{label}B median {mb:,.0f}/s {b}\n{label}B against A: "
      f"{100 * (mb - ma) / ma:+.1f}% (load {os.getloadavg()[0]:.2f})")
PY
}
