#!/usr/bin/env bash
# Speed, round three (issue 32), targets 1, 3 and 4 before and after, in ONE call of at most 8 minutes on one H100:
#
#   bash experiments/speed_round3_gpu.sh $OUT            # on the GPU; carry .whl (liger-kernel, torchao) and .nanogpt
#   bash experiments/speed_round3_gpu.sh /tmp/r3 --smoke # on a CPU: every step at toy sizes (numbers mean nothing)
#
# Phase 1 compiles, five processes at once, what phase 2 will time (bench.py --warm_only=True): inductor's on-disk
# caches then make each timed compile take seconds, not a minute. Their timings are thrown away. Phase 2 times one
# part after another, alone on the GPU: decode (target 1: the paths before, eager and torch.compile's graphs, beside
# the new CUDA-graph paths), sample.py itself, nanoGPT's bench.py and gpu_124m's levers (target 3), gpu_1b's levers
# (target 4), then Liger's kernels op by op and torch.optim.Muon against ours. Every part has a time limit and
# bench.py saves each measurement as it comes, so a slow compile costs that part's later measurements, not the run.
# Writes to OUT (at most 8 files): decode.json, sample_py.json, levers.json, gpu_1b.json, kernels.json,
# summary.txt, logs.tar.gz (every log, the warm-up JSONs, the environment).
set -u
OUT=${1:?usage: bash experiments/speed_round3_gpu.sh OUT_DIR [--smoke]}
SMOKE=${2:-}
TOTAL=${SPEED_ROUND3_SECONDS:-455}   # the whole run, kept under the call's 8 minutes (limits end 5 s late at most)
WARM_SECONDS=${SPEED_ROUND3_WARM_SECONDS:-135}
START=$SECONDS
mkdir -p "$OUT/logs" "$OUT/warm"
cd "$(dirname "$0")/.."

export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/ulm_inductor_cache}
export TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1
PY=${PYTHON:-python3}

if [ -z "$SMOKE" ] && ls .whl/*.whl >/dev/null 2>&1; then  # liger-kernel and torchao: the GPU machine has neither
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

if [ -n "$SMOKE" ]; then
    COMMON=(--smoke=True --device=cpu --out_dir=/tmp/speed_round3_runs)
    DECODE_MODES=eager,graph
    LEVERS=default,liger_ce,bf16_residual
    LEVERS_WARM_A=default; LEVERS_WARM_B=liger_ce
    LEVERS_1B=blocks,budget
    NANOGPT=""
else
    COMMON=(--out_dir=/tmp/speed_round3_runs)
    DECODE_MODES=eager,graph,compiled,graph_compiled,graph_compiled_cdt
    LEVERS=default,liger_ce,sdpa_flash,sdpa_cudnn,fp8_rowwise,batch32_bf16_residual
    LEVERS_WARM_A=default,sdpa_flash,sdpa_cudnn; LEVERS_WARM_B=liger_ce,fp8_rowwise,batch32_bf16_residual
    LEVERS_1B=blocks,budget,batch4_no_ckpt,fp8,fp8_budget
    NANOGPT=$( [ -f .nanogpt/bench.py ] && echo .nanogpt || echo "" )
fi
GPU_1B=(--parts=gpu_1b --levers_1b=$LEVERS_1B --gpu_1b_accum=16)

left() { echo $(( TOTAL - (SECONDS - START) )); }

# part NAME SECONDS ARGS...: bench.py under a time limit (no more than what the run has left), its log kept
part() {
    local name=$1 limit=$2; shift 2
    local rest; rest=$(left)
    [ "$limit" -gt "$rest" ] && limit=$rest
    if [ "$limit" -lt 10 ]; then echo "== $name: skipped, $rest s left" | tee -a "$OUT/logs/parts.txt"; return; fi
    echo "== $name (limit ${limit}s, $(( SECONDS - START ))s in)" | tee -a "$OUT/logs/parts.txt"
    timeout -k 5 "$limit" $PY bench.py --suite=gpu "${COMMON[@]}" "$@" >"$OUT/logs/$name.log" 2>&1
    echo "   $name: exit $? after $(( SECONDS - START ))s" | tee -a "$OUT/logs/parts.txt"
    tail -n 25 "$OUT/logs/$name.log"
}

{ nvidia-smi 2>&1 | head -15; $PY - <<'EOF'
import importlib, torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", gpu)
print("torch.optim.Muon:", hasattr(torch.optim, "Muon"))
for name in ("liger_kernel", "torchao", "triton"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "(no __version__)"))
    except Exception as e:
        print(name, "MISSING:", type(e).__name__, e)
EOF
} >"$OUT/logs/environment.txt" 2>&1
cat "$OUT/logs/environment.txt"

# ----------------------------------------------------------------------------- phase 1: compile, in parallel
echo "== phase 1: warming inductor's caches, ${WARM_SECONDS}s at most ($(( SECONDS - START ))s in)" | tee -a "$OUT/logs/parts.txt"
WARM_END=$(( SECONDS + WARM_SECONDS ))
warm() {  # warm NAME ARGS...: a background bench.py --warm_only=True, stopped at the end of phase 1
    local name=$1; shift
    (TORCHINDUCTOR_COMPILE_THREADS=4 timeout -k 5 $(( WARM_END - SECONDS )) $PY bench.py --suite=gpu "${COMMON[@]}" --warm_only=True \
        --out="$OUT/warm/$name.json" "$@" >"$OUT/logs/warm_$name.log" 2>&1; echo "   warm $name: exit $?" >>"$OUT/logs/parts.txt") &
}
warm gpu_1b "${GPU_1B[@]}"                                          # <= 30 GB
warm decode --parts=decode --decode_modes=$DECODE_MODES             # ~2 GB
warm levers_a --parts=levers --levers=$LEVERS_WARM_A                 # ~10 GB
warm levers_b --parts=levers --levers=$LEVERS_WARM_B                # <= 23 GB
if [ -n "$NANOGPT" ]; then  # nanoGPT's own compile, its number thrown away; then the kernels' compiles
    (cd "$NANOGPT" && TORCHINDUCTOR_COMPILE_THREADS=4 timeout -k 5 $(( WARM_END - SECONDS )) $PY bench.py --real_data=False \
        --compile=True >"$OUT/logs/warm_nanogpt.log" 2>&1; echo "   warm nanogpt: exit $?" >>"$OUT/logs/parts.txt"
     cd - >/dev/null; TORCHINDUCTOR_COMPILE_THREADS=4 timeout -k 5 $(( WARM_END - SECONDS > 1 ? WARM_END - SECONDS : 1 )) $PY bench.py \
        --suite=gpu "${COMMON[@]}" --warm_only=True --parts=kernels --out="$OUT/warm/kernels.json" >"$OUT/logs/warm_kernels.log" 2>&1) &
fi
wait
echo "   phase 1 done at $(( SECONDS - START ))s" | tee -a "$OUT/logs/parts.txt"

# ----------------------------------------------------------------------------- phase 2: timed, one at a time
part decode 110 --parts=decode --decode_modes=$DECODE_MODES --new_tokens=512 --out="$OUT/decode.json"
part sample_py 30 --parts=sample_py --sample_rounds=1 --new_tokens=512 --out="$OUT/sample_py.json"
NANO_PART=$( [ -n "$NANOGPT" ] && echo "nanogpt," || echo "" )
part levers 130 --parts=${NANO_PART}levers --nanogpt="$NANOGPT" --levers=$LEVERS --steps=2 --out="$OUT/levers.json"
part gpu_1b 75 "${GPU_1B[@]}" --out="$OUT/gpu_1b.json"
part kernels 40 --parts=kernels,muon --out="$OUT/kernels.json"

# ----------------------------------------------------------------------------- summary and logs
$PY - "$OUT" >"$OUT/summary.txt" 2>&1 <<'EOF'
import json, os, sys
out = sys.argv[1]
for name in ("decode", "sample_py", "levers", "gpu_1b", "kernels"):
    path = os.path.join(out, f"{name}.json")
    if not os.path.exists(path):
        print(f"{name}: no JSON (the part did not start)")
        continue
    report = json.load(open(path))
    env = report["environment"]
    print(f"## {name}  ({env.get('gpu', env['device'])}, torch {env['torch']}, commit {env.get('git_commit')}, {env['date']})")
    for key, r in report["results"].items():
        if not isinstance(r, dict):
            print(f"  {key}: {r}")
        elif "error" in r:
            print(f"  {key}: FAILED {r['error'].splitlines()[0][:150]}")
        else:
            keep = ("tokens_per_s", "first_call_s", "same_tokens_as_first_mode", "same_64_tokens_as_first_mode", "warnings",
                    "kernels_per_token", "gpu_busy_ms_per_token", "wall_ms_per_token", "mfu", "peak_memory_gb",
                    "ratio_to_default", "ratio_to_nanogpt", "ratio_to_first", "first_step_s", "loss", "attention_kernels",
                    "ms_fwd_bwd", "loss_rel_error", "grad_rel_errors", "ms_per_iteration", "first_sample_tokens_per_s",
                    "torch_has_muon", "max_update_rel_difference", "ours_step_ms", "torch_step_ms")
            print(f"  {key}: " + json.dumps({k: r[k] for k in keep if k in r}, default=str)[:400])
EOF
cat "$OUT/summary.txt"
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs warm && rm -rf "$OUT/logs" "$OUT/warm"
echo "done in $(( SECONDS - START ))s"
