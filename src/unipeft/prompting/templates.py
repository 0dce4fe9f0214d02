"""Templates (patterns): how an example becomes a prompt for a language model (seed 000 "verbalizer", seed 004 PET).

``Template("Review: {text}\\nSentiment: {label}")`` has one ``{text}``, optionally one
``{text_pair}`` (sentence pairs) and exactly one ``{label}``: where the verbalizer's word goes.
A causal LM scores the word as the continuation of everything before ``{label}``; a masked LM
scores it at ``[MASK]`` position(s) put where ``{label}`` stands (the text after it stays).

Fields are filled by one regular-expression pass (never ``str.format``), so braces inside the
texts are ordinary characters.
"""
from __future__ import annotations

import re

from ..errors import UnipeftError, choices

FIELDS = ("text", "text_pair", "label")
_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def unescape(s: str) -> str:
    """Command-line templates: ``\\n`` and ``\\t`` written as two characters become the characters."""
    return s.replace("\\n", "\n").replace("\\t", "\t")


class Template:
    """A pattern with ``{text}``, optionally ``{text_pair}``, and one ``{label}``.

    ``description``: an instruction shown once before the demonstrations (in-context learning);
    ``separator``: what goes between the description and the filled demonstrations.
    """

    def __init__(self, pattern: str, description: str = "", separator: str = "\n\n"):
        if not isinstance(pattern, str):
            raise UnipeftError(f"Template pattern must be a string, got {type(pattern).__name__}")
        names = _FIELD.findall(pattern)
        unknown = sorted(set(names) - set(FIELDS))
        if unknown:
            raise UnipeftError(f"template {pattern!r}: unknown field(s) {unknown}; valid fields: {choices(FIELDS)}")
        if "text" not in names:
            raise UnipeftError(f"template {pattern!r} has no {{text}}: it must show the example, e.g. "
                               "'Review: {text}\\nSentiment: {label}'")
        for f in FIELDS:
            if names.count(f) > 1:
                raise UnipeftError(f"template {pattern!r} has {{{f}}} {names.count(f)} times; give it once")
        if "label" not in names:
            raise UnipeftError(f"template {pattern!r} has no {{label}}: it marks where the verbalizer's word goes")
        before, after = pattern.split("{label}")
        if "{text" not in before:
            raise UnipeftError(f"template {pattern!r}: {{text}} must come before {{label}} (a language model "
                               "reads the example before it answers)")
        self.pattern, self.description, self.separator = pattern, description, separator
        stripped = before.rstrip()
        self.before = stripped            # the prompt a causal LM continues
        self.gap = before[len(stripped):]  # whitespace before {label}: it belongs to the word's tokens
        self.after = after
        self.pair = "text_pair" in names

    def __repr__(self):
        return f"Template({self.pattern!r})"

    def _fill(self, s: str, text: str, text_pair: str | None, label: str | None = None) -> str:
        if self.pair and text_pair is None:
            raise UnipeftError(f"template {self.pattern!r} has {{text_pair}}: give the examples' second texts")
        values = {"text": text, "text_pair": text_pair or "", "label": label or ""}
        return _FIELD.sub(lambda m: values[m.group(1)], s)

    def prompt(self, text: str, text_pair: str | None = None) -> str:
        """Everything before the label (causal LMs), trailing whitespace removed (it goes with the word)."""
        return self._fill(self.before, text, text_pair)

    def cloze(self, text: str, text_pair: str | None, mask: str) -> str:
        """The masked-LM input: ``mask`` (one [MASK] token, expanded per word length later) where the label goes."""
        return self._fill(self.before, text, text_pair) + self.gap + mask + self._fill(self.after, text, text_pair)

    def filled(self, text: str, text_pair: str | None, word: str) -> str:
        """The whole pattern with ``word`` in place of ``{label}`` (a demonstration)."""
        return self._fill(self.before, text, text_pair) + self.gap + word + self._fill(self.after, text, text_pair)

    def prefix(self, demonstrations) -> str:
        """The shared part of every prompt: the description and the filled demonstrations, each followed by the
        separator. ``demonstrations``: (text, text_pair or None, word) triples."""
        parts = [self.description] if self.description else []
        parts += [self.filled(t, p, w) for t, p, w in demonstrations]
        return "".join(p + self.separator for p in parts)
