#!/usr/bin/env bash
# From a fresh clone to a trained German->English model in one command:
#   scripts/quickstart.sh [MULTI30K_DIR] [attnmt-train overrides, e.g. train.max_steps=100]
# 1. a virtual environment .venv with attnmt installed (or the one already active, $VIRTUAL_ENV), as
#    scripts/_setup.sh makes it (Python 3.10+, the CPU build of torch);
# 2. Multi30k: the folder given as argument or $MULTI30K, else ../shared/data/multi30k or
#    $ATTNMT_DATA/multi30k if present, else data/multi30k fetched from the HF hub (bentrevett/multi30k);
# 3. attnmt-train experiment=quickstart (seven to ten minutes on a 2-core CPU);
# 4. attnmt-evaluate on test2016 (BLEU, chrF) and attnmt-translate on a sample sentence.
# Set TORCH_SPEC (default torch==2.13.0) and TORCH_INDEX_URL to choose the torch build pip installs.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/_setup.sh
attnmt_setup plot  # matplotlib, for the attention plots

multi30k=${1:-${MULTI30K:-}}
shift || true  # the rest: attnmt-train overrides
if [ -z "$multi30k" ]; then
  for candidate in ../shared/data/multi30k "${ATTNMT_DATA:-/nonexistent}/multi30k" data/multi30k; do
    if [ -f "$candidate/train.de" ]; then multi30k=$candidate; break; fi
  done
fi
if [ -z "$multi30k" ]; then
  echo "== no local Multi30k found (in ../shared/data, \$ATTNMT_DATA or data/): fetching it from the HF hub"
  python scripts/prepare_multi30k.py data/multi30k || exit 1
  multi30k=data/multi30k
fi
echo "== Multi30k from $multi30k"

echo "== training (runs/quickstart; Ctrl-C stops with a checkpoint, rerun with train.resume=auto to continue)"
attnmt-train experiment=quickstart data.root="$multi30k" "$@"

echo "== evaluating test2016"
attnmt-evaluate ckpt=runs/quickstart/checkpoints/best.pt split=test data.root="$multi30k"

echo "== translating"
echo "Ein kleines Mädchen klettert in ein Spielhaus aus Holz." | attnmt-translate ckpt=runs/quickstart/checkpoints/best.pt
echo "== done: try   echo 'Zwei Hunde spielen im Schnee.' | .venv/bin/attnmt-translate ckpt=runs/quickstart/checkpoints/best.pt"
