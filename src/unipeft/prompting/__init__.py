"""Prompting with no training and with little data (issue 19; seeds 000, 001, 004).

    import unipeft as up
    t = up.prompting.Template("Review: {text}\\nSentiment: {label}")
    v = up.prompting.Verbalizer({"positive": ["great", "good"], "negative": ["terrible"]})
    up.prompting.classify(model, tokenizer, texts, template=t, verbalizer=v,
                          demonstrations=[("a fine film", "positive")], calibrate=True)

* ``templates`` / ``verbalizers``: patterns and label words (multi-token words scored whole);
* ``scoring``: batched label scoring, the shared prefix's KV cache reused; causal and masked LMs;
* ``icl``: in-context learning (``unipeft icl``);
* ``head``: prompt-based fine-tuning (``unipeft train --head verbalizer``);
* ``pet``: PET and iPET (``unipeft pet``).
"""
from .icl import classify, sample_demonstrations
from .scoring import Scorer
from .templates import Template
from .verbalizers import Verbalizer

__all__ = ["Template", "Verbalizer", "Scorer", "classify", "sample_demonstrations"]
