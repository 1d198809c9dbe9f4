#!/usr/bin/env bash
# The GPU check, one command, from the repository root: at most 11 min 10 s on one H100/H200 if every
# part ran to its timeout (parts a-e 9 min 40 s, part f 90 s: over a device call's 10 min, so when
# the others run long, part f, last, is the one cut; GPU_CHECK_PARTS=served runs it in a call of its own):
#
#   bash bench/gpu_check.sh              # on the GPU machine (carry .whl/: see shared/device/make-wheels.sh)
#   bash bench/gpu_check.sh --cpu-smoke  # anywhere: every part at tiny sizes on CPU (the plumbing, not the GPU)
#   GPU_CHECK_PARTS="vocab served" bash bench/gpu_check.sh   # only these parts (names below; setup always runs)
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
#   f  the served teacher (bench/served_teacher.py --device cuda, 90 s): 4 concurrent trials, 3 batches
#      each, of a teacher sized to 30% of the GPU's memory (a tiled-random bf16 Llama 5120 wide, ~24 GiB
#      on an H100), which 4 trials could not each hold; one TeacherServer serves them. Rows: the run
#      completes (served step time, server occupancy: requests per teacher forward), peak GPU memory
#      (max_memory_allocated of each trial and of the server, summed) against the GPU's total, beside
#      the 4 own copies' weights (computed, not run: they do not fit). UNMEASURED ON A GPU SO FAR:
#      written and smoke-tested on a CPU only; writing the teacher (~24 GB of safetensors) and loading
#      it are most of its 90 s, a guess (on an H200 the teacher is ~42 GiB: raise GPU_CHECK_TIMEOUT_SERVED).
# Parts by name: setup, step_eager, step_compiled (a, b), search (c), pytest (d), vocab (e), served (f).
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
    served_args=(--device cpu --teacher-hidden 64 --teacher-layers 2 --teacher-weights tiled --steps 2 --trials 2
                 --on-policy-examples 0)
    declare -A limit=([setup]=30 [step_eager]=60 [step_compiled]=240 [search]=240 [pytest]=120 [vocab]=120
                      [served]=180)
else              # the seed's sizes are step_throughput.py's defaults
    step_args=()
    search_args=(--num-samples 4 --epochs 1 --goal 4)
    vocab_args=(--device cuda)
    served_args=(--device cuda --teacher-hidden 5120 --teacher-gpu-share 0.3 --steps 3 --trials 4 --on-policy-examples 0)
    declare -A limit=([setup]=45 [step_eager]=75 [step_compiled]=150 [search]=150 [pytest]=100 [vocab]=60
                      [served]=90)
fi

# part NAME COMMAND...: COMMAND under NAME's timeout; a timeout or a failure becomes a result line.
# With GPU_CHECK_PARTS set, only the parts it names run (and setup).
part() {
    local name=$1 override="GPU_CHECK_TIMEOUT_${1^^}"; shift
    [[ -n ${GPU_CHECK_PARTS:-} && $name != setup && " $GPU_CHECK_PARTS " != *" $name "* ]] && return
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
    part served python3 bench/served_teacher.py "${served_args[@]}" --result-lines
} 2>&1 | tee "$log" | python3 bench/gpu_check_table.py
