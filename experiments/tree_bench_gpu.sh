#!/usr/bin/env bash
# Is the default gpu_124m training step as fast after a refactor as before (issue 26)? bench.py's train part in
# the tree before (a copy at BEFORE) and this tree, in turn A B B A on one GPU, each under a time limit; the
# inductor cache is shared, so a tree's second run compiles from cache. Ratios come from the JSONs it writes.
#
#   mkdir .before && git archive bb63247 | tar -x -C .before     # here; carry .before to the GPU machine
#   bash experiments/tree_bench_gpu.sh OUT_DIR [BEFORE] [SECONDS]
set -u
OUT=${1:?usage: bash experiments/tree_bench_gpu.sh OUT_DIR [BEFORE] [SECONDS]}
BEFORE=$(cd "${2:-.before}" && pwd)
TOTAL=${3:-170}
AFTER=$(cd "$(dirname "$0")/.." && pwd)
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/ulm_inductor_cache}
mkdir -p "$OUT"
START=$SECONDS
for run in before_1 after_1 after_2 before_2; do
    tree=$BEFORE; [ "${run%_*}" = after ] && tree=$AFTER
    left=$(( TOTAL - (SECONDS - START) ))
    [ "$left" -lt 15 ] && { echo "$run: skipped, ${left}s left"; continue; }
    (cd "$tree" && timeout -k 5 "$left" python3 bench.py --suite=gpu --parts=train --steps=3 \
        --out="$OUT/$run.json" >"$OUT/$run.log" 2>&1)
    echo "$run: exit $? at $(( SECONDS - START ))s"
done
python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
rate = {}
for run in ("before_1", "after_1", "after_2", "before_2"):
    path = os.path.join(out, f"{run}.json")
    if os.path.exists(path):
        r = json.load(open(path))["results"].get("gpu_124m", {})
        rate[run] = r.get("tokens_per_s")
        print(run, {k: r.get(k) for k in ("tokens_per_s", "mfu", "peak_memory_gb", "error")})
b = [v for k, v in rate.items() if k.startswith("before") and v]
a = [v for k, v in rate.items() if k.startswith("after") and v]
if a and b:
    print(f"after / before tokens/s: {sum(a) / len(a) / (sum(b) / len(b)):.3f} (runs: {rate})")
PY
