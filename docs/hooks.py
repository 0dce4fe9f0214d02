"""MkDocs hook: facts the code knows, rendered into the pages at build time so they cannot go stale.

A page writes a marker, the build replaces it:

    <!-- unipeft:method lora -->          the method's facts: its config class, kind, type, whether
                                          it merges and routes (read from the class in ``unipeft.METHODS``), its
                                          options with their types and defaults (the dataclass fields),
                                          and every row of ``training/defaults.py`` for that kind, each
                                          with its settings and its source
    <!-- unipeft:defaults adapter_drop -->  named rows of ``training/defaults.py`` only (comma-separated)
    <!-- unipeft:compare-default -->       the methods ``unipeft compare`` runs when none are named

A marker naming a kind or a row that does not exist stops the build (``mkdocs build --strict``
runs in CI), as does a method page that lost its marker: ``tests/test_docs.py`` checks that every
kind in ``unipeft.METHODS`` has a page with a ``unipeft:method`` marker.
"""
from __future__ import annotations

import re

from mkdocs.exceptions import PluginError

MARKER = re.compile(r"<!--\s*unipeft:([a-z-]+)\s*([^>]*?)\s*-->")


def _fmt_value(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt_value(x) for x in v) + "]"
    return repr(v) if isinstance(v, str) else str(v)


def _fmt_options(d: dict) -> str:
    return ", ".join(f"`{k}={_fmt_value(v)}`" for k, v in d.items()) or "—"


def _defaults_table(names: list[str]) -> str:
    from unipeft.training.defaults import COMPARE_DEFAULT, DEFAULTS

    rows = ["| `--method` | label | method options | training settings | in `compare` by default |",
            "|---|---|---|---|---|"]
    sources = []
    for n in names:
        d = DEFAULTS[n]
        train = _fmt_options(d.train)
        for family, extra in d.family_train.items():
            train += f"; {family} models: {_fmt_options(extra)}"
        rows.append(f"| `{n}` | {d.label} | {_fmt_options(d.config)} | {train} | "
                    f"{'yes' if n in COMPARE_DEFAULT else 'no'} |")
        sources.append(f"- **`{n}`**: {d.source}.")
    return "\n".join(rows) + "\n\nWhere these numbers come from (`src/unipeft/training/defaults.py`):\n\n" \
        + "\n".join(sources) + "\n"


def _options_table(cls, public: str) -> str:
    """The config's options (its dataclass fields): name, type, default; the docstring says what each does."""
    import dataclasses

    rows = [f"**Options** of `{public}(...)` (each described in the docstring under *Reference* below):\n",
            "| option | type | default |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f"`{f.default!r}`"
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f"`{f.default_factory()!r}`"
        else:
            default = "required"
        typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        typ = " or ".join(f"`{t.strip()}`" for t in typ.split("|"))  # a bare | would split the table cell
        rows.append(f"| `{f.name}` | {typ} | {default.replace('|', '&#124;')} |")
    return "\n".join(rows) + "\n\n"


def _method(kind: str, page) -> str:
    import unipeft as up
    from unipeft.training.defaults import DEFAULTS

    if kind not in up.METHODS:
        raise PluginError(f"{page.file.src_path}: unipeft:method names {kind!r}, which is not a method kind; "
                          f"kinds: {', '.join(sorted(up.METHODS))}")
    cls = up.METHODS[kind]
    public = f"up.{cls.__name__}" if getattr(up, cls.__name__, None) is cls else f"{cls.__module__}.{cls.__name__}"
    facts = ["| | |", "|---|---|",
             f"| config class | `{public}` (`{cls.__module__}`) |",
             f"| kind (as saved in `delta.json`) | `{kind}` |",
             f"| type (the notes' taxonomy) | {cls.method_type} |",
             f"| merges into the base weights (`up.merge`) | {'yes' if cls.mergeable else 'no'} |"]
    if getattr(cls, "routable", True):
        facts.append("| routes per example (`up.route`) | yes |")
    else:
        why = getattr(cls, "route_refusal", "") or "it changes what every row of a batch shares"
        facts.append(f"| routes per example (`up.route`) | no: {why} |")
    out = "\n".join(facts) + "\n\n" + _options_table(cls, public)
    names = [n for n, d in DEFAULTS.items() if d.kind == kind]
    if names:
        out += "**Training defaults** (`unipeft train --method ...`, `unipeft compare --methods ...`):\n\n"
        out += _defaults_table(names)
    else:
        out += ("**Training defaults**: none of its own in `training/defaults.py`; `unipeft train --method "
                f"{kind}` takes the config's own defaults.\n")
    return out


def _defaults(arg: str, page) -> str:
    from unipeft.training.defaults import DEFAULTS

    names = [n.strip() for n in arg.split(",") if n.strip()]
    missing = [n for n in names if n not in DEFAULTS]
    if not names or missing:
        raise PluginError(f"{page.file.src_path}: unipeft:defaults names {missing or arg!r}, not rows of "
                          f"training/defaults.py; rows: {', '.join(DEFAULTS)}")
    return _defaults_table(names)


def _compare_default(arg: str, page) -> str:
    from unipeft.training.defaults import COMPARE_DEFAULT, DEFAULTS

    return ", ".join(f"`{n}` ({DEFAULTS[n].label})" for n in COMPARE_DEFAULT)


def on_page_markdown(markdown, page, config, files):
    def render(m: re.Match) -> str:
        what, arg = m.group(1), m.group(2)
        if what == "method":
            return _method(arg, page)
        if what == "defaults":
            return _defaults(arg, page)
        if what == "compare-default":
            return _compare_default(arg, page)
        raise PluginError(f"{page.file.src_path}: unknown marker unipeft:{what}; "
                          "valid: method, defaults, compare-default")

    return MARKER.sub(render, markdown)
