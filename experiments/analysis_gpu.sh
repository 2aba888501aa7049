#!/usr/bin/env bash
# Issue 12's three experiments at GPU size on one H100, side by side in about 8 minutes: input noise on
# shakespeare_char (config/shakespeare_char_best.py, the baby GPT), reason vs knowledge (3 sizes + a
# fixed-world model), knowledge capacity (dense / PKM / kNN at 3 sizes). Each is small enough to leave
# most of the GPU idle, so they run at once, each training its models in several processes.
#
#   bash experiments/analysis_gpu.sh OUT            # the GPU run
#   bash experiments/analysis_gpu.sh OUT cpu        # the same plumbing at toy sizes on a CPU (~3 min)
#
# OUT receives 7 files: input_noise, reason_vs_knowledge and knowledge_capacity (.json + .png each) and
# analysis_gpu.log. Run folders (checkpoints) stay under out/analysis_gpu. Every experiment has a time
# limit and writes its JSON after each model, so a run cut short still returns what finished.
set -uo pipefail
out=${1:?usage: bash experiments/analysis_gpu.sh OUT [gpu|cpu]}
size=${2:-gpu}
python=${PYTHON:-python}
work=out/analysis_gpu
rm -rf "$work"  # this driver's own folder: a stale result must never be returned as this run's
mkdir -p "$out" "$work"
# ~22 processes share 16 cores: no intra-op thread pool each, and 9 torch.compile runs without 16 workers each
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-2}
deadline=$((SECONDS + ${LIMIT:-540}))  # seconds until every experiment is stopped (the device allows 600)

if [ "$size" = gpu ]; then
    # 3 at a time: 9 at once beside the other two experiments ran out of GPU memory (EXPERIMENTS.md)
    noise=(--device=cuda --workers=3 --train_config=config/shakespeare_char_best.py --max_iters=1500 --eval_iters=100 --evals=6)
    reason=(--device=cuda --workers=4 --steps=8000 --batch_size=128 --learning_rate=2e-3 --eval_docs=1000 --curve_every=500
            "--sizes=[[2, 2, 64], [2, 4, 128], [4, 4, 256]]")
    capacity=(--device=cuda --workers=9 --n_people=2000 --steps=6000 --batch_size=256 --learning_rate=3e-3
              "--sizes=[[1, 2, 32], [2, 2, 32], [2, 4, 64]]" --memory_slots=65536 --memory_key_dim=64
              --memory_topk=16 --knn_capacity=65536 --speed_warmup=20 --speed_steps=50)
elif [ "$size" = cpu ]; then
    noise=(--device=cpu --workers=2 --max_iters=20 --eval_iters=2 "--runs={'none': {}, 'mix': {'mask': 0.05, 'keyboard': 0.02}}"
           "--overrides=['--n_layer=1', '--n_head=2', '--n_embd=32', '--compile=False']")
    reason=(--device=cpu --workers=2 --steps=20 --batch_size=8 --eval_docs=16 --curve_every=10 "--sizes=[[1, 2, 16], [2, 2, 32]]")
    capacity=(--device=cpu --workers=2 --n_people=50 --steps=20 --batch_size=16 "--sizes=[[1, 2, 16]]"
              --profile_steps=1 --speed_warmup=2 --speed_steps=3)
else
    echo "size must be gpu or cpu, got $size" >&2
    exit 2
fi

"$python" prepare.py --dataset=shakespeare_char > "$work/prepare.log" 2>&1 || { cat "$work/prepare.log"; exit 1; }

# each experiment in its own process group (setsid), so the time limit stops its worker processes too
start() {  # start NAME ARGS...: experiments/NAME.py ARGS --out=$work/NAME, logged to $work/NAME.log
    local name=$1; shift
    setsid "$python" "experiments/$name.py" "$@" --out="$work/$name" > "$work/$name.log" 2>&1 &
    pids+=($!)
}
pids=()
# knowledge capacity measures each model's tokens/s alone first; the others start once those are written
start knowledge_capacity "${capacity[@]}"
while [ ! -f "$work/knowledge_capacity/knowledge_capacity.json" ] && kill -0 "${pids[0]}" 2>/dev/null; do sleep 1; done
start input_noise "${noise[@]}"
start reason_vs_knowledge "${reason[@]}"
setsid bash -c "sleep $((deadline - SECONDS)); kill -TERM -- ${pids[*]/#/-}" > /dev/null 2>&1 &
watchdog=$!
wait "${pids[@]}"
kill -- "-$watchdog" 2>/dev/null

for name in input_noise reason_vs_knowledge knowledge_capacity; do
    cp -f "$work/$name/$name.json" "$work/$name/$name.png" "$out/" 2>/dev/null
    { echo "===== $name"; grep -v "it/s\]$" "$work/$name.log" | tail -n 200; } >> "$out/analysis_gpu.log"
done
ls -l "$out"
