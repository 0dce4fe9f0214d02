"""Sparse fine-tuning (seed 004 "Sparse fine-tuning"; Ansell et al. 2022, LT-SFT; Sung et al. 2021, FISH).

The notes: "use a mask to identify a sparse subset of weights and only update a subset of
weights during training"; "weights are added to the pretrained model, theta_{tau,l} = theta +
delta_tau + delta_l"; "maintain a vector of indices eta vs a dense binary mask". How the k =
density * N entries are chosen (``select``), over the weights and biases of the target maps:

  lt-sft    "all parameters are first fine-tuned (once), then parameters that changed the most
            are selected": train every entry for ``select_after`` optimizer steps, keep the k
            with the largest |theta - theta_0|, reset to theta_0, retrain only those;
  magnitude "selects weights that are far from 0": the k largest |theta_0|, no training signal;
  movement "selects weights that move away from 0" (Sanh et al. 2020): train every entry for
            ``select_after`` steps accumulating S = -sum_t dL/dtheta * theta, keep the k largest
            S (they keep what they learnt; the others go back to theta_0);
  fish      the k largest empirical Fisher information sum_t (dL/dtheta)^2 over ``select_after``
            batches before training (those steps change nothing), then train only them.

The selection runs by itself at the optimizer step ``select_after`` of any training loop
(``unipeft.sparse.SparseController`` on ``step_hooks``); ``select_after`` is a number of steps,
or a fraction of the run where the loop says how long it is (``unipeft train``,
``up.integrations.SaveDeltaCallback``). The delta is stored as indices + values
(``unipeft.sparse``); a loaded delta's mask is the file's.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from ..config import MethodConfig, check_choice, check_number, check_positive_int, method, normalize_targets
from ..errors import UnipeftError
from .. import sparse

SELECTIONS = ("lt-sft", "magnitude", "movement", "fish")
# how much of the run the signal-driven selections take when select_after is not given
DEFAULT_SELECT_AFTER = {"lt-sft": 0.5, "movement": 0.5, "fish": 0.1}


@method
class SparseFT(MethodConfig):
    """select: "lt-sft", "magnitude", "movement" or "fish"; density: the share of the target
    tensors' entries that change, in (0, 1); select_after: optimizer steps (int >= 1) or a
    fraction of the run (float in (0, 1)) before the mask is fixed (None: 0.5 for lt-sft and
    movement, 0.1 for fish; unused by magnitude); targets: linear maps whose weights and biases
    are candidates (None: every linear map of the blocks)."""

    select: str = "lt-sft"
    density: float = 0.01
    select_after: int | float | None = None
    targets: tuple | None = None
    train_head: bool | list = True

    kind: ClassVar[str] = "sparse_ft"
    method_type: ClassVar[str] = "selective"
    mergeable: ClassVar[bool] = True  # the values are already in the weights: nothing left to fold
    routable: ClassVar[bool] = False  # in-place change of the base weights (up.route says so)

    def validate(self):
        check_choice("SparseFT", "select", self.select, SELECTIONS)
        check_number("SparseFT", "density", self.density, 0, 1, lo_open=True)
        if self.density >= 1:
            raise UnipeftError(f"SparseFT: density must be in (0, 1), got {self.density!r}")
        if isinstance(self.select_after, float):
            if not 0 < self.select_after < 1:
                raise UnipeftError(f"SparseFT: select_after must be a number of steps (int >= 1) or a fraction of "
                                   f"the run in (0, 1), got {self.select_after!r}")
        elif self.select_after is not None:
            check_positive_int("SparseFT", "select_after", self.select_after)
        self.targets = normalize_targets("SparseFT", self.targets)

    def install(self, view, name):
        maps = view.resolve_targets(self.targets or ("all-linear",), "SparseFT")
        base = view.base_parameters()
        params = [f"{m}.{part}" for m in maps for part in ("weight", "bias") if f"{m}.{part}" in base]
        after = self.select_after if self.select_after is not None else DEFAULT_SELECT_AFTER.get(self.select)
        if self.select == "magnitude":
            chosen = sparse.top_k({p: base[p].detach().abs() for p in params},
                                  sparse.budget(self.density, sum(base[p].numel() for p in params)))
            controller = sparse.SparseController(view.model, name)
            sparse.attach_state(view, params, chosen, controller)
            return
        controller = sparse.SparseController(view.model, name, self.select, self.density, after)
        # lt-sft and movement train every entry until the mask is fixed; fish trains none
        indices = {p: (torch.zeros(0, dtype=torch.long) if self.select == "fish" else None) for p in params}
        state = sparse.attach_state(view, params, indices, controller)
        state.collecting = self.select == "fish"
