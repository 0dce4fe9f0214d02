"""Routing with many deltas attached (a server's case): the kept tables and the attach cost.

Without autograd a routed site keeps its stacked tables across batches (``positions/tables.py``).
These tests hold it to what a server needs: only the deltas a batch routes are stacked; a delta
that changes, is detached, or is replaced by another under its name is never read stale; slots of
gone deltas are reused; a wider delta (a larger rank) widens the table without changing the
others' results. And attaching or activating the N-th delta costs the same as the first.
"""
import pytest
import torch

import tiny
import unipeft as up
from unipeft.positions.linear import LinearSite


def scrambled(model, name, cfg, seed):
    up.attach(model, cfg, name=name, activate=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in up.engine.registry(model).deltas[name].parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)


def alone(model, batch, names):
    outs = []
    for i, name in enumerate(names):
        up.activate(model, [] if name is None else [name])
        with torch.no_grad():
            outs.append(tiny.logits(model, {k: v[i:i + 1] for k, v in batch.items()}))
    up.activate(model, [])
    return torch.cat(outs)


def routed(model, batch, names):
    with up.route(model, names), torch.no_grad():
        return tiny.logits(model, batch)


def batch_of(family, rows):
    parts = [tiny.batch(family, seed=s) for s in range(1, rows // 2 + 1)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def tables(model, tag="LoRADelta"):
    """The kept LoRA tables of every site: (site, SlotTable)."""
    out = []
    for _, m in model.named_modules():
        if isinstance(m, LinearSite) and tag in m.__dict__.get("_unipeft_route_tables", {}):
            out.append((m, m.__dict__["_unipeft_route_tables"][tag]))
    return out


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_only_routed_deltas_are_stacked_and_results_follow_every_change(family):
    model = tiny.make(family).eval()
    for i in range(12):
        scrambled(model, f"d{i}", up.LoRA(r=2 + i % 3), seed=i)
    batch = batch_of(family, 4)
    names = ["d0", "d5", None, "d5"]
    torch.testing.assert_close(routed(model, batch, names), alone(model, batch, names), atol=1e-5, rtol=0)
    kept = tables(model)
    assert kept and all(set(t.entries) == {"d0", "d5"} for _, t in kept)  # not the ten others
    assert all(t.tensors[0].shape[0] == 3 for _, t in kept)               # row 0 + two slots

    # a parameter changed in place (no autograd: the version counter moves) is read anew
    with torch.no_grad():
        up.engine.registry(model).deltas["d5"].linear[next(iter(up.engine.registry(model).deltas["d5"].linear))] \
            .lora_B.add_(1.0)
    torch.testing.assert_close(routed(model, batch, names), alone(model, batch, names), atol=1e-5, rtol=0)

    # another delta under a kept name (detach, attach anew) is never read stale
    up.detach(model, "d0")
    scrambled(model, "d0", up.LoRA(r=3), seed=99)
    torch.testing.assert_close(routed(model, batch, names), alone(model, batch, names), atol=1e-5, rtol=0)

    # a wider delta (rank 16) widens the table; the rows of the others are unchanged
    scrambled(model, "wide", up.LoRA(r=16), seed=7)
    names = ["wide", "d5", "d3", None]
    torch.testing.assert_close(routed(model, batch, names), alone(model, batch, names), atol=1e-5, rtol=0)
    assert all(t.tensors[0].shape[1] == 16 for _, t in tables(model))


def test_slots_of_gone_deltas_are_reused_so_the_table_stays_at_the_working_set():
    """A serving cache loads and evicts deltas all the time: the kept table must not grow with
    every delta ever seen, only with how many are attached and routed at once."""
    model = tiny.make("llama").eval()
    batch = batch_of("llama", 4)
    for i in range(20):
        for j in range(4):
            scrambled(model, f"t{i}_{j}", up.LoRA(r=2), seed=100 * i + j)
        names = [f"t{i}_{j}" for j in range(4)]
        got = routed(model, batch, names)
        if i in (0, 19):
            torch.testing.assert_close(got, alone(model, batch, names), atol=1e-5, rtol=0)
        for j in range(4):
            up.detach(model, f"t{i}_{j}")
    # every site's table: at most twice the working set (4) plus row 0, never 80 slots
    sizes = {t.tensors[0].shape[0] for _, t in tables(model)} if up.engine.registry(model) else set()
    assert sizes == set() or max(sizes) <= 9


def test_mixed_classes_keep_separate_tables_and_base_rows_read_row_zero():
    model = tiny.make("gpt2").eval()
    scrambled(model, "l", up.LoRA(r=4), seed=1)
    scrambled(model, "i", up.IA3(), seed=2)
    scrambled(model, "a", up.Adapter(style="pfeiffer", bottleneck=4), seed=3)
    batch = batch_of("gpt2", 4)
    for names in (["l", "i", "a", None], [None, "a", "l", "i"], ["i", "i", None, "l"]):
        torch.testing.assert_close(routed(model, batch, names), alone(model, batch, names), atol=1e-5, rtol=0)


def test_attaching_or_activating_the_nth_delta_does_not_walk_the_others(monkeypatch):
    """With N deltas attached, attach and activate touch the deltas that change (and the base),
    never every delta: a server that holds 500 must not pay 500 on each load."""
    model = tiny.make("llama")
    for i in range(30):
        up.attach(model, up.LoRA(r=2), name=f"d{i}", activate=False)
    calls = []
    original = up.engine.Delta.parameters

    def counting(self):
        calls.append(self.name)
        return original(self)

    monkeypatch.setattr(up.engine.Delta, "parameters", counting)
    up.attach(model, up.LoRA(r=2), name="new", activate=False)
    up.activate(model, ["d3"])
    up.activate(model, ["new"])
    assert set(calls) <= {"new", "d3"}, sorted(set(calls))
    # and the state is what a full walk would give: only the active delta trains
    trainable = {n.split("unipeft_deltas.")[-1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"new"}


def test_tensors_are_checked_once_per_block_and_again_in_the_next():
    """Inside one up.route block a delta's tensors are read at its first use (a generation's
    steps do not re-check every delta at every site); the next block sees any change."""
    model = tiny.make("llama").eval()
    scrambled(model, "a", up.LoRA(r=2), seed=1)
    batch = batch_of("llama", 2)
    names = ["a", None]
    delta = up.engine.registry(model).deltas["a"]
    with up.route(model, names), torch.no_grad():
        first = tiny.logits(model, batch)
        stamps = [t for _, t in tables(model)]
        assert all("a" in t.checked for t in stamps)
    with torch.no_grad():
        next(iter(delta.linear.values())).lora_B.add_(1.0)
    torch.testing.assert_close(routed(model, batch, names), alone(model, batch, names), atol=1e-5, rtol=0)
    assert not torch.equal(routed(model, batch, names), first)


def test_a_gathered_class_computes_only_its_own_rows(monkeypatch):
    """Two LoRA deltas on rows 0 and 1, (IA)3 and the base on rows 2 and 3: the LoRA products run
    on 2 rows, not on all 4 (rows of other methods would only add row 0's zeros), and the routed
    logits still equal each row alone."""
    model = tiny.make("llama").eval()
    scrambled(model, "a", up.LoRA(r=2), seed=1)
    scrambled(model, "b", up.LoRA(r=3), seed=2)
    scrambled(model, "i", up.IA3(), seed=3)
    batch = batch_of("llama", 4)
    names = ["a", "b", "i", None]
    sizes, real = [], torch.bmm

    def spy(x, y, *args, **kwargs):
        sizes.append(x.shape[0])
        return real(x, y, *args, **kwargs)

    monkeypatch.setattr(torch, "bmm", spy)
    got = routed(model, batch, names)
    monkeypatch.setattr(torch, "bmm", real)
    assert sizes and set(sizes) == {2}
    torch.testing.assert_close(got, alone(model, batch, names), atol=1e-5, rtol=0)
