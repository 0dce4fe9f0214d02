"""Sparse deltas: a few entries of base tensors, trained in place, stored as indices + values.

Seed 004 ("Sparse fine-tuning"): a mask chooses which weights a task may change; the change
is added to the pretrained weights, theta_{tau,l} = theta + delta_tau + delta_l, so several
sparse deltas (a task's, a language's) apply at once and each can be taken away alone; the
notes' "maintain a vector of indices eta vs a dense binary mask" is the storage here.

This extends what selective methods already do (``ModelView.select``: train base parameters
in place, keep the pretrained values for detach) instead of adding a parallel path:

* a ``SparseState`` per delta holds, per chosen tensor, sorted flat indices and the delta's
  own values there, never a dense tensor or mask. ``None`` indices mean "every entry" (LT-SFT's
  dense phase, movement scoring) until the mask is fixed;
* the tensor in memory is always ``original + the values of each active sparse delta``
  (``compose``), recomputed from the kept original, so switching a delta off or detaching it
  leaves the others bit-exact;
* training changes the tensor in place; after each optimizer step ``SparseController`` moves
  that change into the values (``settle``: an entry's change goes to the last active delta whose
  mask holds it, a change outside every mask, such as AdamW's decoupled weight decay, is
  dropped) and writes the tensor again from them, so what ``up.save`` writes is exactly the
  model in memory, bit for bit;
* a tensor hook zeroes gradients outside the active masks (so gradient clipping sees only what
  trains). When a mask is
  chosen from a training signal (LT-SFT, movement, FISH), the same controller does it at step
  ``select_after`` of any training loop (``step_hooks``).

``up.finalize(model, name)`` fixes a delta's final form: DiffPruning projects to its exact
budget, a SparseFT delta still in its selection phase chooses its mask now.
"""
from __future__ import annotations

import functools
import weakref

import torch
import torch.nn as nn

from . import step_hooks
from .errors import UnipeftError

PREFIX = "sparse:"


class SparseState:
    """Indices + values per chosen tensor of one delta (flat positions in the tensor's own layout)."""

    def __init__(self, params: dict[str, torch.Tensor], indices: dict[str, torch.Tensor | None]):
        self.numel = {p: t.numel() for p, t in params.items()}
        self.indices: dict[str, torch.Tensor | None] = {}
        self.values: dict[str, torch.Tensor] = {}
        self.collecting = False          # FISH: gradients are read, nothing trains yet
        self.controller: SparseController | None = None
        for p, t in params.items():
            self.set(p, indices[p], None, like=t)

    def set(self, p: str, idx: torch.Tensor | None, values: torch.Tensor | None, like: torch.Tensor) -> None:
        n = self.numel[p] if idx is None else idx.numel()
        if idx is not None:
            idx = idx.to(device=like.device, dtype=torch.long)
        self.indices[p] = idx
        self.values[p] = (torch.zeros(n, dtype=like.dtype, device=like.device) if values is None
                          else values.detach().to(device=like.device, dtype=like.dtype).clone())

    def fixed(self) -> bool:
        return not self.collecting and all(i is not None for i in self.indices.values())

    def count(self) -> int:
        """Entries this delta changes (k), or may change while its mask is not fixed."""
        return sum(v.numel() for v in self.values.values())


def _add(flat: torch.Tensor, idx: torch.Tensor | None, values: torch.Tensor) -> None:
    if idx is None:
        flat.add_(values)
    else:
        flat.index_add_(0, idx, values)


def _on(reg, p: str) -> list:
    """The active sparse deltas holding tensor ``p``, in activation order."""
    return [d for d in (reg.deltas[n] for n in reg.active) if d.sparse is not None and p in d.sparse.values]


def _original(reg, p: str) -> torch.Tensor:
    return next(d.selected[p] for d in reg.deltas.values() if d.sparse is not None and p in d.selected)


def _follow(reg, p: str, device: torch.device) -> None:
    """Keep a tensor's original and every sparse delta's indices and values on the tensor's device
    (the model may have been moved after the deltas were attached)."""
    for d in reg.deltas.values():
        s = d.sparse
        if s is not None and p in s.values and s.values[p].device != device:
            s.values[p] = s.values[p].to(device)
            s.indices[p] = None if s.indices[p] is None else s.indices[p].to(device)
            d.selected[p] = d.selected[p].to(device)


def _composed(reg, p: str) -> torch.Tensor:
    """original + the values of every active sparse delta on ``p`` (flat, a new tensor)."""
    flat = _original(reg, p).reshape(-1).clone()
    for d in _on(reg, p):
        _add(flat, d.sparse.indices[p], d.sparse.values[p])
    return flat


@torch.no_grad()
def settle(model: nn.Module, reg, p: str) -> None:
    """Move what training did to tensor ``p`` into the values of the active sparse deltas on it (an
    entry's change goes to the last of them whose mask holds it; a change outside every mask is
    dropped), then write ``p`` again as original + those values, so memory is what a file holds."""
    param = model.get_parameter(p)
    _follow(reg, p, param.device)
    rest = param.detach().reshape(-1) - _composed(reg, p)
    if rest.any():
        for d in reversed([d for d in _on(reg, p) if not d.merged]):
            idx = d.sparse.indices[p]
            if idx is None:
                d.sparse.values[p] += rest
                break
            d.sparse.values[p] += rest[idx]
            rest[idx] = 0
        param.copy_(_composed(reg, p).view_as(param))


@torch.no_grad()
def sync(model: nn.Module, reg) -> None:
    """``settle`` every tensor an active, unmerged sparse delta holds."""
    live = [d for d in (reg.deltas[n] for n in reg.active) if d.sparse is not None and not d.merged]
    for p in dict.fromkeys(p for d in live for p in d.sparse.values):
        settle(model, reg, p)


def _mask_grad(idx: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    flat = g.reshape(-1)
    out = torch.zeros_like(flat)
    out[idx] = flat[idx]
    return out.view_as(g)


def _mask(reg, p: str) -> torch.Tensor | None:
    """The union of the active masks on ``p``; None where some active delta trains every entry."""
    on = _on(reg, p)
    if not on or any(d.sparse.indices[p] is None for d in on):
        return None
    return torch.cat([d.sparse.indices[p] for d in on]).unique()


@torch.no_grad()
def compose(model: nn.Module, reg) -> None:
    """Write every tensor a sparse delta holds as original + the active deltas' values, and mask
    the gradients of those that train to their deltas' entries."""
    for h in reg.__dict__.pop("sparse_hooks", []):
        h.remove()
    hooks = []
    touched = dict.fromkeys(p for d in reg.deltas.values() if d.sparse is not None for p in d.sparse.values)
    for p in touched:
        param = model.get_parameter(p)
        _follow(reg, p, param.device)
        param.copy_(_composed(reg, p).view_as(param))
        training = [d for d in _on(reg, p) if not d.merged]
        if training and not any(d.sparse.collecting for d in training):
            idx = _mask(reg, p)
            if idx is not None:
                hooks.append(param.register_hook(functools.partial(_mask_grad, idx)))
    if hooks:
        reg.__dict__["sparse_hooks"] = hooks


# ---------------------------------------------------------------------------
# Choosing a mask: global top-k of a score over every chosen tensor
# ---------------------------------------------------------------------------

def budget(density: float, total: int) -> int:
    return max(1, min(total, round(density * total)))


def top_k(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Sorted flat indices per tensor of the k largest scores over all of them together."""
    flat = torch.cat([s.reshape(-1).float() for s in scores.values()])
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[torch.topk(flat, k, sorted=False).indices] = True
    out, start = {}, 0
    for p, s in scores.items():
        out[p] = keep[start:start + s.numel()].nonzero().view(-1)
        start += s.numel()
    return out


class SparseController(step_hooks.StepController):
    """Keeps one sparse delta's untouched entries exact after each optimizer step and, for the
    selections that need a training signal, chooses the mask at step ``select_at``.

    select: None (mask already fixed), "lt-sft", "movement" or "fish" (see methods/sparse_ft.py).
    """

    def __init__(self, model: nn.Module, name: str, select: str | None = None, density: float = 1.0,
                 select_after: int | float | None = None):
        self.model, self.name = weakref.ref(model), name
        self.select, self.density, self.select_after = select, density, select_after
        self.select_at = select_after if isinstance(select_after, int) else None
        self.scores: dict[str, torch.Tensor] = {}     # movement: -sum g*W; FISH: sum g^2
        self.optimizer = None                          # step_hooks: a weak reference to the optimizer stepping it
        self._params = None                            # resolved on first use: the delta is registered after install

    def _delta(self):
        model = self.model()
        reg = None if model is None else model.__dict__.get("_unipeft")
        if reg is None or self.name not in reg.deltas:
            return None, None, None
        return model, reg, reg.deltas[self.name]

    def parameters(self):
        model, reg, delta = self._delta()
        if delta is None or delta.sparse is None:
            return []
        if self._params is None:
            self._params = {p: model.get_parameter(p) for p in delta.sparse.values}
        return list(self._params.values())

    def set_total_steps(self, total: int) -> None:
        if isinstance(self.select_after, float):
            self.select_at = max(1, round(self.select_after * total))

    def done(self) -> None:
        self.select, self.scores = None, {}

    # the scores gathered so far (movement, FISH): a run resumed before the selection chooses from every
    # step's gradients, as the uninterrupted run does, not only from those after the checkpoint. As large
    # as the delta's tensors (float32), and only until the mask is chosen
    def state(self) -> dict[str, torch.Tensor]:
        return {f"score.{p}": s for p, s in self.scores.items()}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.parameters()  # resolves self._params, name -> parameter (None while the delta is not registered)
        params = self._params or {}
        self.scores = {}
        for key, t in tensors.items():
            p = key[len("score."):]
            if key.startswith("score.") and p in params:
                self.scores[p] = t.to(params[p].device).clone()

    def lost_on_resume(self, steps):
        if self.select in ("movement", "fish") and (self.select_at is None or steps < self.select_at):
            return (f"SparseFT's {self.select} scores of steps 1-{steps} (its mask would be chosen from the later "
                    f"steps' gradients only)")
        return None

    @torch.no_grad()
    def before(self) -> None:
        if self.select is None:
            return
        if self.select_at is None:
            raise UnipeftError(f"SparseFT: select_after={self.select_after!r} is a fraction of the run, but the run's "
                               f"length is unknown: pass select_after as a number of steps in a plain loop "
                               f"(unipeft train and up.integrations.SaveDeltaCallback give the length)")
        if self.steps >= self.select_at:  # a run resumed past its selection: the checkpoint's weights hold the mask
            model, reg, delta = self._delta()
            recover(model, reg, delta, self)
            return
        if self.select not in ("movement", "fish"):
            return
        for p, param in self._params.items():
            g = param.grad
            if g is None:
                continue
            s = -(g * param) if self.select == "movement" else g.float() ** 2
            self.scores[p] = self.scores[p] + s if p in self.scores else s.clone()
            if self.select == "fish":
                g.zero_()  # the Fisher is estimated before training: this step changes nothing

    @torch.no_grad()
    def after(self) -> None:
        model, reg, delta = self._delta()
        if delta is None or self.name not in reg.active or delta.merged:
            return
        if self.select is not None and self.steps >= self.select_at:
            choose(model, reg, delta, self)
            return
        for p in self._params:  # entries outside the masks back (weight decay), memory = original + values
            settle(model, reg, p)


@torch.no_grad()
def choose(model: nn.Module, reg, delta, controller: SparseController) -> None:
    """Fix the mask of a delta in its selection phase: top-k of its score (LT-SFT: how far each
    entry moved in the dense phase; movement: -sum g*W; FISH: sum g^2), then LT-SFT and FISH
    restart from the pretrained values, movement keeps the trained values of the kept entries."""
    state, select = delta.sparse, controller.select
    if delta.name in reg.active:
        sync(model, reg)
    if select == "lt-sft":
        scores = {p: v.abs() for p, v in state.values.items()}
    else:
        scores = {p: controller.scores[p].reshape(-1) if p in controller.scores  # no gradient yet: score 0
                  else torch.zeros(state.numel[p], device=v.device) for p, v in state.values.items()}
    chosen = top_k(scores, budget(controller.density, sum(state.numel.values())))
    for p, idx in chosen.items():
        old = state.values[p]
        keep = old[idx] if select == "movement" and state.indices[p] is None else None
        state.set(p, idx, keep, like=old)
    state.collecting = False
    controller.done()
    optimizer = controller.optimizer() if controller.optimizer is not None else None
    if optimizer is not None and select == "lt-sft":
        # phase two starts from the pretrained values: the dense phase's moments would carry it on
        for param in controller.parameters():
            for key, value in optimizer.state.get(param, {}).items():
                if key != "step" and torch.is_tensor(value) and value.shape == param.shape:
                    value.zero_()
    if delta.name in reg.active:
        compose(model, reg)


@torch.no_grad()
def recover(model: nn.Module, reg, delta, controller: SparseController) -> None:
    """The mask of a run resumed from a checkpoint written after the selection (a checkpoint holds
    the weights, not the mask): the entries that differ from the pretrained values, with those
    differences as values. Gradients of the step under way are masked to them too."""
    state = delta.sparse
    for p, param in controller._params.items():
        diff = (param.detach() - delta.selected[p].to(param.device)).reshape(-1)
        idx = diff.nonzero().view(-1)
        state.set(p, idx, diff[idx], like=param)
        if param.grad is not None:
            param.grad.copy_(_mask_grad(idx, param.grad))
    state.collecting = False
    controller.done()
    compose(model, reg)


def finalize(model: nn.Module, name: str) -> nn.Module:
    """Fix delta ``name``'s final form in the live model: DiffPruning projects to its exact budget;
    a SparseFT delta still choosing its mask chooses it now. Other methods: nothing to do."""
    from .engine import _require

    reg, delta = _require(model, name)
    own = getattr(delta.config, "finalize", None)
    if own is not None:
        own(model, reg, delta)
    elif delta.sparse is not None and delta.sparse.controller is not None and delta.sparse.controller.select:
        choose(model, reg, delta, delta.sparse.controller)
    return model


# ---------------------------------------------------------------------------
# Storage: ``sparse:<tensor>.indices`` (int32 where the tensor allows) and ``sparse:<tensor>.values``
# ---------------------------------------------------------------------------

def export(model: nn.Module, reg, delta) -> dict[str, torch.Tensor]:
    """The delta's tensors for ``up.save``; an active delta is synced first, and the model written
    again from the values, so the file and the model in memory are the same."""
    if delta.name in reg.active:
        sync(model, reg)
        compose(model, reg)
    out = {}
    for p, values in delta.sparse.values.items():
        idx = delta.sparse.indices[p]
        if idx is None:
            idx = torch.arange(values.numel(), device=values.device)
        out.update(file_tensors(p, idx, values, delta.sparse.numel[p]))
    return out


def file_tensors(p: str, idx: torch.Tensor, values: torch.Tensor, numel: int) -> dict[str, torch.Tensor]:
    """The file's two tensors for base tensor ``p`` (``numel`` entries): its indices (int32 where they fit)
    and the values at them."""
    return {f"{PREFIX}{p}.indices": idx.to(torch.int32 if numel < 2 ** 31 else torch.int64),
            f"{PREFIX}{p}.values": values}


def restore(model: nn.Module, reg, delta, tensors: dict[str, torch.Tensor]) -> None:
    """Fill a freshly attached sparse delta from a file's tensors. Everything is checked before
    anything changes; a bad file (indices outside the tensor, repeated, lengths that disagree)
    is one UnipeftError."""
    state = delta.sparse
    want = {f"{PREFIX}{p}.{part}" for p in state.values for part in ("indices", "values")}
    have = {k for k in tensors if k.startswith(PREFIX)}
    if want != have:
        what = sorted(want - have)[:2] or sorted(have - want)[:2]
        raise UnipeftError(f"sparse delta file does not match its method config: "
                           f"{'missing' if want - have else 'unexpected'} {what}")
    checked = {}
    for p in state.values:
        idx, val = tensors[f"{PREFIX}{p}.indices"], tensors[f"{PREFIX}{p}.values"]
        if idx.dim() != 1 or val.dim() != 1 or idx.numel() != val.numel() or idx.is_floating_point() \
                or not val.is_floating_point():
            raise UnipeftError(f"sparse delta file is corrupted: {p!r} needs 1-D integer indices and as many "
                               f"floating values, got {tuple(idx.shape)} {idx.dtype} and "
                               f"{tuple(val.shape)} {val.dtype}")
        idx = idx.long()
        n = state.numel[p]
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise UnipeftError(f"sparse delta file is corrupted: indices of {p!r} fall outside the base tensor "
                               f"({n} entries; found {int(idx.min())}..{int(idx.max())})")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise UnipeftError(f"sparse delta file is corrupted: indices of {p!r} are not strictly increasing")
        checked[p] = (idx, val)
    for p, (idx, val) in checked.items():
        like = state.values[p]
        state.set(p, idx, val, like=like)
    state.collecting = False
    if state.controller is not None:
        state.controller.done()  # a saved mask is fixed
    if delta.name in reg.active:
        compose(model, reg)


def attach_state(view, params: list[str], indices: dict[str, torch.Tensor | None],
                 controller: SparseController) -> SparseState:
    """Make the delta being installed a sparse delta over ``params`` (base parameter paths)."""
    base = view.base_parameters()
    missing = [p for p in params if p not in base]
    if missing:
        raise UnipeftError(f"sparse delta: {missing[0]!r} is not a base parameter of this model")
    state = SparseState({p: base[p] for p in params}, indices)
    state.controller = controller
    step_hooks.register(controller, [])
    view.select_sparse(params, state)
    return state
