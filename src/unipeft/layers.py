"""``layers=``: any method on a subset of the model's blocks (Chen et al. 2023's layer groups, seed 000 "S4").

    up.LoRA(layers="0-1")          up.Adapter(layers=[2, 3, 4, 5])         up.BitFit(layers="upper-half")
    up.Compose([up.LoRA(layers="0-1"), up.Adapter(layers="2-5")])

A spec is an index, a range "a-b" (both ends included), a comma-separated list of those, a list
of them, or a named group: "all", "encoder", "decoder" (the stacks of an encoder-decoder),
"lower-half", "upper-half". Indices count blocks over the whole model, encoder blocks first
(``architectures.Block.index``).

How: a method installs through a ``LayerView`` of the engine's view whose model map holds only
the chosen blocks, so every method that finds its places through the map (targets, sublayers,
attention modules, blocks) sees only those layers and sizes its parameters for them; what it
places elsewhere is refused or filtered here. Input positions (prompt tuning, P-tuning v1) and maps
in no block (the token embedding, an LM head) are before or after every layer: ``layers=`` does not
apply to them and says so; a method that can leave them out asks ``view.whole_model`` (Intrinsic
leaves out the embedding), one that acts only there refuses ``layers=`` on construction
(``MethodConfig.layers_refusal``: NewTokens). ``install`` is the one entry (the engine's attach and
each part of a composition): it also refuses a spec under which the method placed nothing (AdapterDrop
dropping every chosen layer, Freeze's last blocks outside them).
"""
from __future__ import annotations

import dataclasses

from .errors import UnipeftError, choices

GROUPS = ("all", "encoder", "decoder", "lower-half", "upper-half")


def normalize(owner: str, spec):
    """The spec as a tuple of ints and group names (None stays None); a one-line error otherwise."""
    if spec is None:
        return None
    items = [spec] if isinstance(spec, (int, str)) and not isinstance(spec, bool) else spec
    if not isinstance(items, (list, tuple)) or not items:
        raise UnipeftError(f"{owner}: layers must be an index, a range 'a-b', a list of those, or one of "
                           f"{choices(GROUPS)}; got {spec!r}")
    out: list = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise UnipeftError(f"{owner}: layers: {item!r} is not an index, a range 'a-b' or a group name")
        if isinstance(item, int):
            if item < 0:
                raise UnipeftError(f"{owner}: layers: index {item} is negative")
            out.append(item)
            continue
        for part in (p.strip() for p in item.split(",")):
            if part in GROUPS:
                out.append(part)
            elif part.isdigit():
                out.append(int(part))
            elif part.count("-") == 1 and all(s.strip().isdigit() for s in part.split("-")):
                lo, hi = (int(s) for s in part.split("-"))
                if lo > hi:
                    raise UnipeftError(f"{owner}: layers: range {part!r} runs backwards")
                out.extend(range(lo, hi + 1))
            else:
                raise UnipeftError(f"{owner}: layers: {part!r} is not an index, a range 'a-b' or one of "
                                   f"{choices(GROUPS)}")
    return tuple(dict.fromkeys(out))


def chosen_blocks(owner: str, spec, mmap) -> set[int]:
    """The block indices ``spec`` names in this model (errors name the valid range and groups)."""
    blocks = mmap.blocks
    n = len(blocks)
    chosen: set[int] = set()
    for item in spec:
        if isinstance(item, int):
            if item >= n:
                raise UnipeftError(f"{owner}: layers: block {item} does not exist; {mmap.model_type!r} has blocks "
                                   f"0 to {n - 1}")
            chosen.add(item)
        elif item == "all":
            chosen |= {b.index for b in blocks}
        elif item in ("encoder", "decoder"):
            hit = {b.index for b in blocks if item in b.stack.split(".")}
            if not hit:
                raise UnipeftError(f"{owner}: layers: {mmap.model_type!r} has no {item} stack; "
                                   f"give indices 0 to {n - 1}")
            chosen |= hit
        else:
            half = n // 2
            chosen |= {b.index for b in blocks if (b.index < half) == (item == "lower-half")}
    return chosen


def filtered_map(mmap, chosen: set[int]):
    """The model map with only the chosen blocks (their roles, fused maps and attention modules)."""
    blocks = [b for b in mmap.blocks if b.index in chosen]

    def keep(path):
        b = mmap.block_of(path)
        return b is not None and b.index in chosen
    return dataclasses.replace(mmap, blocks=blocks, roles={p: r for p, r in mmap.roles.items() if keep(p)},
                               fused={p: r for p, r in mmap.fused.items() if keep(p)},
                               attention=[a for a in mmap.attention if a[1].index in chosen])


def install(method, view, name: str) -> None:
    """``method.install(view, name)``, through a ``LayerView`` of its ``layers=`` blocks when it has them."""
    spec = getattr(method, "layers", None)
    if spec is None:
        method.install(view, name)
        return
    owner = type(method).__name__
    layered = LayerView(view, spec, owner)
    method.install(layered, name)
    if not layered.placed:  # a silent no-op would train the head alone under the method's name
        raise UnipeftError(f"{owner}: places nothing in layers {sorted(layered.chosen)} with these options; "
                           f"choose other layers or options")


class LayerView:
    """A method's view of the model restricted to some blocks (see the module docstring)."""

    whole_model = False  # the engine's ModelView says True: maps in no block are the method's to use

    def __init__(self, view, spec, owner: str):
        self.view, self.owner = view, owner
        self.full_map = view.map
        self.chosen = chosen_blocks(owner, spec, view.map)
        self.map = filtered_map(view.map, self.chosen)
        self.placed = False  # whether the method put anything in the chosen blocks (see install)

    def __getattr__(self, attr):
        return getattr(self.view, attr)

    def _inside(self, path: str) -> bool:
        b = self.full_map.block_of(path)
        return b is not None and b.index in self.chosen

    def resolve_targets(self, targets, owner: str) -> list[str]:
        from .targets import resolve

        return resolve(self.view.model, self.map, targets, owner)

    def add_linear(self, path, delta) -> None:
        if self.full_map.block_of(path) is None:  # (task heads are added by the engine, not through here)
            raise UnipeftError(f"{self.owner}: acts on {path!r}, which is in no block (an embedding or an output "
                               f"layer), so layers= does not apply to it; leave layers out")
        if not self._inside(path):
            raise UnipeftError(f"{self.owner}: placed a delta at {path!r}, outside layers {sorted(self.chosen)}")
        self.placed = True
        self.view.add_linear(path, delta)

    def add_attention(self, path, source) -> None:
        if not self._inside(path):
            raise UnipeftError(f"{self.owner}: placed a prefix at {path!r}, outside layers {sorted(self.chosen)}")
        self.placed = True
        self.view.add_attention(path, source)

    def add_hidden(self, stack_path, source) -> None:
        self.placed = True  # PASTA sizes its vectors for the chosen blocks (self.map) itself
        self.view.add_hidden(stack_path, source)

    def add_input(self, stack_path, source) -> None:
        raise UnipeftError(f"{self.owner}: acts on the input embeddings, before any layer, so layers= does not "
                           f"apply; leave it out (or use a method that acts in the layers, such as prefix tuning)")

    def select(self, paths) -> None:
        """Base parameters trained in place (BitFit, Freeze): those of the chosen blocks only."""
        mine = [p for p in paths if self._inside(p)]
        self.placed = self.placed or bool(mine)
        self.view.select(mine)

    def select_sparse(self, paths, state) -> None:
        """Sparse entries of base parameters (sparse fine-tuning, finalized diff pruning): the methods resolve
        their maps through ``self.map``, so every path is inside; checked here all the same."""
        paths = list(paths)
        outside = [p for p in paths if not self._inside(p)]
        if outside:
            raise UnipeftError(f"{self.owner}: selected {outside[0]!r}, outside layers {sorted(self.chosen)}")
        self.placed = self.placed or bool(paths)
        self.view.select_sparse(paths, state)
