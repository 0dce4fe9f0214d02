"""What a task is: its kind, which columns hold the inputs and the target, its labels and metrics.

A ``Task`` is plain data shared by the data readers (``data.py``), the encoder
(``batching.py``), the trainer and the metrics. Five kinds cover the tasks:

* ``classification`` -- one sentence or a pair -> one of ``labels`` (SST-2, CoLA, RTE, MRPC, BBC News)
* ``regression``     -- one sentence or a pair -> a number (STS-B)
* ``causal_lm``      -- a decoder continues ``source`` with ``target`` (instructions, E2E table-to-text)
* ``seq2seq``        -- an encoder reads ``source``, the decoder writes ``target`` (T5, BART)
* ``chat``           -- conversations in the model's chat template, the loss on assistant turns (``chat.py``)

An example is a dict with the keys ``text`` (str), optionally ``text_pair`` (str), and
``target``: the label id (int) for classification, a float for regression, the target
string for generation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UnipeftError, choices

KINDS = ("classification", "regression", "causal_lm", "seq2seq", "chat")
GENERATION_KINDS = ("causal_lm", "seq2seq", "chat")
DECODER_KINDS = ("causal_lm", "chat")  # a decoder-only LM reads the prompt and writes the target after it

# metric -> True when larger is better
METRICS = {
    "accuracy": True, "f1": True, "matthews": True, "pearson": True, "spearman": True,
    "bleu": True, "rouge_l": True, "nist": True, "chrf": True, "loss": False,
}


@dataclass(frozen=True)
class Task:
    name: str
    kind: str
    labels: tuple[str, ...] | None = None      # classification only: label names, index = label id
    metrics: tuple[str, ...] = ()
    main_metric: str = ""
    pair: bool = False                          # classification/regression: two input sentences
    prompt_template: str = "{source}\n"         # causal_lm: how the source is shown to the decoder
    chat_template: str | None = None            # chat: a Jinja template (None: the tokenizer's own)
    description: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UnipeftError(f"task {self.name!r}: unknown kind {self.kind!r}; valid kinds: {choices(KINDS)}")
        if self.kind == "classification" and not self.labels:
            raise UnipeftError(f"task {self.name!r}: a classification task needs its label names")
        metrics = self.metrics or default_metrics(self.kind, len(self.labels or ()))
        for m in metrics:
            if m not in METRICS:
                raise UnipeftError(f"task {self.name!r}: unknown metric {m!r}; valid metrics: {choices(METRICS)}")
        object.__setattr__(self, "metrics", tuple(metrics))
        if not self.main_metric:
            object.__setattr__(self, "main_metric", metrics[0])
        elif self.main_metric not in metrics and self.main_metric != "loss":
            raise UnipeftError(f"task {self.name!r}: main metric {self.main_metric!r} is not one of {choices(metrics)}")
        if "{source}" not in self.prompt_template:
            raise UnipeftError(f"task {self.name!r}: prompt_template must contain '{{source}}'")

    @property
    def num_labels(self) -> int:
        """Outputs of the task head: the number of classes, or 1 for regression."""
        return len(self.labels) if self.kind == "classification" else 1

    @property
    def generative(self) -> bool:
        return self.kind in GENERATION_KINDS

    @property
    def causal(self) -> bool:
        """A decoder-only language model's task: the target follows the prompt in one sequence."""
        return self.kind in DECODER_KINDS

    def higher_is_better(self, metric: str | None = None) -> bool:
        return METRICS[metric or self.main_metric]


def default_metrics(kind: str, num_labels: int = 0) -> tuple[str, ...]:
    if kind == "classification":
        return ("accuracy", "f1") if num_labels == 2 else ("accuracy",)
    if kind == "regression":
        return ("pearson", "spearman")
    return ("bleu", "rouge_l")
