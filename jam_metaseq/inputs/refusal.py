"""What every bounded reader of ``jam_metaseq.inputs`` raises: one error type naming the place."""

from __future__ import annotations

from jam_metaseq.errors import JamError


class InputError(JamError, ValueError):
    """Input refused by one of this package's bounds; ``reason`` is a short category (for
    ``--on-error skip`` reports), ``detail`` the message without its place, ``line`` the 1-based line
    where known."""

    def __init__(self, message: str, *, reason: str, where: str | None = None, line: int | None = None) -> None:
        self.reason = reason
        self.detail = message
        self.line = line
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


def at_line(where: str | None, line: int | None) -> str | None:
    """``file:line`` when both are known (a JSONL caller passes ``where`` with its own line)."""
    if where is None or line is None:
        return where
    return f"{where}:{line}"
