# The set-up that scripts/quickstart.sh and scripts/test.sh share, sourced by both (run from the
# repository's root): a Python 3.10+, the virtual environment .venv (or the one already active),
# the CPU build of torch, and this checkout of attnmt with the extras the caller names. Each step
# that cannot be done ends the script with one line saying what is missing and what to do.
#
#   attnmt_setup EXTRAS     e.g. attnmt_setup plot    or    attnmt_setup dev,ct2,hf,serve,plot
#
# TORCH_SPEC chooses the torch that pip installs (default torch==2.13.0, the build CI tests);
# TORCH_INDEX_URL, where set, is the index pip takes it from, e.g. PyTorch's CPU wheel index
# https://download.pytorch.org/whl/cpu where pip would otherwise pull the multi-GB CUDA build.

fail() {
  echo "error: $*" >&2
  exit 1
}

# pip, its output kept in .venv/pip.log rather than on the screen; a failure is one line.
quiet_pip() {
  local log=${VIRTUAL_ENV:-.venv}/pip.log
  if ! python -m pip install -q "$@" >"$log" 2>&1; then
    fail "pip could not install $* (no network or package index? pip's words are in $log)"
  fi
}

attnmt_setup() {
  local extras=$1
  if [ -z "${VIRTUAL_ENV:-}" ]; then
    local python=${PYTHON:-python3}
    command -v "$python" >/dev/null 2>&1 \
      || fail "no $python on PATH: attnmt needs Python 3.10 or newer (install one, or set PYTHON=/path/to/python3.x)"
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
      || fail "$python is Python $("$python" -c 'import platform; print(platform.python_version())'): attnmt needs 3.10 or newer (install one, or set PYTHON=/path/to/python3.x)"
    if [ ! -x .venv/bin/python ]; then
      echo "== creating .venv"
      "$python" -m venv .venv >/dev/null 2>&1 \
        || { rm -rf .venv; fail "$python -m venv .venv failed (on Debian or Ubuntu: apt-get install python3-venv)"; }
    fi
    source .venv/bin/activate
  else
    python -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
      || fail "the active environment $VIRTUAL_ENV has Python $(python -c 'import platform; print(platform.python_version())'): attnmt needs 3.10 or newer"
  fi
  if ! python -c "import torch" 2>/dev/null; then
    echo "== installing ${TORCH_SPEC:=torch==2.13.0}"
    quiet_pip "$TORCH_SPEC" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  fi
  if ! python scripts/_installed.py "$extras"; then
    echo "== installing attnmt[$extras] from this checkout"
    quiet_pip -e ".[$extras]"
  fi
}
