#!/usr/bin/env bash
# Runs the thinking.py runs a sweep file lists, all at once (one GPU is shared: these small models are
# launch-bound, so several in parallel use it better than one), then packs the results into one archive.
#   bash experiments/thinking_sweep.sh experiments/sweeps/thinking_gpu_1.txt out/sweep1 [archive.tgz]
# (PYTHON names the interpreter, python3 by default; JOBS caps the runs at once, all by default)
# Each line of the sweep file: a run name, then thinking.py's arguments. Lines starting with # are skipped.
set -u
sweep=$1 out=$2 archive=${3:-}
mkdir -p "$out"
while read -r name args; do
    case "$name" in ''|'#'*) continue ;; esac
    while [ "$(jobs -rp | wc -l)" -ge "${JOBS:-1000}" ]; do sleep 2; done  # JOBS: at most that many at once
    # shellcheck disable=SC2086  # the arguments are words on purpose
    OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 "${PYTHON:-python3}" experiments/thinking.py $args --out_dir="$out/$name" > "$out/$name.log" 2>&1 &
done < "$sweep"
wait
for log in "$out"/*.log; do echo "== $log"; grep -E "parameters|difficulty|out of time|Error|error" "$log" | tail -14; done
# the archive holds the JSON, PNG and logs (the models stay behind: they are large, and a rerun makes them)
if [ -n "$archive" ]; then tar czf "$archive" --exclude="*.pt" -C "$(dirname "$out")" "$(basename "$out")"; fi
