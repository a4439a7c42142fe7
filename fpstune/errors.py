"""Errors that the CLI turns into one line on stderr and exit status 2."""

from __future__ import annotations

from fpstune.kernels.spec import SpecError


class BadInput(ValueError):
    """Input the user can fix: the message is one line, ``<file>: <field>: <what is wrong>``."""


class NoModel(ValueError):
    """A model adapter has no model to run (``synthetic``), or cannot do what was asked of it
    (`fpstune.models.adapters`)."""


#: Everything the CLI reports as bad input.
BAD_INPUT_ERRORS: tuple[type[Exception], ...] = (BadInput, SpecError)


def one_line(e: BaseException) -> str:
    """An exception's message on one line (whitespace runs collapsed), for one-line errors."""
    return " ".join(str(e).split()) or type(e).__name__
