"""GPT-1's auxiliary language-modelling objective (Radford et al. 2018, eq. 5; seed 003:
L3 = L2 + lambda * L1), added by the trainer when ``aux_lm_weight`` > 0: for causal-LM tasks from
the logits already there, for classification on a decoder-only model from the final hidden states
and the input embeddings. (PET's auxiliary loss on unlabelled text, which also covers masked LMs,
is its own: ``prompting/pet.py``.)
"""
from __future__ import annotations

import torch

from ..errors import UnipeftError
from .batching import IGNORE
from .tasks import Task


class AuxLM:
    """lambda x next-token loss on the input text (Radford et al. 2018, eq. 5: L3 = L2 + lambda L1).

    Causal-LM tasks already have the logits: the auxiliary loss covers the prompt tokens, which
    the task loss leaves out. Classification on a decoder-only model reads the decoder's final
    hidden states and scores the next token with the input embeddings (tied, as in GPT-1).
    """

    def __init__(self, model, task: Task, weight: float):
        from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                             MODEL_FOR_MASKED_LM_MAPPING_NAMES)
        mt = model.config.model_type
        if (getattr(model.config, "is_encoder_decoder", False) or mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
                or mt in MODEL_FOR_MASKED_LM_MAPPING_NAMES):
            raise UnipeftError(f"aux_lm_weight needs a decoder-only language model (GPT-2, Llama, OPT, ...); "
                               f"{mt!r} is not one")
        if task.kind not in ("classification", "regression", "causal_lm", "chat"):
            raise UnipeftError(f"aux_lm_weight applies to classification, regression, causal_lm and chat tasks, "
                               f"not {task.kind!r}")
        self.weight, self.task, self.hidden = weight, task, None
        self.hook = None
        if not task.causal:
            stack = model.base_model
            self.embeddings = model.get_input_embeddings()
            self.hook = stack.register_forward_hook(self._capture)

    def _capture(self, module, args, output):
        self.hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state

    def loss(self, batch, outputs) -> torch.Tensor:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        targets = ids.masked_fill(mask == 0, IGNORE)
        if self.task.causal:
            logits = outputs.logits
            targets = targets.masked_fill(batch["labels"] != IGNORE, IGNORE)  # the prompt only
        else:
            logits = self.hidden @ self.embeddings.weight.t()
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten(),
                                                 ignore_index=IGNORE)

    def close(self):
        if self.hook is not None:
            self.hook.remove()
