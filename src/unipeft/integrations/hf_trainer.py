"""unipeft deltas under ``transformers.Trainer`` (and TRL's SFTTrainer, a subclass).

A model with a delta attached is an ordinary ``nn.Module`` whose only trainable
parameters are the delta's, so the Trainer trains it as it is::

    up.attach(model, up.LoRA(r=8, alpha=16), name="sft")
    trainer = Trainer(model=model, args=TrainingArguments("out", activation_checkpointing=True, ...),
                      train_dataset=..., callbacks=[up.integrations.SaveDeltaCallback()])
    trainer.train()
    up.load(fresh_base, "out/unipeft/sft")                  # the final delta
    up.load(fresh_base, "out/checkpoint-500/unipeft/sft")   # the delta at step 500

What is saved where, and why:

* ``trainer.save_model()`` and every ``checkpoint-*`` keep what transformers
  writes: ``save_pretrained`` of the whole model. Its ``model.safetensors``
  holds the base weights *and* the delta's tensors (under their
  ``...unipeft_deltas.<name>...`` names). We do not cut it down to the delta:
  ``resume_from_checkpoint`` and ``load_best_model_at_end`` load that file back
  into the live model and need the delta in it. To resume, attach the same
  method under the same name to a fresh base first, then call
  ``trainer.train(resume_from_checkpoint=...)``; without the delta attached the
  Trainer would drop its tensors as unexpected keys. ``from_pretrained`` on such
  a folder gives the plain base for the same reason.
* ``SaveDeltaCallback`` also tells methods that follow a schedule over the whole
  training how many steps it has (AdaLoRA's ``total_step``: ``state.max_steps``).
  Everything such methods do at each step runs by itself (``step_hooks``). What
  they learn between steps outside their parameters (AdaLoRA's smoothed
  importance, DyLoRA's next rank) goes into ``checkpoint-N/unipeft/step_state.safetensors``,
  and a run resumed from ``<output_dir>/checkpoint-N`` takes it back, so it
  continues as the uninterrupted run would (from a checkpoint elsewhere: a warning).
* ``SaveDeltaCallback`` adds the delta-only artefact: ``up.save`` of each
  trained delta into ``checkpoint-N/unipeft/<name>/`` at every checkpoint and
  into ``<output_dir>/unipeft/<name>/`` when training ends (after
  ``load_best_model_at_end``, so that one is the best delta). These are the
  small fingerprinted folders to keep, ``up.push`` or ``up.load`` onto a base.
  A delta with a final form (DiffPruning's projection to its budget) is written
  in that form; at a checkpoint without taking it (``up.save(..., keep_training=True)``),
  so the training goes on with the delta it was training.

Gradient checkpointing needs nothing from unipeft with transformers >= 5: the
Trainer checkpoints non-reentrantly by default, and for models fed
``input_ids`` it hooks the input embeddings so their output requires grad
(``enable_input_require_grads``), which is what reentrant checkpointing needs to
send gradients to a delta behind a frozen embedding. Both modes are tested.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

from transformers import TrainerCallback

from .. import step_hooks
from ..engine import registry
from ..errors import UnipeftError, choices
from ..storage import save


class SaveDeltaCallback(TrainerCallback):
    """Write unipeft deltas into every Trainer checkpoint and into the output dir at the end.

    names: the deltas to save (default: those active when saving, i.e. the ones
    being trained); folder: the sub-folder they go to, one folder per delta.
    """

    def __init__(self, names: list[str] | str | None = None, folder: str = "unipeft"):
        if isinstance(names, str):
            names = [names]
        if not isinstance(folder, str) or not folder or os.sep in folder or folder in (".", ".."):
            raise UnipeftError(f"SaveDeltaCallback: folder must be a plain folder name such as 'unipeft', "
                               f"got {folder!r}")
        self.names = list(names) if names is not None else None
        self.folder = folder

    def _deltas(self, model) -> tuple[object, list[str]]:
        model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper keeps the registry on the original
        reg = registry(model) if model is not None else None
        if reg is None or not reg.deltas:
            raise UnipeftError("SaveDeltaCallback: the Trainer's model has no unipeft delta attached; "
                               "call up.attach(model, ...) before creating the Trainer")
        names = self.names if self.names is not None else list(reg.active)
        unknown = [n for n in names if n not in reg.deltas]
        if unknown:
            raise UnipeftError(f"SaveDeltaCallback: no delta named {unknown[0]!r}; attached deltas: "
                               f"{choices(list(reg.deltas))}")
        if not names:
            raise UnipeftError(f"SaveDeltaCallback: no delta is active, so none is being trained; pass names= "
                               f"(attached deltas: {choices(list(reg.deltas))})")
        return model, names

    def _save(self, model, directory: Path, training: bool = False):
        """Save the deltas into ``directory``; returns the model that holds them (a compile wrapper seen through).

        ``up.save`` gives a delta that has a final form (DiffPruning's projection to its budget) that form
        in the live model too. In the middle of training that would swap the parameters the optimizer
        trains for others and end the training at the first checkpoint, so checkpoints write the final
        form without taking it (``keep_training=True``); the end of training takes it."""
        model, names = self._deltas(model)
        for n in names:
            save(model, directory / self.folder / n, name=n, keep_training=training)
        return model

    STEP_STATE = "step_state.safetensors"

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model, _ = self._deltas(model)  # fail before the first step, not at the first checkpoint
        # methods that follow a schedule over the whole training (AdaLoRA's rank budget) learn its length
        step_hooks.plan(model, state.max_steps)
        if state.global_step > 0:  # resumed: the Trainer restored the state of this checkpoint
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / self.folder / self.STEP_STATE
            if path.is_file():
                from safetensors.torch import load_file

                step_hooks.load_state_tensors(model, load_file(str(path)), str(path))
            elif any(c.state() for c in step_hooks.controllers(model)):
                warnings.warn(f"SaveDeltaCallback: resumed at step {state.global_step} without {path}: the deltas' "
                              f"state between steps (AdaLoRA's importance, DyLoRA's rank) starts afresh", stacklevel=2)

    def on_save(self, args, state, control, model=None, **kwargs):
        if not args.should_save:  # only the main process writes, as the Trainer does
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not checkpoint.is_dir():
            # a hyperparameter search puts checkpoints under run-*/: writing here would make a
            # checkpoint-N folder without a model that resume_from_checkpoint would then pick up
            raise UnipeftError(f"SaveDeltaCallback: the Trainer saved no checkpoint folder at {str(checkpoint)!r}; "
                               f"hyperparameter-search runs are not supported")
        tensors = step_hooks.state_tensors(self._save(model, checkpoint, training=True))
        if tensors:
            from safetensors.torch import save_file

            from ..fileio import atomic_write

            atomic_write(checkpoint / self.folder / self.STEP_STATE, lambda tmp: save_file(tensors, str(tmp)))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if args.should_save:
            self._save(model, Path(args.output_dir))
