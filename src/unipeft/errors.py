"""The one exception type unipeft raises for user mistakes.

Every message names the problem and, where there is a finite set of valid
choices, lists them. It subclasses ``ValueError`` so generic callers that
catch bad-argument errors keep working.
"""


class UnipeftError(ValueError):
    """A user mistake: bad option, bad target, bad file, wrong base model."""


def choices(values) -> str:
    """Format valid choices for an error message: ``'a', 'b' or 'c'``."""
    vals = [repr(v) for v in values]
    if not vals:
        return "(none)"
    if len(vals) == 1:
        return vals[0]
    return ", ".join(vals[:-1]) + " or " + vals[-1]
