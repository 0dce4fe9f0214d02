"""Routed tables: the stacked per-delta tensors a site gathers per row under ``up.route``.

Under a route, deltas of one class at a linear site run as one gathered computation: their
tensors (LoRA's factors, (IA)3's scales, an adapter's projections...) are stacked into tables
whose row 0 is the identity (zeros: "no change"), row ``slot`` one delta's, and every row of the
batch reads its delta's slot (``Route.slots``).

With autograd the tables are built for the call from the routed deltas, so gradients reach each
of them. Without autograd (serving) building them on every batch would copy every routed delta's
tensors again, so a ``SlotTable`` keeps them on the site across batches and routing blocks, the
way a serving engine keeps adapter weights in slots:

* only deltas that were routed are in it (a server with hundreds attached pays for the ones its
  batches use), each in a slot of its own;
* a delta whose tensors changed (a version counter or the storage moved), or a new delta object
  under an old name, is written again, into its slot, alone; the tensors are checked at a delta's
  first use in each ``up.route`` block (a generation runs one forward per token in one block, and
  checking every delta at every site at every step would cost as much as the gather);
* a slot whose delta is gone (detached, or evicted by a serving cache) is reused; the table
  grows by doubling when no slot is free.

The one contract with the stacking functions (``build``): they pad with zeros (LoRA's ranks,
adapters' bottlenecks, to the largest among the deltas given), so a row built for fewer deltas,
padded further with zeros to the table's width, means the same.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F


def _as_tuple(tables) -> tuple[torch.Tensor, ...]:
    return tables if isinstance(tables, tuple) else (tables,)


def _fit(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``t`` zero-padded on its trailing dimensions up to ``shape`` (each at least t's own)."""
    pad = []
    for have, want in zip(reversed(t.shape[1:]), reversed(shape)):
        pad += [0, want - have]
    return F.pad(t, pad) if any(pad) else t


class SlotTable:
    """Stacked per-delta tensors of one class at one site, kept across batches (no autograd)."""

    def __init__(self):
        self.tensors: tuple[torch.Tensor, ...] | None = None   # each (capacity + 1, ...): row 0 identity
        self.single = False                                    # build returned one tensor, not a tuple
        self.entries: dict[str, tuple] = {}                    # name -> (weakref to delta, stamp, slot)
        self.block = None                                      # the up.route block the names in checked are for
        self.checked: set[str] = set()

    @staticmethod
    def _stamp(tensors) -> tuple:
        """What must not move for a written row to stay right: each source's version and storage."""
        return tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in tensors)

    def lookup(self, named: list, build, params, alive, block=None) -> tuple:
        """The tables and {name: slot} for the deltas ``named`` [(name, delta)], writing the rows of
        those that are new or changed. ``alive(name, delta)`` says whether a kept entry's delta is
        still attached (its slot is reused otherwise); ``block`` (the open ``up.route``'s Route)
        lets a delta's tensors be checked once per block."""
        if block is None or block is not self.block:
            self.block, self.checked = block, set()
        dirty = []
        for name, d in named:
            entry = self.entries.get(name)
            if entry is None or entry[0]() is not d or (
                    name not in self.checked and entry[1] != self._stamp(params(d))):
                dirty.append((name, d))
        if dirty:
            with torch.no_grad():
                self._write(dirty, _as_tuple(build([d for _, d in dirty])), params, alive)
        if block is not None:
            self.checked.update(name for name, _ in named)
        out = self.tensors[0] if self.single else self.tensors
        return out, {name: self.entries[name][2] for name, _ in named}

    def _write(self, dirty: list, rows: tuple, params, alive) -> None:
        if self.tensors is not None and (len(rows) != len(self.tensors) or any(
                r.dtype != t.dtype or r.device != t.device for r, t in zip(rows, self.tensors))):
            self.tensors, self.entries = None, {}  # the deltas moved to another dtype or device: start over
        if self.tensors is None:
            self.single = len(rows) == 1
            self.tensors = tuple(r.clone() for r in rows)  # row 0 and one slot per dirty delta
            for i, (name, d) in enumerate(dirty):
                self.entries[name] = (weakref.ref(d), self._stamp(params(d)), i + 1)
            return
        # widen the table where a new row is wider (a larger rank or bottleneck), and the rows to it
        shapes = [tuple(max(a, b) for a, b in zip(t.shape[1:], r.shape[1:])) for t, r in zip(self.tensors, rows)]
        self.tensors = tuple(_fit(t, s) for t, s in zip(self.tensors, shapes))
        rows = tuple(_fit(r, s) for r, s in zip(rows, shapes))
        slots = self._slots_for([n for n, _ in dirty], alive)
        index = torch.tensor(slots, dtype=torch.long, device=rows[0].device)
        for t, r in zip(self.tensors, rows):
            t.index_copy_(0, index, r[1:])
        for (name, d), slot in zip(dirty, slots):
            self.entries[name] = (weakref.ref(d), self._stamp(params(d)), slot)

    def _slots_for(self, names: list[str], alive) -> list[int]:
        """A slot for each name: its own if it has one, else a free one; grows the table if needed."""
        capacity = self.tensors[0].shape[0] - 1
        used = {e[2] for e in self.entries.values()}
        free = [s for s in range(1, capacity + 1) if s not in used]
        need = sum(1 for n in names if n not in self.entries)
        if need > len(free):  # drop entries whose delta is gone, then grow
            for name, (ref, _, slot) in list(self.entries.items()):
                d = ref()
                if name not in names and (d is None or not alive(name, d)):
                    del self.entries[name]
                    free.append(slot)
            free.sort()
            if need > len(free):
                grow = max(capacity, need - len(free))
                self.tensors = tuple(torch.cat([t, t.new_zeros((grow, *t.shape[1:]))]) for t in self.tensors)
                free += range(capacity + 1, capacity + grow + 1)
        out = []
        for n in names:
            if n in self.entries:
                out.append(self.entries[n][2])
            else:
                out.append(free.pop(0))
        return out
