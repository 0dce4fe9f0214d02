"""Input embeddings as a position: prompt tuning, a soft prompt in front of E(x) with the
mask, token types and positions extended. See the package docstring."""
from __future__ import annotations

import functools

from typing import Callable

import torch
import torch.nn as nn



# ---------------------------------------------------------------------------
# Input embeddings
# ---------------------------------------------------------------------------

def stack_embedding(stack: nn.Module, fallback: nn.Module) -> nn.Module:
    """The input embedding a stack uses now (``get_input_embeddings()``, transformers' accessor), else
    ``fallback``, the one found at attach. ``resize_token_embeddings`` may put a new module there (T5's
    and BART's encoders get the resized shared embedding): a site must follow it, not keep the old one."""
    try:
        embed = stack.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return fallback
    return embed if isinstance(embed, nn.Module) else fallback


def _tokens_in_cache(kwargs: dict, mask: torch.Tensor | None, q_len: int, p: int) -> int:
    """How many earlier positions (prompt included) a stack's KV cache holds: 0 on a fresh pass.

    The cache is found by its type, not by its keyword: transformers 5.24 renamed
    ``past_key_values`` to ``cache`` and the keyword may move again; the class it passes
    (a ``transformers`` ``Cache``) did not change. Should no ``Cache`` be visible, the shape
    still tells: a 2-D attention mask longer than the new tokens covers tokens already cached
    (the user's mask never includes the p prompt positions).
    """
    from transformers.cache_utils import Cache

    for value in kwargs.values():
        if isinstance(value, Cache):
            return int(value.get_seq_length())
    if mask is not None and mask.dim() == 2 and mask.shape[1] > q_len:
        return mask.shape[1] - q_len + p
    return 0


class InputSite:
    """Prepends vectors to the input embeddings of one stack (a decoder-only
    model, an encoder-only model, or the encoder of an encoder-decoder model).

    The stack's forward gets ``inputs_embeds = concat(P, E(x))`` and an
    attention mask (and token types) extended by p. For a stack whose output
    is the model's output (``strip_output``), the p prompt positions are removed
    from the hidden states, so heads, labels and generated tokens line up with
    the user's tokens. In generation, later steps only extend the mask: the
    prompt already sits in the cache.
    """

    def __init__(self, stack: nn.Module, embed: nn.Module, strip_output: bool, decoder: nn.Module | None = None):
        self.stack, self.embed, self.strip_output, self.decoder = stack, embed, strip_output, decoder
        self.sources: dict[str, Callable[[int], torch.Tensor]] = {}
        self.active: tuple = ()
        self._p_last = 0
        self.route = None          # per-example routing (unipeft.routing.Route), or None
        self.routed: tuple = ()    # ((name, source), ...) of the routed deltas this site holds
        self._rows_last = None     # routed fresh pass: (prompt lengths per row, P, L) for _post and later steps
        self._handles = [
            stack.register_forward_pre_hook(self._pre, with_kwargs=True),
            stack.register_forward_hook(self._post, with_kwargs=True),
        ]
        if decoder is not None:
            self._handles.append(decoder.register_forward_pre_hook(self._decoder_pre, with_kwargs=True))

    def refresh(self, active: list[str]) -> None:
        self.active = tuple(self.sources[n] for n in active if n in self.sources)

    def unipeft_route(self, route) -> None:
        """Route rows to prompts (``unipeft.routing.Route``), or None to go back to the active ones."""
        self.route, self._rows_last = route, None
        self.routed = () if route is None else tuple((n, self.sources[n]) for n in route.order if n in self.sources)

    def remove(self):
        for h in self._handles:
            h.remove()

    def _prompt(self, batch: int) -> torch.Tensor | None:
        if not self.active:
            return None
        parts = [src(batch) for src in self.active]
        return torch.cat(parts, dim=1)

    def _pre(self, module, args, kwargs):
        if self.route is None and not self.active:
            self._p_last = 0
            return None
        if args:  # name positional arguments so the ones we extend are found wherever they were passed
            kwargs = {**dict(zip(_forward_parameters(module)[0], args)), **kwargs}
            args = ()
        if self.route is not None:
            return self._routed_pre(module, kwargs)
        ids = kwargs.get("input_ids")
        embeds = kwargs.get("inputs_embeds")
        mask = kwargs.get("attention_mask")
        ref = embeds if embeds is not None else ids
        batch, q_len = ref.shape[0], ref.shape[1]
        p = sum(s.length for s in self.active)
        past_len = _tokens_in_cache(kwargs, mask, q_len, p)
        if past_len == 0:  # a fresh pass: prepend the prompt
            if embeds is None:
                embeds = stack_embedding(self.stack, self.embed)(ids)
            prompt = self._prompt(batch).to(embeds.dtype)
            kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
            kwargs["input_ids"] = None
            tt = kwargs.get("token_type_ids")
            if tt is not None:
                kwargs["token_type_ids"] = torch.cat([tt.new_zeros(batch, p), tt], dim=1)
            pos = kwargs.get("position_ids")
            if pos is not None:
                start = torch.arange(p, device=pos.device).expand(pos.shape[0], p)
                kwargs["position_ids"] = torch.cat([start, pos + p], dim=1)
            self._p_last = p
        else:  # generation step: the prompt is in the cache already
            pos = kwargs.get("position_ids")
            if pos is not None and pos.max() < past_len:  # positions computed without the prompt
                kwargs["position_ids"] = pos + p
            self._p_last = 0
        if mask is not None and mask.dim() == 2 and mask.shape[1] < past_len + q_len + (p if past_len == 0 else 0):
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, p), mask], dim=1)
        return args, kwargs

    def _post(self, module, args, kwargs, output):
        p = self._p_last
        if not p or not self.strip_output:
            return output
        if self.route is not None and self._rows_last is not None:  # routed: each row's tokens sit after its prompt
            lengths, prompt_len, n_tokens = self._rows_last
            cols = lengths[:, None] + torch.arange(n_tokens, device=lengths.device)[None, :]

            def strip(h):
                return h.gather(1, cols[..., None].expand(-1, -1, h.shape[-1]))
        else:
            def strip(h):
                return h[:, p:]
        if hasattr(output, "last_hidden_state") and output.last_hidden_state is not None:
            output.last_hidden_state = strip(output.last_hidden_state)
            if getattr(output, "hidden_states", None) is not None:
                output.hidden_states = tuple(strip(h) for h in output.hidden_states)
            pooler = getattr(module, "pooler", None)
            if getattr(output, "pooler_output", None) is not None and callable(pooler):
                # BERT-style poolers read position 0: let them read the user's first token, as
                # heads that take last_hidden_state[:, 0] (RoBERTa, ELECTRA) now do
                output.pooler_output = pooler(output.last_hidden_state)
            return output
        if isinstance(output, tuple):
            return (strip(output[0]),) + output[1:]
        return output

    def _decoder_pre(self, module, args, kwargs):
        enc = kwargs.get("encoder_hidden_states")
        mask = kwargs.get("encoder_attention_mask")
        if self.route is not None and enc is not None and (mask is None or mask.dim() == 2):
            # routed: the encoder's output holds each row's prompt, its tokens, then hidden padding
            lengths, prompt_len = self._routed_lengths(enc.shape[0], enc.device)
            if prompt_len:
                n_tokens = enc.shape[1] - prompt_len
                if mask is None:
                    mask = torch.ones(enc.shape[0], n_tokens, dtype=torch.long, device=enc.device)
                visible = torch.arange(prompt_len, device=enc.device)[None, :] < lengths[:, None]
                kwargs["encoder_attention_mask"] = _arrange(visible.to(mask.dtype), mask, lengths, 0)
                return args, kwargs
            return None
        if enc is None or mask is None or mask.dim() != 2:
            return None
        extra = enc.shape[1] - mask.shape[1]
        if extra > 0:
            kwargs["encoder_attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], extra), mask], dim=1)
            return args, kwargs
        return None

    # --- per-example routing ---------------------------------------------------------------------
    # Row i gets its own prompt P_i of length p_i (0 for rows on the base or on a delta that has no
    # prompt). Rows are laid out as [P_i, x_i, hidden padding] in a sequence of P + L, P the longest
    # prompt of the batch: each row's prompt and tokens start at column 0 as when it runs alone, so
    # absolute, relative and rotary positions all come out as the row's own, with no position ids
    # to invent. Outputs are gathered back per row; later generation steps extend the same layout.

    def _routed_lengths(self, n: int, device) -> tuple[torch.Tensor, int]:
        lengths = torch.zeros(n, dtype=torch.long, device=device)
        for name, src in self.routed:
            rows = self.route.rows(name, n, device, where=self)
            if rows.numel():
                lengths.index_fill_(0, rows, src.length)
        return lengths, int(lengths.max()) if n else 0

    def _routed_prompts(self, n: int, prompt_len: int, like: torch.Tensor) -> torch.Tensor:
        """(n, P, d): row i's prompt in its first p_i columns, zeros after."""
        block = like.new_zeros(n, prompt_len, like.shape[-1])
        for name, src in self.routed:
            rows = self.route.rows(name, n, like.device, where=self)
            if rows.numel():
                prompt = src(len(rows)).to(like.dtype)
                block = block.index_copy(0, rows, torch.nn.functional.pad(prompt, (0, 0, 0, prompt_len - src.length)))
        return block

    def _routed_pre(self, module, kwargs):
        ids, embeds, mask = kwargs.get("input_ids"), kwargs.get("inputs_embeds"), kwargs.get("attention_mask")
        ref = embeds if embeds is not None else ids
        n, q_len, device = ref.shape[0], ref.shape[1], ref.device
        lengths, prompt_len = self._routed_lengths(n, device)
        if not prompt_len:
            self._p_last, self._rows_last = 0, None
            return (), kwargs
        past_len = _tokens_in_cache(kwargs, mask, q_len, prompt_len)
        visible = torch.arange(prompt_len, device=device)[None, :] < lengths[:, None]
        pos = kwargs.get("position_ids")
        if past_len == 0:  # a fresh pass: [P_i, x_i, padding] per row
            if embeds is None:
                embeds = stack_embedding(self.stack, self.embed)(ids)
            prompts = self._routed_prompts(n, prompt_len, embeds)
            kwargs["inputs_embeds"] = _arrange(prompts, embeds, lengths, 0.0)
            kwargs["input_ids"] = None
            user_mask = mask if mask is not None and mask.dim() == 2 else \
                torch.ones(n, q_len, dtype=torch.long, device=device)
            if mask is None or mask.dim() == 2:
                kwargs["attention_mask"] = _arrange(visible.to(user_mask.dtype), user_mask, lengths, 0)
            tt = kwargs.get("token_type_ids")
            if tt is not None:
                kwargs["token_type_ids"] = _arrange(tt.new_zeros(n, prompt_len), tt, lengths, 0)
            if pos is not None:  # positions given for the user's tokens: the prompt takes 0..p_i-1 before them
                start = torch.arange(prompt_len, device=device).expand(n, prompt_len)
                kwargs["position_ids"] = _arrange(start, pos + lengths[:, None], lengths, 0)
            self._p_last, self._rows_last = prompt_len, (lengths, prompt_len, q_len)
            return (), kwargs
        # a generation step: the cache holds the arranged P + L columns, then the new tokens
        if self._rows_last is None:
            raise RuntimeError("unipeft routing: a generation step without its first pass inside the same up.route block")
        n_first = self._rows_last[2]
        if mask is None:  # "see everything" no longer holds: the layout hides each row's padding
            mask = torch.ones(n, past_len - prompt_len + q_len, dtype=torch.long, device=device)
        if mask.dim() == 2:
            first = _arrange(visible.to(mask.dtype), mask[:, :n_first], lengths, 0)
            kwargs["attention_mask"] = torch.cat([first, mask[:, n_first:]], dim=1)
        if pos is not None:
            if pos.min() >= past_len:  # computed from the cache length: P + user tokens so far
                pos = pos - prompt_len
            kwargs["position_ids"] = pos + lengths[:, None]
        elif "position_ids" in _forward_parameters(module)[1]:
            # left to the stack, positions would count the longest prompt, not this row's
            start = past_len - prompt_len + torch.arange(q_len, device=device)
            kwargs["position_ids"] = start[None, :] + lengths[:, None]
        self._p_last = 0
        return (), kwargs


def _forward_parameters(module) -> tuple[list[str], frozenset[str]]:
    """(positional parameter names, all parameter names) of a stack's forward, read once per class:
    the hooks run at every forward and generation step."""
    return _signature(type(module))


@functools.lru_cache(maxsize=None)
def _signature(cls) -> tuple[list[str], frozenset[str]]:
    import inspect

    params = list(inspect.signature(cls.forward).parameters.values())[1:]  # without self
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional, frozenset(p.name for p in params)


def _arrange(prompts: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor, fill) -> torch.Tensor:
    """Per row i: prompts[i, :p_i], then tokens[i], then ``fill`` up to P + L columns.

    prompts (n, P, ...), tokens (n, L, ...), lengths (n,) = p_i -> (n, P + L, ...)."""
    n, prompt_len, n_tokens = prompts.shape[0], prompts.shape[1], tokens.shape[1]
    col = torch.arange(prompt_len + n_tokens, device=lengths.device)[None, :]
    p = lengths[:, None]
    index = torch.where(col < p, col, torch.where(col < p + n_tokens, prompt_len + col - p, prompt_len + n_tokens))
    pad = torch.full((n, 1, *tokens.shape[2:]), fill, dtype=tokens.dtype, device=tokens.device)
    source = torch.cat([prompts.to(tokens.dtype), tokens, pad], dim=1)
    index = index.view(n, -1, *([1] * (tokens.dim() - 2))).expand(n, -1, *tokens.shape[2:])
    return source.gather(1, index)
