"""Training, evaluation and prediction: the reusable parts and the runnable recipes.

* ``tasks``      -- what a task is (kind, labels, metrics)
* ``data``       -- reading tasks: builtin layouts (BBC News, GLUE, E2E), CSV/TSV/JSONL, HF datasets
* ``batching``   -- tokenisation (cached), length-grouped batches, dynamic padding
* ``defaults``   -- a learning rate and settings per method, with their sources
* ``trainer``    -- the accelerate-based training loop (``Trainer``, ``TrainConfig``)
* ``checkpoint`` -- atomic, pickle-free checkpoints for ``--resume``
* ``distributed`` -- several processes: the Accelerator for a launch, pickle-free gathers, FSDP2 helpers
* ``evaluation`` -- predictions, generation and metrics on a split
* ``metrics``    -- accuracy, F1, MCC, Pearson/Spearman, BLEU, ROUGE-L, NIST, chrF
* ``run``        -- recipes: train / evaluate / predict a method on a task, end to end

Imported lazily by ``import unipeft`` users: ``from unipeft.training import Trainer``.
"""
from .tasks import Task
from .trainer import TrainConfig, Trainer, TrainingDiverged

__all__ = ["Task", "TrainConfig", "Trainer", "TrainingDiverged"]
