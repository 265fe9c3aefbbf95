# The set-up that scripts/quickstart.sh and scripts/test.sh share, sourced by both (run from the
# repository's root): a Python 3.10+, the virtual environment .venv (or the one already active),
# the CPU build of torch, and this checkout of attnmt with the extras the caller names. Each step
# that cannot be done ends the script with one line saying what is missing and what to do.
#
#   attnmt_setup EXTRAS     e.g. attnmt_setup plot    or    attnmt_setup dev,ct2,hf,serve,plot
#                           (attnmt_python, then attnmt_install EXTRAS)
#
# TORCH_SPEC chooses the torch that pip installs (default torch==2.13.0, the build CI tests) and
# TORCH_INDEX_URL the index it comes from. By default, on Linux, that is PyTorch's CPU wheel index
# (plain PyPI would give the multi-GB CUDA build), unless pip is set up with an index or wheel folder
# of its own (as on attnmt's CI machines, whose index serves the CPU build).

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
  attnmt_python
  attnmt_install "$1"
}

# A Python 3.10+ in an active environment: $VIRTUAL_ENV's, or .venv (made where it is missing).
attnmt_python() {
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
    [ -x "$VIRTUAL_ENV/bin/python" ] \
      || fail "VIRTUAL_ENV=$VIRTUAL_ENV has no bin/python: deactivate it (or unset VIRTUAL_ENV) to use .venv"
    PATH="$VIRTUAL_ENV/bin:$PATH"
    python -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
      || fail "the active environment $VIRTUAL_ENV has Python $(python -c 'import platform; print(platform.python_version())'): attnmt needs 3.10 or newer"
  fi
}

# torch, then this checkout's attnmt with the extras named (comma-separated), each where missing.
attnmt_install() {
  local extras=$1
  if ! python -c "import torch" 2>/dev/null; then
    local pip_config
    pip_config=$(python -m pip config list 2>/dev/null || true)  # pip's files and PIP_* variables
    if [ -z "${TORCH_INDEX_URL:-}" ] && [ "$(uname -s)" = Linux ] && ! [[ $pip_config =~ index-url|find-links ]]; then
      TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
    fi
    echo "== installing ${TORCH_SPEC:=torch==2.13.0}${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL}"
    quiet_pip "$TORCH_SPEC" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  fi
  if ! python scripts/_installed.py "$extras"; then
    echo "== installing attnmt[$extras] from this checkout"
    quiet_pip -e ".[$extras]"
  fi
}
