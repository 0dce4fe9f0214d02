"""Architecture knowledge, in one declarative table.

Each entry says, for one ``model_type``, where the transformer blocks are and
which module inside a block plays which *role*:

  q, k, v, o      attention query / key / value / output projections
  ffn_in, ffn_out the feed-forward network's input projection(s) and output projection
  attention       the attention modules (self-attention) that compute softmax(QK^T)V
  cross_attention decoder attention over the encoder's output

Patterns are shell globs relative to a block. ``fused`` lists projections that
compute several roles in one matrix (GPT-2's ``c_attn`` computes q, k and v as
three equal slices of its output).

Unknown model types fall back to discovery by common names (``discover``), so a
user is never stuck; an explicit entry only makes it precise.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import re
from typing import Iterator

import torch.nn as nn

from .errors import UnipeftError

ROLES = ("q", "k", "v", "o", "ffn_in", "ffn_out")
GROUPS = {
    "attention": ("q", "k", "v", "o"),
    "ffn": ("ffn_in", "ffn_out"),
    "mlp": ("ffn_in", "ffn_out"),
}
ALIASES = {"query": "q", "key": "k", "value": "v", "attn_out": "o", "attention_output": "o"}


@dataclasses.dataclass(frozen=True)
class Architecture:
    layers: tuple[str, ...]                      # ModuleList paths (suffixes) holding the blocks
    roles: dict[str, tuple[str, ...]]            # role -> glob patterns relative to a block
    attention: tuple[str, ...]                   # self-attention modules relative to a block
    cross_attention: tuple[str, ...] = ()
    fused: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)  # pattern -> roles, equal slices
    # how token positions enter attention: "absolute" (learned or sinusoidal embeddings added to the
    # input), "rotary" (RoPE on queries and keys), "relative" (a bias on the attention scores)
    positions: str = "unknown"


_BERT = Architecture(
    layers=("encoder.layer",),
    roles={
        "q": ("attention.self.query", "crossattention.self.query"),
        "k": ("attention.self.key", "crossattention.self.key"),
        "v": ("attention.self.value", "crossattention.self.value"),
        "o": ("attention.output.dense", "crossattention.output.dense"),
        "ffn_in": ("intermediate.dense",),
        "ffn_out": ("output.dense",),
    },
    attention=("attention.self",),
    cross_attention=("crossattention.self",),
    positions="absolute",
)

_LLAMA = Architecture(
    layers=("layers",),
    roles={
        "q": ("self_attn.q_proj",), "k": ("self_attn.k_proj",), "v": ("self_attn.v_proj",),
        "o": ("self_attn.o_proj",),
        "ffn_in": ("mlp.gate_proj", "mlp.up_proj"), "ffn_out": ("mlp.down_proj",),
    },
    attention=("self_attn",),
    positions="rotary",
)

_BART = Architecture(
    layers=("encoder.layers", "decoder.layers"),
    roles={
        "q": ("self_attn.q_proj", "encoder_attn.q_proj"),
        "k": ("self_attn.k_proj", "encoder_attn.k_proj"),
        "v": ("self_attn.v_proj", "encoder_attn.v_proj"),
        "o": ("self_attn.out_proj", "encoder_attn.out_proj"),
        "ffn_in": ("fc1",), "ffn_out": ("fc2",),
    },
    attention=("self_attn",),
    cross_attention=("encoder_attn",),
    positions="absolute",
)

TABLE: dict[str, Architecture] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "electra": _BERT,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "gemma3_text": _LLAMA,
    "bart": _BART,
    "mbart": _BART,
    "gpt2": Architecture(
        layers=("h",),
        roles={
            "q": ("attn.c_attn",), "k": ("attn.c_attn",), "v": ("attn.c_attn",),
            "o": ("attn.c_proj",),
            "ffn_in": ("mlp.c_fc",), "ffn_out": ("mlp.c_proj",),
        },
        attention=("attn",),
        cross_attention=("crossattention",),
        fused={"attn.c_attn": ("q", "k", "v")},
        positions="absolute",
    ),
    "t5": Architecture(
        layers=("encoder.block", "decoder.block"),
        roles={
            "q": ("layer.0.SelfAttention.q", "layer.1.EncDecAttention.q"),
            "k": ("layer.0.SelfAttention.k", "layer.1.EncDecAttention.k"),
            "v": ("layer.0.SelfAttention.v", "layer.1.EncDecAttention.v"),
            "o": ("layer.0.SelfAttention.o", "layer.1.EncDecAttention.o"),
            "ffn_in": ("layer.*.DenseReluDense.wi", "layer.*.DenseReluDense.wi_0", "layer.*.DenseReluDense.wi_1"),
            "ffn_out": ("layer.*.DenseReluDense.wo",),
        },
        attention=("layer.0.SelfAttention",),
        cross_attention=("layer.1.EncDecAttention",),
        positions="relative",
    ),
}


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear or transformers' transposed Conv1D (GPT-2)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


# ---------------------------------------------------------------------------
# A concrete model mapped through its architecture entry
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Block:
    index: int          # global index over all stacks (encoder blocks first)
    path: str           # module path of the block
    stack: str          # path of the ModuleList it belongs to
    position: int       # index inside its stack
    stack_size: int


@dataclasses.dataclass
class ModelMap:
    """Where things are in one concrete model."""

    model_type: str
    blocks: list[Block]
    roles: dict[str, set[str]]                # module path -> roles it plays
    fused: dict[str, tuple[str, ...]]         # module path -> roles of its equal output slices
    attention: list[tuple[str, Block, str]]   # (module path, block, "self" | "cross")
    discovered: bool = False
    positions: str = "unknown"                # the architecture's position encoding (see Architecture)

    def modules_with_role(self, role: str) -> list[str]:
        return [p for p, rs in self.roles.items() if role in rs]

    def shared_input_groups(self, paths) -> list[list[str]]:
        """Groups (two or more) of ``paths`` that read the same input tensor: the q, k and v
        projections of one self-attention module, and the FFN input projections of one block
        (gate and up). A fused projection (GPT-2's c_attn) is one map already."""
        groups = []
        for attn_path, _, kind in self.attention:
            if kind != "self":
                continue  # cross-attention: q reads the decoder, k and v the encoder
            members = [p for p in paths if p.startswith(attn_path + ".") and p not in self.fused
                       and self.roles.get(p, set()) & {"q", "k", "v"}]
            if len(members) > 1:
                groups.append(members)
        for b in self.blocks:
            members = [p for p in paths if "ffn_in" in self.roles.get(p, ()) and self.block_of(p) is b]
            if len(members) > 1:
                groups.append(members)
        return groups

    def block_of(self, path: str) -> Block | None:
        best = None
        for b in self.blocks:
            if path == b.path or path.startswith(b.path + "."):
                if best is None or len(b.path) > len(best.path):
                    best = b
        return best


def _match_rel(rel: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(rel, p) for p in patterns)


def _find_stacks(model: nn.Module, suffixes) -> list[tuple[str, nn.ModuleList]]:
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and any(name == s or name.endswith("." + s) for s in suffixes):
            out.append((name, mod))
    return out


def map_model(model: nn.Module) -> ModelMap:
    """Map a model through the table, or by discovery for an unknown model type."""
    model_type = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    arch = TABLE.get(model_type)
    if arch is None:
        return discover(model, model_type)
    stacks = _find_stacks(model, arch.layers)
    if not stacks:
        return discover(model, model_type)
    return _apply(model, model_type, arch, stacks)


def _apply(model, model_type, arch: Architecture, stacks, discovered=False) -> ModelMap:
    blocks: list[Block] = []
    for stack_name, stack in stacks:
        for i, _ in enumerate(stack):
            blocks.append(Block(len(blocks), f"{stack_name}.{i}", stack_name, i, len(stack)))
    modules = dict(model.named_modules())
    roles: dict[str, set[str]] = {}
    fused: dict[str, tuple[str, ...]] = {}
    attention = []
    for b in blocks:
        prefix = b.path + "."
        for path, mod in modules.items():
            if not path.startswith(prefix):
                continue
            rel = path[len(prefix):]
            if is_linear_like(mod):
                for role, pats in arch.roles.items():
                    if _match_rel(rel, pats):
                        roles.setdefault(path, set()).add(role)
                for pat, fr in arch.fused.items():
                    if fnmatch.fnmatchcase(rel, pat):
                        fused[path] = fr
            if _match_rel(rel, arch.attention):
                attention.append((path, b, "self"))
            elif _match_rel(rel, arch.cross_attention):
                attention.append((path, b, "cross"))
    return ModelMap(model_type, blocks, roles, fused, attention, discovered, arch.positions)


_DISCOVERY_ROLES = {
    "q": r"(q|q_proj|query|wq|q_lin|to_q)",
    "k": r"(k|k_proj|key|wk|k_lin|to_k)",
    "v": r"(v|v_proj|value|wv|v_lin|to_v)",
    "o": r"(o|o_proj|out_proj|wo_attn|out_lin|dense_attn|attention\.output\.dense|attn\.c_proj|self_attention\.dense)",
    "ffn_in": r"(fc1|c_fc|up_proj|gate_proj|w1|w3|wi|wi_0|wi_1|lin1|intermediate\.dense|dense_h_to_4h|fc_in)",
    "ffn_out": r"(fc2|down_proj|w2|wo|lin2|mlp\.c_proj|output\.dense|dense_4h_to_h|fc_out)",
}


# one projection computing q, k and v as three equal slices of its output
_DISCOVERY_FUSED_QKV = r"(c_attn|qkv_proj|query_key_value|Wqkv|qkv)"


def discover(model: nn.Module, model_type: str) -> ModelMap:
    """Fallback for model types not in the table: find blocks and roles by common names.

    The blocks are the longest ``nn.ModuleList`` whose children share one class
    (all such lists of that class, for encoder-decoder models). Roles come from
    the usual projection names; attention modules are the modules that own a
    q, a k and a v projection.
    """
    lists = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1]
    lists = [(n, m) for n, m in lists if any(is_linear_like(x) for x in m[0].modules())]
    if not lists:
        raise UnipeftError(
            f"cannot find transformer blocks in {type(model).__name__} (model_type {model_type!r}): no "
            f"nn.ModuleList of identical blocks; add an entry to unipeft.architectures.TABLE"
        )
    longest = max(len(m) for _, m in lists)
    stacks = [(n, m) for n, m in lists if len(m) == longest]
    # drop nested lists (e.g. T5's block.N.layer) keeping the outermost
    stacks = [(n, m) for n, m in stacks if not any(n != o and n.startswith(o + ".") for o, _ in stacks)]
    pats = {r: re.compile(rf"(^|.*\.){rx}$") for r, rx in _DISCOVERY_ROLES.items()}
    fused_rx = re.compile(rf"(^|.*\.){_DISCOVERY_FUSED_QKV}$")
    blocks_map = _apply(model, model_type, Architecture(layers=(), roles={}, attention=()), stacks, True)
    modules = dict(model.named_modules())
    for b in blocks_map.blocks:
        prefix = b.path + "."
        for path, mod in modules.items():
            if path.startswith(prefix) and is_linear_like(mod):
                rel = path[len(prefix):]
                for role, rx in pats.items():
                    if rx.match(rel):
                        blocks_map.roles.setdefault(path, set()).add(role)
                if fused_rx.match(rel):
                    blocks_map.roles.setdefault(path, set()).update({"q", "k", "v"})
                    blocks_map.fused[path] = ("q", "k", "v")
        # attention modules: parents of a q and a v projection
        parents = {}
        for path, rs in blocks_map.roles.items():
            if path.startswith(prefix) and ("q" in rs or "v" in rs):
                parent = path.rsplit(".", 1)[0]
                parents.setdefault(parent, set()).update(rs & {"q", "v"})
        for parent, rs in parents.items():
            if rs == {"q", "v"}:
                kind = "cross" if re.search(r"cross|encdec|encoder_attn", parent, re.I) else "self"
                blocks_map.attention.append((parent, b, kind))
    return blocks_map


def base_named_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` without the deltas: children named ``unipeft_*`` (a site's
    deltas, the model-level delta modules) are not descended into. The walk costs the base
    model's size, not the number of attached deltas (a server holds hundreds)."""
    seen: set[int] = set()
    stack = [(prefix, model)]
    while stack:  # depth first, in the order named_modules() gives, each module once (tied ones too)
        path, mod = stack.pop()
        if id(mod) in seen:
            continue
        seen.add(id(mod))
        yield path, mod
        children = [(f"{path}.{name}" if path else name, child) for name, child in mod._modules.items()
                    if child is not None and not name.startswith("unipeft_")]
        stack.extend(reversed(children))


def base_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The base model's own parameters (``named_parameters`` without any delta's), each once."""
    seen = set()
    for path, mod in base_named_modules(model):
        for name, p in mod._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                yield (f"{path}.{name}" if path else name), p


def iter_linear_modules(model: nn.Module, within: list[Block]) -> Iterator[tuple[str, nn.Module]]:
    prefixes = tuple(b.path + "." for b in within)
    # the linear maps inside another delta (an adapter's projections) are not the base model's
    for path, mod in base_named_modules(model):
        if path.startswith(prefixes) and is_linear_like(mod):
            yield path, mod
