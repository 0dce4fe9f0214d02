"""benchmarks/lora_compute_limit.py: every variant builds and trains a step on a tiny llama, in fp32 and
bf16 autocast, under the context it declares (unipeft-plain once crashed: its switch was overwritten by
the one meant for unipeft-factored and unipeft-merged)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import tiny

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "lora_compute_limit.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPT.parent))  # the script imports its timing helpers from benchmarks/
    try:
        spec = importlib.util.spec_from_file_location("lora_compute_limit_benchmark", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_variant_trains_a_step_under_its_own_switch(bench, precision):
    from unipeft import fused

    base = tiny.make("llama", "lm")
    batch = bench.make_batch(base, 2, 8, 0, "cpu")
    args = bench.parse_args(["--variants", ",".join(bench.VARIANTS), "--precision", precision, "--r", "4"])
    seen = {}
    for name in bench.VARIANTS:
        model, uses_optimizer, ctx = bench.build(name, base, args)
        step, trainable = bench.step_fn(model, uses_optimizer, ctx, batch, precision, "cpu")
        before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        step()
        after = [p.detach() for p in model.parameters() if p.requires_grad]
        assert (trainable == 0) == (name == "limit"), name
        assert name == "limit" or any(not torch.equal(a, b) for a, b in zip(before, after)), f"{name} did not train"
        with ctx():
            seen[name] = (fused.enabled(), fused._lora_path, fused._stack_base)
    assert seen["unipeft-plain"][0] is False and seen["unipeft-lora"][0] is True
    assert seen["unipeft-factored"][1] == "factored" and seen["unipeft-merged"][1] == "merged"
    assert seen["unipeft-unstacked"][2] is False and seen["unipeft-lora"][2] == "auto"


def test_the_table_marks_a_missing_comparison_instead_of_printing_nan(bench):
    assert bench._x(None) == "-" and bench._x(1.0456) == "1.046x"
