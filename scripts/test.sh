#!/usr/bin/env bash
# The test suite on a fresh clone in one command:
#   scripts/test.sh [pytest's arguments, e.g. -x tests/test_model.py, or -m slow]
# 1. .venv as scripts/quickstart.sh makes it (scripts/_setup.sh: Python 3.10+, the CPU build of torch),
#    with every extra the suite uses (dev, ct2, hf, serve, plot), installed only where missing;
# 2. python -m pytest with the arguments (the default selection: pyproject.toml's addopts).
# The tests that read the real corpora look in $ATTNMT_DATA (default ../shared/data); without Multi30k
# there the script stops and says where to put it, unless the arguments choose the tests (-m, -k, files).
# The page test of attnmt-serve needs Debian's chromium (apt-get install chromium) and skips without it.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/_setup.sh
attnmt_python

# Before any install: the whole suite without its corpus would skip the data tests unseen. Arguments
# that choose the tests (-m, -k, or files) run what they choose, the data tests skipping, saying why.
data=${ATTNMT_DATA:-../shared/data}
chosen=false
for arg in "$@"; do
  case $arg in
    -m | -m?* | -k | -k?*) chosen=true ;;
    *) if [ -e "${arg%%::*}" ]; then chosen=true; fi ;;
  esac
done
if [ ! -f "$data/multi30k/train.de" ] && [ "$chosen" = false ]; then
  fail "no Multi30k in $data/multi30k, which the data tests read: put it there (train, valid, test2016 .de/.en/.fr/.cs), set ATTNMT_DATA to the folder that holds multi30k/, or leave those tests out: scripts/test.sh -m 'not data and not slow and not gpu'"
fi

attnmt_install dev,ct2,hf,serve,plot
# On every core (pytest-xdist; tests/conftest.py gives each worker its share of the threads); a file's
# tests stay on one worker, so its module fixtures are built once; files start in the order conftest
# gives them (the long tests first), not by their number of tests.
exec python -m pytest -n auto --dist loadfile --no-loadscope-reorder "$@"
