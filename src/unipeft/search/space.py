"""The S4 design space (Chen et al. 2023, "Parameter-Efficient Fine-Tuning Design Spaces"; seed 000 "S4").

A design assigns the model's L blocks to G consecutive groups and, per group, a share of the
parameter budget, whether it is tuned, and a set of strategies from {A, P, B, L}:

    grouping (S1)     how many blocks each group gets:  increasing, uniform, decreasing, spindle, bottleneck
    allocation (S2)   each tuned group's share of the budget:  increasing, uniform, decreasing
    tunable (S3)      tuned or frozen, per group
    strategies (S4)   per group, a non-empty subset of  A = adapter (Pfeiffer, after the FFN),
                      P = prefix tuning (trained directly), B = BitFit, L = LoRA (W_q, W_v)

A design becomes one ``Compose`` of the methods with ``layers=`` set to each group's blocks. Its
sizes come from the budget: a group's share is split evenly among its sized strategies (A's
bottleneck, P's length, L's rank; BitFit takes what the group's biases are), each size found
from the parameters the method actually adds at sizes 1 and 2 on this model (a line fits:
every one of them grows linearly with its size), never from a formula that might drift from the
code. Sizes are at least 1, so a tiny budget can overshoot; ``Design.parameters`` says by how much.
"""
from __future__ import annotations

import dataclasses
import itertools

from ..errors import UnipeftError, choices

GROUPINGS = ("increasing", "uniform", "decreasing", "spindle", "bottleneck")
ALLOCATIONS = ("increasing", "uniform", "decreasing")
STRATEGIES = ("A", "P", "B", "L")
SUBSETS = tuple("".join(s) for n in range(1, 5) for s in itertools.combinations(STRATEGIES, n))  # the 15 choices


def weights(pattern: str, g: int) -> list[int]:
    """Relative sizes of G groups (layers for a grouping, budget for an allocation), lowest group first."""
    if pattern == "uniform":
        return [1] * g
    if pattern == "increasing":
        return [i + 1 for i in range(g)]
    if pattern == "decreasing":
        return [g - i for i in range(g)]
    if pattern == "spindle":      # small at both ends, large in the middle
        return [min(i, g - 1 - i) + 1 for i in range(g)]
    if pattern == "bottleneck":   # large at both ends, small in the middle
        return [max(i, g - 1 - i) - g // 2 + 1 for i in range(g)]
    raise UnipeftError(f"unknown pattern {pattern!r}; valid: {choices(GROUPINGS)}")


def group_layers(pattern: str, n_layers: int, g: int) -> list[list[int]]:
    """The blocks of each group: consecutive, at least one each, sizes as close to the pattern as L allows."""
    if n_layers < g:
        raise UnipeftError(f"search: {g} groups need at least {g} blocks; the model has {n_layers}")
    w = weights(pattern, g)
    sizes = [1] * g
    for _ in range(n_layers - g):  # hand out the rest one by one where the pattern is furthest behind
        i = max(range(g), key=lambda k: w[k] / sum(w) * n_layers - sizes[k])
        sizes[i] += 1
    out, start = [], 0
    for s in sizes:
        out.append(list(range(start, start + s)))
        start += s
    return out


@dataclasses.dataclass(frozen=True)
class Design:
    grouping: str
    allocation: str
    tuned: tuple          # bool per group
    strategies: tuple     # subset string per group ("AL", "PB", ...)

    def key(self) -> str:
        return f"{self.grouping}/{self.allocation}/" + ",".join(
            s if t else "-" for t, s in zip(self.tuned, self.strategies))

    @classmethod
    def from_key(cls, key: str) -> "Design":
        """The design a ``key()`` names ("spindle/uniform/AL,AP,-,PBL": '-' is a frozen group)."""
        parts = key.split("/")
        if len(parts) != 3:
            raise UnipeftError(f"design {key!r}: expected grouping/allocation/G1,G2,... "
                               f"(e.g. spindle/uniform/AL,AP,APB,PBL)")
        grouping, allocation, groups = parts
        if grouping not in GROUPINGS:
            raise UnipeftError(f"design {key!r}: unknown grouping {grouping!r}; valid: {choices(GROUPINGS)}")
        if allocation not in ALLOCATIONS:
            raise UnipeftError(f"design {key!r}: unknown allocation {allocation!r}; valid: {choices(ALLOCATIONS)}")
        strategies = groups.split(",")
        for s in strategies:
            if s != "-" and s not in SUBSETS:
                raise UnipeftError(f"design {key!r}: group {s!r} is not a set of {choices(STRATEGIES)} "
                                   f"(in that order) or '-' (frozen)")
        tuned = tuple(s != "-" for s in strategies)
        return cls(grouping, allocation, tuned, tuple(s if s != "-" else "A" for s in strategies))


class Sizer:
    """Turns designs into compositions at a parameter budget on one model (see the module docstring)."""

    def __init__(self, model, budget: int, groups: int):
        from ..engine import registry

        self.model, self.budget, self.groups = model, budget, groups
        reg = registry(model, create=True)
        self.n_layers = len(reg.map.blocks)
        if not registry(model).deltas:
            model.__dict__.pop("_unipeft", None)
        self._lines: dict = {}

    def _method(self, s: str, size: int, layers: list[int]):
        import unipeft as up

        if s == "A":
            return up.Adapter(style="pfeiffer", bottleneck=size, layers=layers, train_head=False)
        if s == "P":
            return up.PrefixTuning(length=size, reparam_hidden=0, layers=layers, train_head=False)
        if s == "L":
            return up.LoRA(r=size, alpha=2.0 * size, targets=("q", "v"), layers=layers, train_head=False)
        return up.BitFit(layers=layers, train_head=False)

    def _count(self, cfg) -> int:
        import unipeft as up

        up.attach(self.model, cfg, name="_s4_probe", activate=False)
        try:
            return up.engine.delta_parameter_count(self.model, up.engine.registry(self.model).deltas["_s4_probe"])
        finally:
            up.detach(self.model, "_s4_probe")

    def _line(self, s: str, layers: list[int]) -> tuple[int, int]:
        """(cost at size 1, cost of each further unit) of strategy s on these blocks."""
        key = (s, tuple(layers))
        if key not in self._lines:
            one = self._count(self._method(s, 1, layers))
            two = one if s == "B" else self._count(self._method(s, 2, layers))
            self._lines[key] = (one, two - one)
        return self._lines[key]

    def compose(self, design: Design):
        """(the Compose config, its parameter count) for ``design``."""
        import unipeft as up

        groups = group_layers(design.grouping, self.n_layers, self.groups)
        share = weights(design.allocation, self.groups)
        tuned_share = sum(w for w, t in zip(share, design.tuned) if t)
        parts, total = [], 0
        for layers, w, tuned, subset in zip(groups, share, design.tuned, design.strategies):
            if not tuned:
                continue
            budget = self.budget * w / tuned_share
            if "B" in subset:  # BitFit's size is the group's biases
                cost = self._line("B", layers)[0]
                parts.append(self._method("B", 1, layers))
                budget -= cost
                total += cost
            sized = [s for s in subset if s != "B"]
            for s in sized:
                one, unit = self._line(s, layers)
                size = max(1, 1 + int((budget / len(sized) - one) // max(unit, 1)))
                parts.append(self._method(s, size, layers))
                total += one + (size - 1) * unit
        if not parts:
            raise UnipeftError("search: a design with no tuned group trains nothing")
        return up.Compose(parts), total
