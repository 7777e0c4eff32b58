"""Class 5: data that becomes a script (issue 27 §5).

A value written into a generated script (``jam-launch``'s sbatch scripts) is code unless it is
written for its position. ``script_value`` is the one function every script writer passes each
value through:

- ``"sbatch"``: an ``#SBATCH`` directive's value. SLURM reads the line up to its end and splits it
  at blanks, and ``--output`` expands ``%`` patterns; a newline would end the comment and start a
  shell line. Only one plain word is accepted: letters, digits and ``. _ - / + , = @ : ~``.
- ``"shell"``: one word of a shell command, returned quoted by ``shlex.quote`` (a single-quoted
  string in which bash expands nothing: ``$()``, backticks, ``;`` and newlines stay text). NUL is
  refused (no argv can hold it).

Either way the value must be UTF-8 text (the script is written as UTF-8).
"""

from __future__ import annotations

import shlex
from typing import Literal

from jam_metaseq.errors import JamError

DIRECTIVE_PUNCTUATION = "._-/+,=@:~"


class ScriptValueError(JamError, ValueError):
    """A value that cannot be written at its position in a generated script."""


def script_value(value: str | int, *, position: Literal["sbatch", "shell"], what: str) -> str:
    """The text to write for ``value`` at ``position`` (module docstring); ``ScriptValueError``
    naming ``what`` (the flag it came from) when the value cannot be written there safely."""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str):
        raise ScriptValueError(f"{what} must be a string, got {type(value).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 arrive from argv as lone surrogates
        raise ScriptValueError(f"{what} {text!r} is not UTF-8 text, which the script is written in") from None
    if position == "sbatch":
        bad = next((c for c in text if not (c.isalnum() or c in DIRECTIVE_PUNCTUATION)), None)
        if not text or bad is not None:
            why = "is empty" if not text else f"contains {bad!r}"
            raise ScriptValueError(
                f"{what} {text!r} cannot be written on an #SBATCH line: it {why} (allowed: letters, digits "
                f"and {DIRECTIVE_PUNCTUATION})")
        return text
    if position == "shell":
        if "\0" in text:
            raise ScriptValueError(f"{what} {text!r} contains a NUL byte, which no command line can hold")
        return shlex.quote(text)
    raise ValueError(f"unknown script position {position!r}")
