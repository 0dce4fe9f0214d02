"""Work a delta does at every optimizer step, with no call in the user's training loop.

Some methods change more than their parameters' values as training goes on: DyLoRA draws a new
rank for every step, AdaLoRA smooths importance scores, adds its orthogonality regulariser's
gradient and masks singular values on a schedule. peft leaves those to a call the user must
remember (``update_and_allocate``); forgetting it silently trains plain LoRA. Here the method
registers a ``StepController`` when it is attached, and two process-wide hooks of
``torch.optim`` run it around every ``optimizer.step()`` of every optimizer that holds the
controller's parameters:

    before(): the gradients of the step are complete (after every micro-batch of gradient
              accumulation, after clipping) and the parameters are still those they were computed at;
    after():  the optimizer has updated the parameters (gradients not yet cleared).

So one controller step is one optimizer step whatever the loop looks like: unipeft's trainer,
``transformers.Trainer`` (accelerate's optimizer wrapper steps the torch optimizer once per real
step and never when it skips one), or a plain ``loss.backward(); opt.step()`` loop. A
controller whose parameters got no gradient (its delta switched off, or not in this
optimizer) is left alone. A detached delta's controller goes away with its modules (the
registry holds it weakly).

``steps`` counts the optimizer steps a controller has seen. A resumed run (a checkpoint's
optimizer state loaded into a fresh optimizer) starts from the optimizer's own count of the
steps it took (Adam's ``state["step"]``), so a schedule over the training continues where it
stopped instead of starting again. What else a controller learns between steps (``state()``)
travels in training checkpoints (unipeft's trainer; ``SaveDeltaCallback`` under
``transformers.Trainer``); a run resumed without it warns at its first step, naming what it lost.

``plan(model, total_steps)`` tells a model's controllers how many optimizer steps the training
will take (AdaLoRA's budget schedule needs it): unipeft's trainer calls it, and so does
``integrations.SaveDeltaCallback`` under ``transformers.Trainer``.
"""
from __future__ import annotations

import copy
import warnings
import weakref

import torch
import torch.nn as nn

_CONTROLLERS: "weakref.WeakSet[StepController]" = weakref.WeakSet()
_HOOKS: list = []
# optimizer -> (shape of its parameter groups, ids of its parameters): rebuilt when groups change
_OPTIMIZER_PARAMS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

ATTR = "unipeft_controller"  # the plain attribute a delta module keeps its controller under


class StepController:
    """Subclasses implement ``parameters()``, ``before()`` and ``after()``; ``set_total_steps(n)``
    if they need the length of the training."""

    pending = False  # before() ran for a step whose after() has not yet
    optimizer = None  # a weak reference to the optimizer of the latest step (one that resets its moments)
    steps = 0        # optimizer steps completed (before(): the next is steps + 1; after(): this is steps)
    restored = False  # load_state ran from a checkpoint: a resumed run lost nothing

    def parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def before(self) -> None:
        pass

    def after(self) -> None:
        pass

    def set_total_steps(self, total: int) -> None:
        pass

    def __deepcopy__(self, memo):
        """copy.deepcopy(model) copies the controller with the delta modules that hold it. The copy
        refers (weakly, as the original does) to the copied model and modules, not the original's;
        it runs at the steps of the copy's own optimizer (none yet)."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = None if key == "optimizer" else _follow_weakrefs(value, memo)
        _CONTROLLERS.add(new)
        return new

    def __getstate__(self):
        """pickle (``torch.save(model)``) cannot store weak references: their targets (the model's own
        modules, pickled with it) are stored instead, and made weak again on loading."""
        return {k: None if k == "optimizer" else _weak_to_strong(v) for k, v in self.__dict__.items()}

    def __setstate__(self, state):
        self.__dict__.update({k: _strong_to_weak(v) for k, v in state.items()})
        _install_hooks()
        _CONTROLLERS.add(self)  # an unpickled model's deltas keep their work at every optimizer step

    def state(self) -> dict[str, torch.Tensor]:
        """What a training checkpoint must keep for a resumed run to continue exactly (beyond the
        parameters, the optimizer and ``steps``, which the optimizer's state restores)."""
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take back what ``state()`` gave (from a checkpoint)."""

    def lost_on_resume(self, steps: int) -> str | None:
        """What a run resumed after ``steps`` optimizer steps loses when ``load_state`` never ran (the
        checkpoint came without the controllers' state), said for a warning; None when nothing."""
        return None


def _map_nested(value, leaf):
    """``value`` rebuilt with ``leaf`` applied to everything inside its lists, tuples and dicts."""
    if isinstance(value, (list, tuple)):
        return type(value)(_map_nested(v, leaf) for v in value)
    if isinstance(value, dict):
        return {k: _map_nested(v, leaf) for k, v in value.items()}
    return leaf(value)


def _follow_weakrefs(value, memo):
    """A deep copy of ``value`` in which each weak reference points to the copy of its target."""
    def leaf(v):
        if isinstance(v, weakref.ref):
            target = v()
            return v if target is None else weakref.ref(copy.deepcopy(target, memo))
        return copy.deepcopy(v, memo)
    return _map_nested(value, leaf)


class _Strong:
    """A weak reference's target while pickled (None: the target was gone)."""

    def __init__(self, target):
        self.target = target


class _Gone:
    pass


def dead_reference() -> weakref.ref:
    """A weak reference whose target is gone (a fresh object with no other owner)."""
    return weakref.ref(_Gone())


def _weak_to_strong(value):
    return _map_nested(value, lambda v: _Strong(v()) if isinstance(v, weakref.ref) else v)


def _strong_to_weak(value):
    def leaf(v):
        if isinstance(v, _Strong):  # a reference to a target that was gone stays dead
            return weakref.ref(v.target) if v.target is not None else dead_reference()
        return v
    return _map_nested(value, leaf)


def _install_hooks() -> None:
    if not _HOOKS:
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        _HOOKS.append(register_optimizer_step_pre_hook(_before_step))
        _HOOKS.append(register_optimizer_step_post_hook(_after_step))


def register(controller: StepController, modules) -> None:
    """Run ``controller`` at every optimizer step; ``modules`` (the delta's modules) keep it alive."""
    _install_hooks()
    for m in modules:
        m.__dict__[ATTR] = controller  # a plain attribute: not a submodule, not in the state dict
    _CONTROLLERS.add(controller)


def _param_ids(optimizer) -> frozenset:
    shape = tuple(len(g["params"]) for g in optimizer.param_groups)
    kept = _OPTIMIZER_PARAMS.get(optimizer)
    if kept is None or kept[0] != shape:
        kept = (shape, frozenset(id(p) for g in optimizer.param_groups for p in g["params"]))
        _OPTIMIZER_PARAMS[optimizer] = kept
    return kept[1]


def _before_step(optimizer, args, kwargs) -> None:
    if not _CONTROLLERS:
        return
    ids = _param_ids(optimizer)
    for c in list(_CONTROLLERS):
        params = c.parameters()
        if any(id(p) in ids for p in params) and any(p.grad is not None for p in params):
            if c.steps == 0:
                c.steps = _steps_taken(optimizer, params)
                if c.steps and not c.restored:
                    _warn_lost(c)
            c.optimizer = weakref.ref(optimizer)
            c.before()       # may raise (a missing total_step): the step then never happens
            c.pending = True


def _after_step(optimizer, args, kwargs) -> None:
    for c in list(_CONTROLLERS):
        if c.pending:
            c.pending = False
            c.steps += 1
            c.after()


def _steps_taken(optimizer, params) -> int:
    """The steps ``optimizer`` has already taken on these parameters (a restored state's count), else 0:
    the largest count of any of them, since the optimizer skips a parameter at a step that gave it no
    gradient (robust AdapterDrop's dropped layers), so some parameters' counts lag behind."""
    steps = [optimizer.state.get(p, {}).get("step") for p in params]
    return max((int(s) for s in steps if s is not None), default=0)


def _warn_lost(controller: StepController) -> None:
    lost = controller.lost_on_resume(controller.steps)
    if lost:
        warnings.warn(f"unipeft: the optimizer resumes after step {controller.steps}, but {lost} did not come "
                      f"back with it, so this run departs from the one it resumes. Checkpoints keep it when they "
                      f"are written by `unipeft train` or, under transformers.Trainer, with "
                      f"up.integrations.SaveDeltaCallback() among the callbacks.", stacklevel=3)


def controllers(model: nn.Module) -> list[StepController]:
    """The controllers of the deltas attached to ``model`` (each once)."""
    out: list[StepController] = []
    for m in model.modules():
        c = m.__dict__.get(ATTR)
        if c is not None and c not in out:
            out.append(c)
        # sparse deltas have no modules: their controllers live on the delta, in the registry of the model
        # they were attached to -- which a wrapper (the verbalizer head, DDP) holds as a submodule
        reg = m.__dict__.get("_unipeft")
        for d in (reg.deltas.values() if reg is not None else ()):
            c = getattr(d.sparse, "controller", None)
            if c is not None and c not in out:
                out.append(c)
    return out


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every controller's ``state()`` as flat tensors ``controller.<i>.<key>`` (i: its place in
    ``controllers(model)``), on the CPU: what training checkpoints keep beside the parameters."""
    out = {}
    for i, c in enumerate(controllers(model)):
        for key, val in c.state().items():
            out[f"controller.{i}.{key}"] = val.detach().to("cpu").contiguous()
    return out


def load_state_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Give each controller back its part of ``state_tensors`` (other keys in ``tensors`` are ignored)."""
    from .errors import UnipeftError

    found = controllers(model)
    saved: dict[int, dict] = {}
    for k, t in tensors.items():
        if k.startswith("controller."):
            i, key = k[len("controller."):].split(".", 1)
            saved.setdefault(int(i), {})[key] = t
    if saved and max(saved) >= len(found):
        raise UnipeftError(f"{where} holds the training state of {max(saved) + 1} delta controller(s), this model "
                           f"has {len(found)}: was it made with another method?")
    for i, c in enumerate(found):
        c.load_state(saved.get(i, {}))
        c.restored = True  # a resumed run's first step does not warn that the state is lost


def plan(model: nn.Module, total_steps: int) -> None:
    """Tell every controller of ``model`` that training will take ``total_steps`` optimizer steps."""
    for c in controllers(model):
        c.set_total_steps(int(total_steps))


@torch.no_grad()
def add_grad(param: nn.Parameter, grad: torch.Tensor) -> None:
    """param.grad += grad (created if the backward left none)."""
    if param.grad is None:
        param.grad = grad.to(param.dtype).clone()
    else:
        param.grad.add_(grad.to(param.grad.dtype))
