"""Method configurations: validated on construction, serialisable to JSON.

A method config is a frozen-by-convention dataclass. ``MethodConfig`` gives
every method the same strict edges: unknown options are refused with the
list of valid ones, values are checked in ``validate`` (each method's own
rules), and ``to_dict``/``from_dict`` round-trip through ``delta.json``.

Every config class registers itself under its ``kind`` so a saved delta can
be rebuilt by name without executing any code from the file.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from .errors import UnipeftError, choices

METHODS: dict[str, type["MethodConfig"]] = {}


class MethodConfig:
    """Base of every method config (``up.LoRA``, ``up.Adapter``, ...).

    Subclasses are dataclasses and set:
      kind         -- the name stored on disk ("lora", "adapter", ...)
      method_type  -- "additive", "selective" or "reparameterization" (the notes' taxonomy)
      mergeable    -- whether ``up.merge`` can fold the delta into the base weights
      routable     -- whether ``up.route`` can give it to some rows of a batch only (False for
                      methods that change the base's own weights in place, or its vocabulary)
      layers_refusal -- why ``layers=`` cannot apply, for a method that acts on no block (NewTokens);
                      empty: it applies (``unipeft.layers``)
    and implement ``install(view, name)`` (see ``engine.ModelView``).
    """

    kind: ClassVar[str] = ""
    method_type: ClassVar[str] = ""
    mergeable: ClassVar[bool] = False
    routable: ClassVar[bool] = True
    layers_refusal: ClassVar[str] = ""

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.kind:
            METHODS[cls.kind] = cls

    # dataclass hook: validation runs on construction
    def __post_init__(self):
        if hasattr(self, "layers"):  # every method's ``layers=`` (unipeft.layers), checked in one place
            from .layers import normalize

            self.layers = normalize(type(self).__name__, self.layers)
            if self.layers is not None and self.layers_refusal:
                raise UnipeftError(f"{type(self).__name__}: layers= does not apply: {self.layers_refusal}; leave it out")
        self.validate()

    def validate(self) -> None:  # overridden by methods with rules
        pass

    # --- serialisation -------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, kind: str, options: dict[str, Any]) -> "MethodConfig":
        if kind not in METHODS:
            raise UnipeftError(f"unknown method {kind!r}; valid methods: {choices(sorted(METHODS))}")
        return METHODS[kind](**options)

    def replace(self, **changes) -> "MethodConfig":
        return dataclasses.replace(self, **changes)


def reject_unknown_options(cls):
    """Class decorator: make ``Config(bad_option=1)`` a clear UnipeftError.

    Dataclasses raise a bare TypeError for unexpected keywords; we want the
    message to name the option and list the valid ones.
    """
    init = cls.__init__
    valid = [f.name for f in dataclasses.fields(cls)]

    def __init__(self, *args, **kwargs):
        unknown = [k for k in kwargs if k not in valid]
        if unknown:
            raise UnipeftError(
                f"{cls.__name__}: unknown option {unknown[0]!r}; valid options: {choices(valid)}"
            )
        if len(args) > len(valid):
            raise UnipeftError(f"{cls.__name__} takes at most {len(valid)} options, got {len(args)}")
        init(self, *args, **kwargs)

    __init__.__doc__ = init.__doc__
    cls.__init__ = __init__
    return cls


def method(cls):
    """Decorator for method configs: a dataclass with strict keyword checking, and the ``layers``
    option every method takes (``unipeft.layers``: the blocks it acts on; None: all)."""
    if not any("layers" in getattr(c, "__dataclass_fields__", {}) for c in cls.__mro__):
        import inspect

        cls.__annotations__ = {**inspect.get_annotations(cls), "layers": "tuple | None"}
        cls.layers = None
    return reject_unknown_options(dataclasses.dataclass(cls))


# --- small validators shared by method configs -------------------------------

def check_positive_int(owner: str, name: str, value, allow_zero=False):
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        bound = ">= 0" if allow_zero else ">= 1"
        raise UnipeftError(f"{owner}: {name} must be an integer {bound}, got {value!r}")


def check_number(owner: str, name: str, value, lo=None, hi=None, lo_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UnipeftError(f"{owner}: {name} must be a number, got {value!r}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        op = ">" if lo_open else ">="
        raise UnipeftError(f"{owner}: {name} must be {op} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise UnipeftError(f"{owner}: {name} must be <= {hi}, got {value!r}")


def check_choice(owner: str, name: str, value, valid):
    if value not in valid:
        raise UnipeftError(f"{owner}: {name} must be {choices(valid)}, got {value!r}")


def normalize_targets(owner: str, targets):
    """Targets: None (model defaults), a string, or a list of strings."""
    if targets is None:
        return None
    if isinstance(targets, str):
        return (targets,)
    if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) and t for t in targets):
        raise UnipeftError(f"{owner}: targets must be a string or a list of non-empty strings, got {targets!r}")
    if not targets:
        raise UnipeftError(f"{owner}: targets is an empty list; give at least one target or None for the model's defaults")
    return tuple(targets)
