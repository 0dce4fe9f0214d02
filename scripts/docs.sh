#!/usr/bin/env bash
# Build the documentation site with `mkdocs build --strict` (broken links, missing references and
# unknown markers fail), into a temporary folder unless a folder is given:
#
#   bash scripts/docs.sh              # check only (CI: .ci/run)
#   bash scripts/docs.sh out/site     # keep the built site there (never commit it)
#   bash scripts/docs.sh serve        # live preview on http://127.0.0.1:8000
#
# Sets up .venv if needed (scripts/setup.sh), then installs the docs extra (mkdocs, mkdocs-material,
# mkdocstrings[python]) into it when missing. The pages' Python examples (docs/examples/*.py) are
# run by tests/test_docs.py, not here.
set -euo pipefail
target="${1:-}"
set --   # a sourced script sees the caller's arguments: setup.sh would take them for packages
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
export HF_HUB_OFFLINE=1 NO_MKDOCS_2_WARNING=1
if ! python -c 'import importlib.metadata as m; [m.version(d) for d in ("mkdocs", "mkdocs-material", "mkdocstrings-python")]' 2>/dev/null; then
    echo "[docs] installing the docs extra" >&2
    python -m pip install -q -e ".[docs]"
fi
if [ "$target" = "serve" ]; then
    exec mkdocs serve
fi
if [ -n "$target" ]; then
    exec mkdocs build --strict -d "$target"
fi
site="$(mktemp -d)"
trap 'rm -rf "$site"' EXIT
mkdocs build --strict -d "$site"
