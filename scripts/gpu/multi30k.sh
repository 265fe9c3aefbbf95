#!/usr/bin/env bash
# Multi30k en->de and de->en on one GPU, in one device call of under 10 minutes: train each direction
# with a fixed GPU recipe, average its last checkpoints, score test2016 with beam 5 (averaged and best
# checkpoints), and print a summary table (BLEU, chrF, training wall time, tokens/s, peak GPU memory).
#
#   bash scripts/gpu/multi30k.sh
#
# Environment (all optional):
#   MULTI30K=.gpudata/multi30k  the Multi30k folder ({train,valid,test2016}.{en,de}); ../shared does
#                               not travel to the GPU machine, so the run carries a copy (docs/BENCHMARKS.md)
#   OUT=runs/gpu-multi30k       where the summary, train logs, scores and hypotheses go ($OUT on the device)
#   WORK=/tmp/attnmt-multi30k   run directories (checkpoints, TensorBoard) and the data cache
#   PYTHON=python3              the interpreter (attnmt comes from src/ via PYTHONPATH, not installed)
#   DIRECTIONS="en_de de_en"    which experiments (configs/experiment/multi30k_<dir>.yaml) to run
#   EXTRA_OVERRIDES="..."       Hydra overrides appended to both training commands
#   QUICK=1                     a check of this script on a CPU: model=tiny, 30 steps, a data subset
set -euo pipefail
cd "$(dirname "$0")/../.."

MULTI30K=${MULTI30K:-.gpudata/multi30k}
OUT=${OUT:-runs/gpu-multi30k}
WORK=${WORK:-/tmp/attnmt-multi30k}
PYTHON=${PYTHON:-python3}
DIRECTIONS=${DIRECTIONS:-"en_de de_en"}
EXTRA_OVERRIDES=${EXTRA_OVERRIDES:-}
QUICK=${QUICK:-0}

# hydra-core, omegaconf and datasets are not on the GPU image: they travel as wheels in .whl/
# (made by ../shared/tools/device-wheels) and are unpacked into a private target folder. An
# interpreter that has them already (a dev venv) skips this.
if [ -d .whl ] && ! "$PYTHON" -c "import hydra, omegaconf, datasets" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl
  export PYTHONPATH="$WORK/site:$PWD/src"
else
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1

for split in train valid test2016; do
  for lang in en de; do
    if [ ! -f "$MULTI30K/$split.$lang" ]; then
      echo "multi30k.sh: $MULTI30K/$split.$lang is missing; set MULTI30K to the Multi30k folder" \
           "(for a device call, first, here: mkdir -p .gpudata && cp -r ../shared/data/multi30k .gpudata/;" \
           "then carry .gpudata)" >&2
      exit 2
    fi
  done
done
mkdir -p "$OUT" "$WORK"

# The GPU recipe: the small (IWSLT-shaped) Transformer of the experiments, 8k-token batches in bf16,
# inverse-sqrt schedule with a short warm-up (robust to stopping at any step), 4000 updates
# (about 70 epochs of Multi30k), a checkpoint every 400. train.max_hours is a safety stop so both
# directions fit one device call even if the GPU is slower than expected.
recipe=(
  train.precision=bf16 train.max_tokens=8192 train.max_steps=4000 train.max_hours=0.055
  train.valid_every=400 train.keep_last=5 train.log_every=100 train.patience=0 train.num_workers=2
  optim.lr=1e-3 optim.warmup_steps=1000 train.progress_bar=false
)
average_last=5
data_root=$MULTI30K
if [ "$QUICK" = 1 ]; then
  # The script's logic on a CPU in a few minutes: a 2000-pair subset, a tiny model, 30 steps.
  data_root="$WORK/multi30k-subset"
  mkdir -p "$data_root"
  for lang in en de; do
    head -n 2000 "$MULTI30K/train.$lang" > "$data_root/train.$lang"
    head -n 100 "$MULTI30K/valid.$lang" > "$data_root/valid.$lang"
    head -n 100 "$MULTI30K/test2016.$lang" > "$data_root/test2016.$lang"
  done
  recipe=(
    model=tiny data.tokenizer.vocab_size=1000 train.device=cpu train.precision=fp32 train.max_tokens=2048
    train.max_steps=30 train.valid_every=10 train.keep_last=5 train.log_every=5 train.valid_max_sentences=20
    optim.lr=1e-3 optim.warmup_steps=10 train.progress_bar=false
  )
  average_last=2
fi

for dir in $DIRECTIONS; do
  run="$WORK/multi30k_$dir"
  rm -rf "$run"
  echo "== training multi30k_$dir into $run"
  start=$(date +%s.%N)
  # shellcheck disable=SC2086  # EXTRA_OVERRIDES is a list of words
  "$PYTHON" -m attnmt.cli.train "experiment=multi30k_$dir" "data.root=$data_root" \
    "data.cache_dir=$WORK/cache" "train.run_dir=$run" "${recipe[@]}" $EXTRA_OVERRIDES
  end=$(date +%s.%N)
  echo "$start $end" > "$run/wall_seconds"
  cp "$run/train.log" "$OUT/$dir.train.log"  # now: a call stopped while scoring still brings it back
  "$PYTHON" -m attnmt.cli.average "ckpt=$run" "last=$average_last" "out=$run/avg_last$average_last.pt"
  : > "$run/eval.jsonl"
  for ckpt in "avg_last$average_last.pt" checkpoints/best.pt; do
    echo "== test2016, beam 5: $ckpt"
    "$PYTHON" -m attnmt.cli.evaluate "ckpt=$run/$ckpt" split=test "data.root=$data_root" beam_size=5 \
      "hyp=$run/$(basename "$ckpt" .pt).hyp" | tee "$run/eval.out"
    tail -n 1 "$run/eval.out" >> "$run/eval.jsonl"
  done
  cp "$run/eval.jsonl" "$OUT/$dir.eval.jsonl"
  cp "$run/avg_last$average_last.hyp" "$OUT/$dir.test2016.hyp"
done

"$PYTHON" - "$WORK" "$OUT" $DIRECTIONS <<'PY'
"""The summary table: test2016 scores, training wall time, tokens/s and peak GPU memory of each run."""
import json
import re
import statistics
import sys
from pathlib import Path

work, out, directions = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]


def peak_memory_gib(run: Path) -> str:
    """The last train/peak_memory_gib scalar in the run's TensorBoard events (n/a without CUDA)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    if "train/peak_memory_gib" not in events.Tags()["scalars"]:
        return "n/a"
    return f"{events.Scalars('train/peak_memory_gib')[-1].value:.2f}"


lines = [
    "| direction | checkpoint | test2016 BLEU | chrF | steps | train command wall s | tgt tok/s (median of log windows) | peak GPU GiB |",
    "|---|---|---:|---:|---:|---:|---:|---:|",
]
for direction in directions:
    run = work / f"multi30k_{direction}"
    start, end = map(float, (run / "wall_seconds").read_text().split())
    log = (run / "train.log").read_text()
    speeds = [float(x) for x in re.findall(r"\| (\d+) tok/s", log)]
    steps = re.findall(r"stopped at step (\d+)", log)
    speed = f"{statistics.median(speeds):,.0f}" if speeds else "n/a"
    peak = peak_memory_gib(run)
    for line in (run / "eval.jsonl").read_text().splitlines():
        result = json.loads(line)
        name = Path(result["ckpt"][0]).name
        lines.append(f"| {direction.replace('_', '->')} | {name} | {result['bleu']:.2f} | {result['chrf']:.2f} | "
                     f"{steps[-1] if steps else '?'} | {end - start:.0f} | {speed} | {peak} |")
table = "\n".join(lines)
print("\n" + table)
(out / "summary.md").write_text(table + "\n")
PY
