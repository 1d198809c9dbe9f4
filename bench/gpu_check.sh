#!/usr/bin/env bash
# The GPU check, one command, at most 9 min 40 s on one H100/H200, from the repository root:
#
#   bash bench/gpu_check.sh              # on the GPU machine (carry .whl/: see shared/device/make-wheels.sh)
#   bash bench/gpu_check.sh --cpu-smoke  # anywhere: every part at tiny sizes on CPU (the plumbing, not the GPU)
#
# Prints ONE table (bench/gpu_check_table.py), each row as soon as its figure exists:
#   a  the step at the seed's sizes (student 512x8, teacher 768x16, vocab 6400, batch 32, lengths
#      U[128, 512]): seed vs tune_kd, compile off, then compile on in a process of its own
#      (compile seconds apart from the steady figures), with MFU and peak GiB
#   b  the cached-teacher step against the live one (in both processes)
#   c  the embedded default's search, gpu_per_trial auto, 4 trials: the share auto picked, trials
#      at once, each trial's real peak GPU memory against the probe's figure
#   d  pytest -m gpu
#   e  the fused output layer against materialised logits at V = 151,936 and 128,256 (bench/vocab_memory.py)
# Each part runs under its own `timeout` (GPU_CHECK_TIMEOUT_<PART>=seconds overrides it), so a stall
# costs its own row ("timed out after N s"), never the rest. Every line the parts print goes to the
# log (under $OUT when set, so a device run brings it back; else results/gpu_check/).
set -uo pipefail
cd "$(dirname "$0")/.."

smoke=false
[[ ${1:-} == --cpu-smoke || ${GPU_CHECK_CPU_SMOKE:-0} == 1 ]] && smoke=true
log_dir=${OUT:-results/gpu_check}
mkdir -p "$log_dir"
log="$log_dir/gpu_check-$(date +%Y%m%d-%H%M%S).log"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/results/gpu_check/inductor}

if $smoke; then   # seconds-long sizes; the compile part still compiles for real (inductor on CPU)
    step_args=(--device cpu --dtype float32 --student 32,1,2,2 --teacher 32,1,2,2 --vocab 100 --batch 8
               --min-len 16 --max-len 48 --steps 3 --warmup 2)
    search_args=(--smoke --num-samples 2 --goal 2)
    vocab_args=(--device cpu --positions 256 --vocab 32000 --steps 1)
    declare -A limit=([setup]=30 [step_eager]=60 [step_compiled]=240 [search]=240 [pytest]=120 [vocab]=120)
else              # the seed's sizes are step_throughput.py's defaults
    step_args=()
    search_args=(--num-samples 4 --epochs 1 --goal 4)
    vocab_args=(--device cuda)
    declare -A limit=([setup]=45 [step_eager]=75 [step_compiled]=150 [search]=150 [pytest]=100 [vocab]=60)
fi

# part NAME COMMAND...: COMMAND under NAME's timeout; a timeout or a failure becomes a result line.
part() {
    local name=$1 override="GPU_CHECK_TIMEOUT_${1^^}"; shift
    local seconds=${!override:-${limit[$name]}}
    timeout --kill-after=3 "$seconds" "$@"
    local rc=$?
    if (( rc == 124 || rc == 137 )); then
        echo "@result {\"part\": \"$name\", \"timed_out_s\": $seconds}"
    elif (( rc != 0 )); then
        echo "@result {\"part\": \"$name\", \"exit_code\": $rc}"
    fi
}

# The GPU image has torch + CUDA but not Ray, Optuna and their needs: install the carried wheels
# as shared/device/make-wheels.sh's header says.
install_wheels() {
    if python3 -c "import ray, optuna" 2>/dev/null; then
        echo '@result {"part": "setup", "note": "ray and optuna already importable"}'
    elif compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl &&
            echo "@result {\"part\": \"setup\", \"note\": \"installed $(ls .whl/*.whl | wc -l) wheels from .whl/ into /tmp/site\"}"
    else
        echo '@result {"part": "setup", "note": "no ray/optuna and no .whl/: part c will fail (run shared/device/make-wheels.sh, carry .whl)"}'
    fi
}
export -f install_wheels   # so that `timeout` can run it
[[ -d .whl ]] && export PYTHONPATH="$PYTHONPATH:/tmp/site"   # after the repository: tune_kd is this tree's

{
    echo "@result {\"part\": \"setup\", \"note\": \"$($smoke && echo 'CPU smoke: tiny sizes' || echo 'GPU: the seed sizes'); log $log\"}"
    part setup bash -c install_wheels
    part step_eager python3 bench/step_throughput.py "${step_args[@]}" --compile off --result-lines
    part step_compiled python3 bench/step_throughput.py "${step_args[@]}" --compile on --variants tune_kd,cached \
        --result-lines
    part search python3 bench/gpu_search.py "${search_args[@]}" --result-lines
    part pytest python3 -m pytest -m gpu -p no:cacheprovider
    part vocab python3 bench/vocab_memory.py "${vocab_args[@]}" --result-lines
} 2>&1 | tee "$log" | python3 bench/gpu_check_table.py
