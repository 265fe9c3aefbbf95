#!/usr/bin/env bash
# The first call on a lent GPU: one device run of at most 9 minutes that gives results, not a traceback.
#
#   1. scripts/gpu/check_env.py: the carried wheels and the image's packages fit attnmt, CUDA works
#      (seconds; the call stops here, saying what to carry, when they do not);
#   2. tests/test_cuda.py (-m gpu): fp16 with resume, bf16 with torch.compile (TORCH_LOGS=recompiles),
#      the flash kernel forced on the decoder, fused AdamW under the loss scaler, a CPU checkpoint
#      resumed on the GPU and back (about 90 s);
#   3. Multi30k de->en: scripts/gpu/multi30k.sh for one direction, training cut by train.max_hours,
#      then test2016 with beam 5;
#   4. scripts/bench_train.py: throughput of model=base against HF Marian, bf16, no compilation, in the
#      time that is left.
#
# Each step has a time limit within BUDGET_S, and a step that fails does not stop the next (the first
# excepted). Everything printed goes to $OUT/console.log from the first line, and each result file into
# $OUT as soon as it exists, so a call killed at its limit still brings back what it finished:
# console.log, env.txt, cuda_tests.xml, de_en.train.log, de_en.eval.jsonl, de_en.test2016.hyp,
# summary.md, throughput.md (the 8 files a call may bring back).
#
#   bash scripts/gpu/first_call.sh           the device call (docs/BENCHMARKS.md, "The device calls")
#   QUICK=1 bash scripts/gpu/first_call.sh   its rehearsal on a CPU: the same steps at tiny sizes
#
# Environment (all optional): OUT (runs/gpu-first-call; $OUT on the device), MULTI30K
# (.gpudata/multi30k), WORK (/tmp/attnmt-first-call), BUDGET_S (510: the seconds the four steps may
# take together), PYTHON (python3), QUICK (0).
set -uo pipefail
cd "$(dirname "$0")/../.."

OUT=${OUT:-runs/gpu-first-call}
MULTI30K=${MULTI30K:-.gpudata/multi30k}
WORK=${WORK:-/tmp/attnmt-first-call}
BUDGET_S=${BUDGET_S:-510}
PYTHON=${PYTHON:-python3}
QUICK=${QUICK:-0}
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/console.log") 2>&1
tee_pid=$!
export PYTHONUNBUFFERED=1
started=$(date +%s)
echo "first_call.sh: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(hostname), QUICK=$QUICK, BUDGET_S=$BUDGET_S, git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

failed=()  # the steps that did not end with exit status 0
finish() {
  echo "first_call.sh: done after $(( $(date +%s) - started )) s${failed[*]:+; not passed: ${failed[*]}}; in $OUT:" \
       "$(cd "$OUT" && ls | tr '\n' ' ')"
  exec 1>&- 2>&-
  wait "$tee_pid"
}

# step NAME CAP [--tee FILE] COMMAND...: run COMMAND for at most CAP seconds and never past BUDGET_S,
# its output copied into FILE too.
step() {
  local name=$1 cap=$2 copy=/dev/null
  shift 2
  if [ "$1" = --tee ]; then
    copy=$2
    shift 2
  fi
  local limit=$(( BUDGET_S - ($(date +%s) - started) ))
  (( limit > cap )) && limit=$cap
  if (( limit < 20 )); then
    echo "== $name: not started, ${limit} s left of BUDGET_S=$BUDGET_S"
    failed+=("${name%%.*}")
    return 1
  fi
  echo "== $name (at most $limit s, from $(date -u +%T))"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$copy"
  rc=${PIPESTATUS[0]}
  echo "== $name: exit status $rc after $(( $(date +%s) - t0 )) s$([ "$rc" = 124 ] && echo ' (stopped at its limit)')"
  [ "$rc" = 0 ] || failed+=("${name%%.*}")
  return "$rc"
}

# hydra-core, omegaconf and datasets (and what else .whl holds) are not on the GPU image: they travel
# as wheels (../shared/tools/device-wheels) and are unpacked into a private folder. An interpreter
# that has them already (the rehearsal's venv) skips this.
if [ -d .whl ] && ! "$PYTHON" -c "import hydra, omegaconf, datasets" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl \
    || { echo "first_call.sh: the wheels in .whl/ did not install (above)"; finish; exit 1; }
  export PYTHONPATH="$WORK/site:$PWD/src"
else
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi

device=cuda
[ "$QUICK" = 1 ] && device=cpu
if ! step "1. environment" 60 --tee "$OUT/env.txt" "$PYTHON" scripts/gpu/check_env.py --device "$device"; then
  echo "first_call.sh: stopped: the environment cannot run attnmt (the check_env line above says what to carry)"
  finish
  exit 1
fi

tests=(-m gpu -v -s -p no:cacheprovider --junitxml="$OUT/cuda_tests.xml" tests/test_cuda.py)
if [ "$QUICK" = 1 ]; then
  ATTNMT_REHEARSE_GPU=1 ATTNMT_TEST_COMPILE_BACKEND=aot_eager step "2. CUDA tests" 150 "$PYTHON" -m pytest "${tests[@]}"
else
  TORCH_LOGS=recompiles step "2. CUDA tests" 150 "$PYTHON" -m pytest "${tests[@]}"
fi

# Training stops at train.max_hours; data preparation, the average and two beam-5 scorings of test2016
# need about 90 s more on a GPU.
multi30k_cap=300
hours=$(awk -v s=$(( multi30k_cap - 90 )) 'BEGIN { printf "%.4f", s / 3600 }')
extra=""
[ "$QUICK" = 1 ] || extra="train.max_hours=$hours"
DIRECTIONS=de_en OUT="$OUT" WORK="$WORK/multi30k" MULTI30K="$MULTI30K" QUICK="$QUICK" EXTRA_OVERRIDES="$extra" \
  step "3. Multi30k de->en" "$multi30k_cap" bash scripts/gpu/multi30k.sh

if [ "$QUICK" = 1 ]; then
  bench=(--device cpu --models tiny --lengths multi30k --max-tokens 256 --steps 1 --warmup 0 --precision fp32 --vocab 64
         --threads 1)
else
  bench=(--device cuda --models base --lengths multi30k,wmt --max-tokens 8192,16384 --precision bf16)
fi
step "4. throughput" 600 --tee "$OUT/throughput.md" "$PYTHON" scripts/bench_train.py "${bench[@]}" --compile off

finish
[ ${#failed[@]} = 0 ]
