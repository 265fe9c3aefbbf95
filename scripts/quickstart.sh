#!/usr/bin/env bash
# From a fresh clone to a trained German->English model in one command:
#   scripts/quickstart.sh [MULTI30K_DIR] [attnmt-train overrides, e.g. train.max_steps=100]
# 1. a virtual environment .venv with attnmt installed (or the one already active, $VIRTUAL_ENV);
# 2. Multi30k: the folder given as argument or $MULTI30K, else ../shared/data/multi30k or
#    $ATTNMT_DATA/multi30k if present, else data/multi30k fetched from the HF hub (bentrevett/multi30k);
# 3. attnmt-train experiment=quickstart (about seven minutes on a 2-core CPU);
# 4. attnmt-evaluate on test2016 (BLEU, chrF) and attnmt-translate on a sample sentence.
# Set TORCH_SPEC to choose the torch build pip installs (default: torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    python3 -m venv .venv
  fi
  source .venv/bin/activate
fi
if ! python -c "import torch" 2>/dev/null; then
  echo "== installing ${TORCH_SPEC:=torch==2.13.0}"
  python -m pip install -q "$TORCH_SPEC"
fi
# Installed already when this checkout's attnmt (and matplotlib, for the attention plots) imports.
if ! python -c "import attnmt, matplotlib, pathlib, sys; sys.exit(pathlib.Path(attnmt.__file__).resolve().parents[1] != pathlib.Path('src').resolve())" 2>/dev/null; then
  echo "== installing attnmt"
  python -m pip install -q -e '.[plot]'
fi

multi30k=${1:-${MULTI30K:-}}
shift || true  # the rest: attnmt-train overrides
if [ -z "$multi30k" ]; then
  for candidate in ../shared/data/multi30k "${ATTNMT_DATA:-/nonexistent}/multi30k" data/multi30k; do
    if [ -f "$candidate/train.de" ]; then multi30k=$candidate; break; fi
  done
fi
if [ -z "$multi30k" ]; then
  echo "== no local Multi30k found: fetching it from the HF hub"
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
