"""Hidden states at chosen tokens as a position: h_t <- h_t + v_l at the input of every layer l,
for the tokens t a delta chose (PASTA: the special tokens). See the package docstring.

One ``HiddenSite`` per stack of blocks that reads the input (a decoder-only or encoder-only
model, or the encoder of an encoder-decoder). It needs to know which token sits where, and
reads that where the model itself reads it: the stack's input embedding, whose first argument
is the token ids (a forward hook records, per active delta, the (row, column, vector) of every
chosen token, from each row's own ids: mixed batches and pairs are fine). A forward pre-hook on
every block then adds layer l's vectors at those places, out of place, so gradients reach the
vectors and the frozen base sees nothing else.

Tokens an input position prepends (a soft prompt) sit before the user's tokens: the hidden
states are then longer than the ids, and the columns shift by the difference. Inputs given as
``inputs_embeds`` carry no ids: the site refuses them rather than guess (each pass of the stack
forgets the ids of the last one). Blocks recomputed in the backward pass (gradient
checkpointing) use the ids of the latest forward pass.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

from ..errors import UnipeftError
from .inputs import stack_embedding


class TokenSource:
    """What a delta puts at a hidden site: ``hits(ids)`` -> (rows, columns, vector index) of its
    chosen tokens in a batch of ids, and ``vectors(layer)`` -> (K, d), the vectors of that layer
    (None for a layer the delta does not act on)."""

    def hits(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def vectors(self, layer: int) -> torch.Tensor:
        raise NotImplementedError


class HiddenSite:
    """Adds each active (or, under ``up.route``, each row's) delta's vectors to the hidden states
    of its chosen tokens at the input of every block of one stack."""

    def __init__(self, stack: nn.Module, embed: nn.Module, blocks: list[nn.Module]):
        self.stack, self.embed, self.blocks = stack, embed, blocks
        self.sources: dict[str, TokenSource] = {}
        self.active: tuple = ()
        self.route = None
        self.routed: tuple = ()
        self._hits: list | None = None   # [(source, rows, cols, which)] of the last ids looked up
        self._n_ids = 0                  # their length
        # a new pass forgets the last one's ids (first of the stack's hooks: an input site's hook may
        # look the ids up itself, and must find them recorded)
        self._embed_hook = embed.register_forward_hook(self._on_ids)
        self._handles = [stack.register_forward_pre_hook(self._forget, prepend=True)]
        # a partial of a bound method, not a closure: copy.deepcopy(model) copies it onto the copy's site
        self._handles += [b.register_forward_pre_hook(functools.partial(self._add, i), with_kwargs=True)
                          for i, b in enumerate(blocks)]

    # --- life cycle (the engine's) -------------------------------------------------------------
    def refresh(self, active: list[str]) -> None:
        self.active = tuple(self.sources[n] for n in active if n in self.sources)

    def unipeft_route(self, route) -> None:
        """Route rows to deltas (``unipeft.routing.Route``), or None to go back to the active ones."""
        self.route = route
        self.routed = () if route is None else tuple((n, self.sources[n]) for n in route.order if n in self.sources)

    def remove(self) -> None:
        for h in (*self._handles, self._embed_hook):
            h.remove()
        self._hits = None

    # --- the hooks -----------------------------------------------------------------------------
    def _forget(self, module, args):
        self._hits = None
        embed = stack_embedding(self.stack, self.embed)
        if embed is not self.embed:  # a new embedding module (resize_token_embeddings): read the ids there
            self._embed_hook.remove()
            self.embed, self._embed_hook = embed, embed.register_forward_hook(self._on_ids)
        return None

    def _on_ids(self, module, args, output):
        ids = args[0] if args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point() else None
        if ids is None or ids.dim() != 2:
            self._hits = None
            return None
        self._n_ids = ids.shape[1]
        if self.route is not None:
            hits = []
            for name, src in self.routed:
                rows = self.route.rows(name, ids.shape[0], ids.device, where=self)
                if rows.numel():
                    r, c, w = src.hits(ids.index_select(0, rows))
                    hits.append((src, rows.index_select(0, r), c, w))
            self._hits = hits
        else:
            self._hits = [(src, *src.hits(ids)) for src in self.active]
        return None

    def _add(self, layer: int, module, args, kwargs):
        if not self.active and not self.routed:
            return None
        if self._hits is None:
            raise UnipeftError("a delta at the hidden states of chosen tokens (PASTA) needs the token ids: call "
                               "the model with input_ids, not inputs_embeds")
        hits = [h for h in self._hits if h[1].numel()]
        if not hits:
            return None
        where, h = _hidden_argument(args, kwargs, self._n_ids)
        offset = h.shape[1] - self._n_ids  # prompt positions prepended before the user's tokens
        for src, rows, cols, which in hits:
            v = src.vectors(layer)
            if v is None:  # a delta on some layers only (layers=)
                continue
            v = v.to(h.dtype).index_select(0, which)
            h = h.index_put((rows, cols + offset), v, accumulate=True)
        if isinstance(where, int):
            return (*args[:where], h, *args[where + 1:]), kwargs
        return args, {**kwargs, where: h}


def _hidden_argument(args, kwargs, n_ids: int):
    """(where, tensor): the block's input hidden states, found by type and shape (the first
    floating tensor (batch, >= n_ids, d)), positional or keyword, whatever transformers names it."""
    def fits(t):
        return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == 3 and t.shape[1] >= n_ids
    for i, a in enumerate(args):
        if fits(a):
            return i, a
    for k, a in kwargs.items():
        if fits(a):
            return k, a
    raise UnipeftError(f"a block's input holds no hidden states of at least {n_ids} positions for the "
                       f"chosen-token vectors")


def blocks_under(model: nn.Module, mmap, stack_path: str) -> list[nn.Module]:
    """The blocks of the input stack at ``stack_path`` ("" for the whole model), lowest first."""
    prefix = stack_path + "." if stack_path else ""
    return [model.get_submodule(b.path) for b in mmap.blocks if b.path.startswith(prefix)]
