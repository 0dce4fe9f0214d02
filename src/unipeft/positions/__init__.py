"""Insertion points: where a delta meets the base model. Each is implemented once, in its own module.

He et al. (seed 002) show every PEFT method is a function inserted at a
position and composed sequentially, in parallel or scaled. unipeft has five
kinds of position and every method uses one or more of them:

* ``LinearSite`` -- a linear map of the base model (``nn.Linear`` or GPT-2's
  ``Conv1D``). It covers the weight (LoRA: h = W0 x + s B A x), the output of a
  sublayer (sequential adapters: h <- h + f(h)), beside a sublayer (parallel
  adapters read the sublayer's input through a *tap*), activations ((IA)3:
  h * l), and whole replacement (a task head owned by one delta).
* ``AttentionSite`` -- the keys and values inside an attention module
  (prefix tuning: concat(P_k, K), concat(P_v, V)). It works through the
  ``transformers`` attention interface, *not* the KV cache, so the cache can
  change shape or class between releases without breaking prefixes.
* ``InputSite`` -- the input embeddings of a stack (prompt tuning:
  concat(P, E(x)), with the attention mask extended to match).
* ``HiddenSite`` -- the hidden states of chosen tokens at the input of every
  block of a stack (PASTA: h_t + v_l at the special tokens).
* ``LossSite`` -- the loss the model returns (AdaMix: a consistency term
  between two passes; NewTokens: the LM loss over logits wider than the
  base's vocabulary).

A site holds any number of named deltas; the active ones are applied in the
order they were activated. Sites do not know which method put a delta there.

Every site also has a *routed* form (``unipeft.routing``): under ``up.route`` each row of a
batch gets the delta named for it; see ``routing.py`` for how a new position supports that.
"""
from .attention import (KVSource, AttentionSite, attention_site, attention_with_prefix, current_attention,
                        disable_attention_sites, enable_attention_sites)
from .hidden import HiddenSite, TokenSource, blocks_under
from .loss import LossSite
from .inputs import InputSite
from .linear import LinearDelta, LinearSite, class_rows, install_linear_site, linear_shape, uninstall_linear_site

__all__ = ["LinearDelta", "LinearSite", "class_rows", "install_linear_site", "uninstall_linear_site", "linear_shape",
           "KVSource", "AttentionSite", "attention_site", "attention_with_prefix", "current_attention",
           "enable_attention_sites", "disable_attention_sites", "InputSite",
           "HiddenSite", "TokenSource", "blocks_under", "LossSite"]
