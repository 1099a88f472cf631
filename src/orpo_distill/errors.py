"""User-facing errors.

Anything a user can cause (a wrong config field, a malformed input file, a missing model) raises
:class:`UserError` with a message that names the file and line or the config field. The CLI prints
these without a traceback; every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, config or environment, with a message that says how to fix it."""


class NonFiniteLossError(UserError):
    """A training step produced a NaN or infinite loss; the step is refused before weights change."""
